"""The ``edge-tl`` command: a thin Typer layer over the library, with one error boundary.

Each stage's commands live in their own module (``edge_tl.cli.build`` …) exposing ``register(app)``.
Those modules import nothing heavy at import time, so ``edge-tl --help`` is fast and works without torch.

Errors: :class:`~edge_tl.core.errors.EdgeTLError` is the user's (one line, exit code 2/3, no traceback unless
``--debug``); any other exception is an internal bug (exit 70, with a request to report it).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import typer
from rich.console import Console
from rich.markup import escape

from edge_tl import __version__
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.interrupt import sigterm_as_interrupt

err_console = Console(stderr=True, highlight=False)


def _exception_types(attr: str) -> tuple[type[BaseException], ...]:
    """``attr`` from click and from the copy of click that newer Typer releases vendor (``typer._click``)."""
    found: list[type[BaseException]] = []
    for mod in ("typer", "typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), attr, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


_CLICK_ERRORS = _exception_types("ClickException")
_ABORTS = _exception_types("Abort")
_EXITS = _exception_types("Exit")

# (module, what it adds). Modules are registered in this order.
COMMAND_MODULES = (
    "edge_tl.cli.build",
    "edge_tl.cli.rank",
    "edge_tl.cli.bench",
    "edge_tl.cli.engine",
    "edge_tl.cli.deploy",
    "edge_tl.cli.field",
    "edge_tl.cli.fleet",
    "edge_tl.cli.export",
    "edge_tl.cli.keys",
    "edge_tl.cli.collect",
    "edge_tl.cli.label",
)

app = typer.Typer(
    name="edge-tl",
    help="Transfer learning for the edge: build a bundle on the workstation, then engine, bench, deploy, "
    "infer and serve it on a Jetson.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edge-tl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.", envvar="EDGE_TL_DEBUG"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        os.environ["EDGE_TL_DEBUG"] = "1"


def _reflow(doc: str) -> str:
    """A docstring as help: each paragraph one line, so the terminal wraps it (rich's help keeps the source's line
    breaks after the first paragraph, Typer 0.29). A paragraph of list items or indented lines stays as written."""
    import inspect

    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.splitlines()
        keep = para.startswith("\b") or any(ln[:1] in " -*" or ln[:2].rstrip(".").isdigit() for ln in lines[1:])
        out.append(para if keep else " ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)


def _reflow_help(group: typer.Typer) -> None:
    for info in group.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if doc:
            info.help = _reflow(doc)
    for sub in group.registered_groups:
        _reflow_help(sub.typer_instance)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
    _reflow_help(app)


_register_all()


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("EDGE_TL_DEBUG") == "1"


#: below this terminal width the help is click's plain text, which wraps words: rich's option tables cut long
#: values ('mobilenet_v3_sma…') in an 80-column terminal (issue 23)
RICH_HELP_MIN_COLUMNS = 100


def _plain_help_when_narrow() -> None:
    import shutil

    import typer.core

    if shutil.get_terminal_size((120, 24)).columns < RICH_HELP_MIN_COLUMNS:
        typer.core.HAS_RICH = False


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    _plain_help_when_narrow()
    got = None
    try:
        with sigterm_as_interrupt() as got:
            rv = app(args=argv, prog_name="edge-tl", standalone_mode=False)
    except EdgeTLError as exc:
        if debug:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {escape(exc.one_line())}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, *_ABORTS) as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, EOFError):  # click turns every EOFError into Abort: a file ended early, not Ctrl-C
            if debug:
                err_console.print_exception()
            err_console.print(f"[bold red]error:[/] unexpected end of a file or of the input "
                              f"({escape(str(cause) or 'EOFError')}); re-copy the file that was cut short",
                              soft_wrap=True)
            sys.exit(2)
        _interrupted(got is not None and got.terminated)
    except _CLICK_ERRORS as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except _EXITS as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except OSError as exc:
        problem = _storage_problem(exc)
        if problem is None:
            _internal_error(exc, debug)
        if debug:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {escape(problem)}", soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # an internal bug: say so, keep the traceback behind --debug
        _internal_error(exc, debug)
    if rv == 130 or got.terminated:  # typer turns a KeyboardInterrupt (Ctrl-C, SIGTERM) into exit code 130
        _interrupted(got.terminated)
    sys.exit(rv if isinstance(rv, int) else 0)


def _internal_error(exc: BaseException, debug: bool) -> None:
    if debug:
        err_console.print_exception()
    err_console.print(
        f"[bold red]internal error[/] (a bug in edge-tl {__version__}): {type(exc).__name__}: {escape(str(exc))}",
        soft_wrap=True,
    )
    if not debug:
        err_console.print("re-run with --debug for the traceback, and please report it")
    sys.exit(70)


def _storage_problem(exc: OSError) -> str | None:
    """One line for a disk that is full, read-only or not ours to write (issue 24): the environment, not a bug."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full{where}: {exc.strerror}; free space there, or write to another folder (--out)"
    if exc.errno == errno.EROFS:
        return f"the file system is read-only{where}; write to another folder (--out)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; write to a folder you own (--out), or fix its permissions"
    return None


def _interrupted(terminated: bool) -> None:
    """Ctrl-C: exit 130; SIGTERM: exit 143 (128 + the signal, as a shell reports a process it ended)."""
    err_console.print("[yellow]terminated (SIGTERM)[/]" if terminated else "[yellow]interrupted[/]")
    sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
