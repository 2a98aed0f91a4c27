"""Energy from a power trace: trapezoidal integration over the samples' own timestamps.

Nothing here trusts a device's running average (jtop's ``avg`` blends the last two readings; tegrastats'
average covers its whole lifetime): power is integrated over time between two ``time.monotonic_ns()``
marks, with the trace linearly interpolated at the marks. mW x s = mJ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_tl.device.power.base import PowerSample


@dataclass
class WindowPower:
    """Power over one time window [t0, t1]."""

    duration_s: float
    sample_count: int  #: samples strictly inside the window
    rate_hz: float | None  #: measured sampling rate inside the window
    mean_mw: float  #: time-weighted mean (energy / duration)
    peak_mw: float
    energy_mj: float
    coverage: float  #: fraction of the window that lies between the first and last sample (1.0 = covered)
    rails_mean_mw: dict[str, float] = field(default_factory=dict)


def _integrate(t_s: np.ndarray, p: np.ndarray, t0: float, t1: float) -> tuple[float, np.ndarray, np.ndarray]:
    inside = (t_s > t0) & (t_s < t1)
    x = np.concatenate(([t0], t_s[inside], [t1]))
    y = np.interp(x, t_s, p)  # clamps to the edge values outside the trace
    return float(np.sum((y[1:] + y[:-1]) * 0.5 * np.diff(x))), x, y


def integrate_mj(samples: Sequence[PowerSample], t0_ns: int, t1_ns: int, rail: str | None = None) -> float:
    """Energy in mJ between two monotonic-ns marks (total power, or one ``rail``)."""
    if not samples or t1_ns <= t0_ns:
        return 0.0
    t = np.array([s.t_ns for s in samples], dtype=np.float64) / 1e9
    p = np.array([s.total_mw if rail is None else s.rails_mw.get(rail, 0.0) for s in samples], dtype=np.float64)
    return _integrate(t, p, t0_ns / 1e9, t1_ns / 1e9)[0]


def window_power(samples: Sequence[PowerSample], t0_ns: int, t1_ns: int) -> WindowPower | None:
    """Mean, peak, energy and per-rail means over [t0, t1]; None when there is no sample at all."""
    if not samples or t1_ns <= t0_ns:
        return None
    t = np.array([s.t_ns for s in samples], dtype=np.float64) / 1e9
    p = np.array([s.total_mw for s in samples], dtype=np.float64)
    t0, t1 = t0_ns / 1e9, t1_ns / 1e9
    duration = t1 - t0
    energy, _x, y = _integrate(t, p, t0, t1)
    inside = (t > t0) & (t < t1)
    n = int(inside.sum())
    rate = (n - 1) / float(t[inside][-1] - t[inside][0]) if n >= 2 and t[inside][-1] > t[inside][0] else None
    covered = max(0.0, min(t1, float(t[-1])) - max(t0, float(t[0])))
    rails: dict[str, float] = {}
    for name in sorted({k for s in samples for k in s.rails_mw}):
        rp = np.array([s.rails_mw.get(name, 0.0) for s in samples], dtype=np.float64)
        rails[name] = _integrate(t, rp, t0, t1)[0] / duration
    return WindowPower(duration_s=duration, sample_count=n, rate_hz=rate, mean_mw=energy / duration,
                       peak_mw=float(y.max()), energy_mj=energy, coverage=covered / duration, rails_mean_mw=rails)


def measured_rate_hz(samples: Sequence[PowerSample]) -> float | None:
    if len(samples) < 2 or samples[-1].t_ns <= samples[0].t_ns:
        return None
    return (len(samples) - 1) / ((samples[-1].t_ns - samples[0].t_ns) / 1e9)
