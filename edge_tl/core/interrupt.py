"""SIGTERM handled like Ctrl-C: ``systemctl stop``, ``kill``, a CI job's cancel or torchrun stopping its ranks
end a command through the same cleanup as Ctrl-C (a build's run.json says "interrupted", temporary files go),
where Python's default action for SIGTERM ends the process on the spot."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C's KeyboardInterrupt would be."""

    def __init__(self) -> None:
        super().__init__("terminated (SIGTERM)")


class Received:
    """What :func:`sigterm_as_interrupt` saw: whether SIGTERM came (click/typer turn any KeyboardInterrupt into
    an exit code 130, so the caller learns here that it was SIGTERM)."""

    terminated = False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[Received]:
    """For the block, SIGTERM raises :class:`Terminated`; the previous handler comes back after. A no-op off the
    main thread (only it may set handlers). A server that installs its own handlers (uvicorn) replaces this one
    while it runs."""
    got = Received()
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def _raise(signum: int, frame: object) -> None:
        got.terminated = True
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)
