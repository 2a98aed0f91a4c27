"""Power mode service: ``nvpmodel -q`` (the tool found on PATH; tests put a script replaying real output there)."""

from __future__ import annotations

import re
from typing import NamedTuple

from edge_tl.device.facts._tools import run_tool

_POWER_MODE_RE = re.compile(r"NV Power Mode:\s*(\S.*?)\s*$", re.M)


class PowerMode(NamedTuple):
    name: str
    id: int | None

    @property
    def label(self) -> str:
        """'MAXN (mode 0)', or the bare name when nvpmodel printed no id."""
        return self.name if self.id is None else f"{self.name} (mode {self.id})"


def parse_nvpmodel(text: str | None) -> PowerMode | None:
    """The mode from ``nvpmodel -q``: 'NV Power Mode: MAXN' then the id on the next line (None: no mode line)."""
    m = _POWER_MODE_RE.search(text or "")
    if not m:
        return None
    rest = text[m.end():].split()
    return PowerMode(m.group(1), int(rest[0]) if rest and rest[0].isdigit() else None)


class NvpModel:
    def __init__(self, executable: str = "nvpmodel"):
        self.executable = executable

    def query(self) -> PowerMode | None:
        """The current power mode, or None off-Jetson (no nvpmodel) or when it cannot be read."""
        proc = run_tool([self.executable, "-q"], timeout=30)
        return parse_nvpmodel(proc.stdout + proc.stderr) if proc is not None else None
