"""Pick a power source by name or automatically, and say why the others could not be used."""

from __future__ import annotations

from pathlib import Path

from edge_tl.core.errors import EdgeTLError
from edge_tl.device.power.base import NoPower, PowerSampler, PowerUnavailable

KINDS = ("auto", "ina3221", "jtop", "tegrastats", "nvml", "none")

#: auto order: the INA3221 files first (the same sensors jtop and tegrastats read, at our own rate and
#: without a daemon), then the jtop service, a tegrastats process, and NVML for a discrete GPU.
AUTO_ORDER = ("ina3221", "jtop", "tegrastats", "nvml")


def make_sampler(kind: str, *, root: str | Path = "/", rate_hz: float = 20.0, interval_ms: int | None = None,
                 tegrastats: str = "tegrastats") -> PowerSampler:
    """An un-started sampler of ``kind``."""
    if kind == "ina3221":
        from edge_tl.device.power.ina3221 import Ina3221Sampler

        return Ina3221Sampler(root=root, rate_hz=rate_hz)
    if kind == "tegrastats":
        from edge_tl.device.power.tegrastats import TegrastatsSampler

        return TegrastatsSampler(interval_ms=interval_ms or int(round(1000 / rate_hz)), executable=tegrastats)
    if kind == "jtop":
        from edge_tl.device.power.services import JtopSampler

        return JtopSampler(rate_hz=rate_hz)
    if kind == "nvml":
        from edge_tl.device.power.services import NvmlSampler

        return NvmlSampler(rate_hz=rate_hz)
    if kind == "none":
        return NoPower()
    raise EdgeTLError(f"unknown power source '{kind}'", f"choose one of: {', '.join(KINDS)}")


def select_sampler(kind: str = "auto", *, root: str | Path = "/", rate_hz: float = 20.0,
                   interval_ms: int | None = None, tegrastats: str = "tegrastats") -> PowerSampler:
    """A STARTED sampler (call ``stop()`` when done).

    ``kind="auto"`` tries :data:`AUTO_ORDER` and returns the first that starts; when none does it returns
    :class:`NoPower` whose ``reason`` lists why each failed. A named ``kind`` that cannot start raises
    :class:`PowerUnavailable` (an explicit request is never silently replaced by another source).
    Every sampler gets ``selection_notes``: the reasons the sources tried before it were refused.
    """
    if kind not in KINDS:
        raise EdgeTLError(f"unknown power source '{kind}'", f"choose one of: {', '.join(KINDS)}")
    opts = {"root": root, "rate_hz": rate_hz, "interval_ms": interval_ms, "tegrastats": tegrastats}
    if kind != "auto":
        sampler = make_sampler(kind, **opts).start()
        sampler.selection_notes = []
        return sampler
    notes: list[str] = []
    for candidate in AUTO_ORDER:
        try:
            sampler = make_sampler(candidate, **opts).start()
        except PowerUnavailable as exc:
            notes.append(f"{candidate}: {exc.problem}")
            continue
        sampler.selection_notes = notes
        return sampler
    none = NoPower("no power source found (" + "; ".join(notes) + ")")
    none.selection_notes = notes
    return none
