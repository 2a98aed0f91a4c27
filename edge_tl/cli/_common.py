"""Helpers shared by the CLI modules."""

from __future__ import annotations

from enum import Enum
from typing import Any

from typer.core import TyperGroup


def _v(value: Any) -> Any:
    """An Enum option's plain value (None and plain values pass through)."""
    return value.value if isinstance(value, Enum) else value


class Backend(str, Enum):
    """Runtimes a device command can run a bundle on (edge_tl.device.runners's names)."""

    auto = "auto"
    tensorrt = "tensorrt"
    ort_trt = "ort-trt"
    ort_cuda = "ort-cuda"
    ort_cpu = "ort-cpu"


class BenchBackend(str, Enum):
    """``edge-tl bench`` also measures the PyTorch baseline (a build run's .pt2, workstation only)."""

    auto = "auto"
    tensorrt = "tensorrt"
    ort_trt = "ort-trt"
    ort_cuda = "ort-cuda"
    ort_cpu = "ort-cpu"
    torch = "torch"


class Precision(str, Enum):
    """Engine / run precision. fp16 and best are TensorRT-only; ONNX Runtime runs the fp32 or int8 model."""

    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"
    best = "best"


class DeployPrecision(str, Enum):
    """What ``edge-tl deploy`` gates and switches to (a fixed precision, so the parity gate has thresholds)."""

    int8 = "int8"
    fp16 = "fp16"
    fp32 = "fp32"


class KeepPrecision(str, Enum):
    """Precision of the layers kept out of INT8/FP16 (``engine build --keep-layers``)."""

    fp32 = "fp32"
    fp16 = "fp16"


class Power(str, Enum):
    """Power sources (edge_tl.device.power.KINDS)."""

    auto = "auto"
    ina3221 = "ina3221"
    jtop = "jtop"
    tegrastats = "tegrastats"
    nvml = "nvml"
    none = "none"


class Data(str, Enum):
    """What ``edge-tl bench`` feeds: the bundle's golden inputs or random data."""

    golden = "golden"
    random = "random"


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
