"""Run a device tool found on PATH; None when it is missing or cannot run (facts are best effort)."""

from __future__ import annotations

import shutil
import subprocess


def run_tool(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess | None:
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        return subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
