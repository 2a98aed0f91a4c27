"""Clock service: ``jetson_clocks --show`` (is every CPU and the GPU locked?) and ``--lock-clocks`` with a
guaranteed restore. The tool is looked up on PATH (tests put a script replaying recorded output there)."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_tl.core.errors import EdgeTLError
from edge_tl.device.facts._tools import run_tool

_FREQ_RE = re.compile(r"^(cpu\d+|GPU)\b.*?MinFreq=(\d+)\s+MaxFreq=(\d+)(?:\s+CurrentFreq=(\d+))?", re.M)


def _run(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def parse_clocks(text: str) -> tuple[bool | None, str]:
    """(locked?, detail) from ``jetson_clocks --show``: locked when every CPU and the GPU run min == max."""
    rows = _FREQ_RE.findall(text)
    if not rows:
        return None, "no CPU/GPU clock lines in jetson_clocks --show"
    unlocked = [name for name, lo, hi, _cur in rows if lo != hi]
    if unlocked:
        return False, f"min != max clock on {', '.join(unlocked[:4])}{' ...' if len(unlocked) > 4 else ''}"
    return True, f"min == max clock on {len(rows)} CPU/GPU domain(s)"


class Clocks:
    def __init__(self, executable: str = "jetson_clocks"):
        self.executable = executable

    def show(self) -> tuple[bool | None, str]:
        """(locked?, detail); None when the state cannot be read (not a Jetson, or the tool failed)."""
        if shutil.which(self.executable) is None:
            return None, f"{self.executable} not found (not a Jetson): clock state unknown"
        proc = run_tool([self.executable, "--show"])
        if proc is None:
            return None, f"{self.executable} --show failed to run"
        locked, detail = parse_clocks(proc.stdout)
        if proc.returncode != 0 and locked is None:
            detail = f"jetson_clocks --show failed: {(proc.stderr or proc.stdout).strip()[:200]}"
        return locked, detail

    def locked(self, state: Any = None) -> contextlib.AbstractContextManager[None]:
        """Lock the clocks for a ``with`` block and always restore them (see :func:`locked_clocks`)."""
        return locked_clocks(state, self.executable)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise EdgeTLError(f"{what} failed (exit {proc.returncode}): {msg[-1] if msg else 'no output'}",
                          "run edge-tl as root (sudo) for --lock-clocks, or drop --lock-clocks")


@contextlib.contextmanager
def locked_clocks(state: Any = None, executable: str = "jetson_clocks") -> Iterator[None]:
    """Store the clock state (``jetson_clocks --store``), lock clocks (``jetson_clocks``), and always restore
    it (``jetson_clocks --restore``) on exit: normal, exception or Ctrl-C. A second Ctrl-C during the restore
    is ignored so the restore completes. Sets ``state.lock_clocks`` / ``state.clocks_restored`` (a bench
    ``DeviceState``) when given."""
    exe = shutil.which(executable)
    if exe is None:
        raise EdgeTLError(f"--lock-clocks needs '{executable}', which is not on PATH",
                          "run on a Jetson (jetson_clocks ships with L4T), or drop --lock-clocks")
    td = tempfile.mkdtemp(prefix="edge-tl-clocks-")
    store = str(Path(td) / "l4t_dfs.conf")
    try:
        _check(_run([exe, "--store", store]), "jetson_clocks --store")
    except BaseException:
        shutil.rmtree(td, ignore_errors=True)
        raise
    if state is not None:
        state.lock_clocks = True
    try:
        _check(_run([exe]), "jetson_clocks")
        yield
    finally:
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            proc = _run([exe, "--restore", store])
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        if state is not None:
            state.clocks_restored = proc.returncode == 0
        if proc.returncode != 0:  # keep the stored state so the user can restore it by hand
            raise EdgeTLError(f"jetson_clocks --restore failed: {(proc.stderr or proc.stdout).strip()[:200]}",
                              f"restore the clocks by hand: sudo jetson_clocks --restore {store}")
        shutil.rmtree(td, ignore_errors=True)
