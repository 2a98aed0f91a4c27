"""Helpers shared by the CLI modules."""

from __future__ import annotations

from typer.core import TyperGroup


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
