"""Power service: the power sources of :mod:`edge_tl.device.power`, reading sysfs under the facts' ``root``."""

from __future__ import annotations

from pathlib import Path

from edge_tl.device.power import PowerSampler, select_sampler


class Power:
    def __init__(self, root: str | Path = "/"):
        self.root = Path(root)

    def sampler(self, kind: str = "auto", *, rate_hz: float = 20.0, interval_ms: int | None = None) -> PowerSampler:
        """A STARTED sampler of ``kind`` (see :func:`edge_tl.device.power.select_sampler`)."""
        return select_sampler(kind, root=self.root, rate_hz=rate_hz, interval_ms=interval_ms)
