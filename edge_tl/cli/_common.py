"""Helpers shared by the CLI modules."""

from __future__ import annotations

from enum import Enum

from typer.core import TyperGroup


class Backend(str, Enum):
    """Runtimes a device command can run a bundle on (edge_tl.device.runners's names)."""

    auto = "auto"
    tensorrt = "tensorrt"
    ort_trt = "ort-trt"
    ort_cuda = "ort-cuda"
    ort_cpu = "ort-cpu"


class Via(str, Enum):
    """How a TensorRT engine is built: the Python API, or the trtexec binary (JetPack 5's Python 3.8)."""

    api = "api"
    trtexec = "trtexec"


def default_command_group(default: str) -> type[TyperGroup]:
    """A Typer group that runs ``default`` when the first argument is not one of its subcommands.

    So ``edge-tl bench BUNDLE`` runs ``bench run BUNDLE`` while ``edge-tl bench compare A B`` still works.
    """

    class _DefaultGroup(TyperGroup):
        def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
            if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
                args = [default, *args]
            return super().parse_args(ctx, args)

    return _DefaultGroup
