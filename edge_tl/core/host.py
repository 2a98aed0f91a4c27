"""Facts about the machine a figure was measured on, needed by both sides (the workstation's rank table, the
device's facts, the benchmark scripts): one reader, under a root path so tests read a recorded tree."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path


def cpu_name(root: str | Path = "/") -> str | None:
    """The CPU's model name from ``proc/cpuinfo`` (falls back to Python's platform module)."""
    with contextlib.suppress(OSError):
        for line in (Path(root) / "proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or None
