"""Drift on the device: is what the model sees now still what it was built on?

The build records, in ``postprocess.json`` (``drift``, :class:`DriftReference`), the distribution of cheap
signals on the validation split: the shipped model's calibrated top-1 score (``confidence``) and the mean of each
channel of the preprocessed input (``input_red``, ``input_green``, ``input_blue``: light, exposure, a colour cast,
which the mean over all channels can miss: a warm cast raises red as much as it lowers blue). Each is kept as
the edges of its deciles, so the reference holds 10 equally likely bins. ``edge-tl serve`` keeps the last
``window`` requests of each signal (:class:`DriftMonitor`) and compares their histogram over those bins with the
reference's (10% each) by the population stability index,

    PSI = sum_i (p_i - q_i) * ln(p_i / q_i)      (p: the window's share in bin i, q = 0.1; empty bins get 0.5/n)

and flags drift when the PSI of any signal exceeds the reference's ``threshold``. The threshold is not a rule of
thumb (0.1 / 0.25): the build draws windows of the same size from the validation signals themselves (bootstrap)
and takes a high quantile of their PSI, so an undrifted stream rarely crosses it. NumPy and pydantic only.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SIGNALS = ("confidence", "input_red", "input_green", "input_blue")
CHANNELS = SIGNALS[1:]
BINS = 10


class DriftReference(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    window: int = Field(ge=20, description="requests per comparison (the rolling window)")
    threshold: float = Field(gt=0, description="PSI above which a signal has drifted")
    edges: dict[str, list[float]] = Field(description="per signal, the 9 inner decile edges of the validation "
                                          "values (10 equally likely bins)")
    fitted_on: str


def bin_shares(edges: list[float] | np.ndarray, values: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each of the bins the inner ``edges`` make (len(edges) + 1 bins)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=len(edges) + 1) / max(len(values), 1)


def psi(edges: list[float] | np.ndarray, values: np.ndarray) -> float:
    """Population stability index of ``values`` against equally likely reference bins."""
    n = max(len(values), 1)
    p = np.maximum(bin_shares(edges, values), 0.5 / n)  # an empty bin: half a count, so the log is finite
    q = np.full_like(p, 1.0 / len(p))
    return float(np.sum((p - q) * np.log(p / q)))


def decile_edges(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.quantile(np.asarray(values, dtype=np.float64), np.arange(1, BINS) / BINS)]


def input_signals(x: np.ndarray) -> dict[str, np.ndarray]:
    """The input signals of a preprocessed batch (N, 3, H, W): each channel's mean, one number per picture."""
    means = np.asarray(x, dtype=np.float64).reshape(len(x), x.shape[1], -1).mean(axis=2)
    return {name: means[:, i] for i, name in enumerate(CHANNELS[:means.shape[1]])}


class DriftMonitor:
    """The rolling windows of one served model (thread-safe); ``observe`` after each answered picture."""

    def __init__(self, ref: DriftReference):
        self.ref = ref
        self._lock = threading.Lock()
        self._values = {s: deque(maxlen=ref.window) for s in ref.edges}
        self.seen = 0

    def observe(self, **signals: float) -> None:
        with self._lock:
            for name, value in signals.items():
                if name in self._values:
                    self._values[name].append(float(value))
            self.seen += 1

    def status(self) -> dict[str, dict[str, float | bool | int]]:
        """Per signal: its PSI over the current window (None until the window is full) and whether it drifted."""
        with self._lock:
            out = {}
            for name, values in self._values.items():
                full = len(values) == self.ref.window
                value = psi(self.ref.edges[name], np.asarray(values)) if full else None
                out[name] = {"psi": value, "drifted": bool(full and value > self.ref.threshold), "n": len(values)}
            return out
