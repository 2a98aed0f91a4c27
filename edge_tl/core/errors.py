"""The two kinds of failure edge-tl knows.

``EdgeTLError`` is the user's: bad input, a missing file, a package not installed. The CLI prints it as one
line, without a traceback (``--debug`` shows one), and exits non-zero. Anything else that escapes is an
internal bug and is reported as such (Polygraphy's ``tools/_main.py`` draws the same line).
"""

from __future__ import annotations


class EdgeTLError(Exception):
    """A problem with the user's input or environment, with the fix in words.

    ``str(err)`` is one line: ``<problem>; <fix>`` (the fix is optional).
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None, *, exit_code: int | None = None):
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".") if fix else None
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem if not self.fix else f"{self.problem}; {self.fix}"
        return " ".join(text.split())


class CheckFailed(EdgeTLError):
    """A gate that ran correctly and said no (parity out of bounds, a hash mismatch, a doctor blocker)."""

    exit_code = 3


class InternalError(Exception):
    """A bug in edge-tl: an invariant broke. Never raised for bad user input."""
