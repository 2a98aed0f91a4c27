"""Temperature service: thermal zones under ``root``."""

from __future__ import annotations

import re
from pathlib import Path


class Temperatures:
    def __init__(self, root: str | Path = "/"):
        self.root = Path(root)

    def read(self) -> dict[str, float]:
        """Thermal zones from ``sys/devices/virtual/thermal/thermal_zone*/{type,temp}`` (millidegrees -> C)."""
        temps: dict[str, float] = {}
        zones = sorted(self.root.glob("sys/devices/virtual/thermal/thermal_zone*"),
                       key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
        for zone in zones:
            try:
                name = (zone / "type").read_text().strip() or zone.name
                milli = int((zone / "temp").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if milli <= -256000:  # a zone that is switched off
                continue
            temps[name if name not in temps else f"{name}.{zone.name}"] = milli / 1000.0
        return temps
