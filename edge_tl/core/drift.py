"""Drift on the device: is what the model sees now still what it was built on?

The build records, in ``postprocess.json`` (``drift``, :class:`DriftReference`), the distribution of cheap
signals: the shipped model's calibrated top-1 score (``confidence``) and, of the preprocessed input, the mean of
each channel (``input_red``, ``input_green``, ``input_blue``: light, exposure), the red mean less the blue mean
(``input_warmth``: white balance, a colour cast, which moves red and blue apart while the scene moves them
together) and the mean absolute difference between neighbouring pixels (``input_sharpness``: focus, blur, a dirty
lens, noise). Each is kept as the edges of its deciles, so the reference holds 10 equally likely bins; a signal
with fewer than 10 distinct reference values (warmth on grey pictures: always 0) is left out. ``edge-tl serve``
keeps the last ``window`` requests of each signal (:class:`DriftMonitor`) and compares their histogram over those
bins with the reference's (10% each) by the population stability index,

    PSI = sum_i (p_i - q_i) * ln(p_i / q_i)      (p: the window's share in bin i, q = 0.1; empty bins get 0.5/n)

and flags drift when the PSI of a signal exceeds that signal's threshold (``thresholds``). The thresholds are not
a rule of thumb (0.1 / 0.25): the build simulates undrifted streams from the reference values themselves and
takes a high quantile of the largest PSI any window of a stream reaches (edge_tl.workstation.calibrate), so an
undrifted stream of thousands of requests rarely crosses one. The input signals' reference holds the training
pictures too (they describe what the camera sends, whatever the model learnt), the confidence's only
the validation pictures (the model's scores on its own training pictures are too high), so the signals' edges
are not equally precise and each has its own threshold. NumPy and pydantic only.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

CHANNELS = ("input_red", "input_green", "input_blue")
SIGNALS = ("confidence", *CHANNELS, "input_warmth", "input_sharpness")
BINS = 10


class DriftReference(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    window: int = Field(ge=20, description="requests per comparison (the rolling window)")
    thresholds: dict[str, float] = Field(description="per signal, the PSI above which it has drifted (> 0)")
    edges: dict[str, list[float]] = Field(description="per signal, the 9 inner decile edges of the reference "
                                          "values (10 equally likely bins)")
    fitted_on: str

    @model_validator(mode="before")
    @classmethod
    def _one_threshold(cls, data: object) -> object:
        """postprocess.json schema 2 kept one ``threshold`` for every signal: read it as that, per signal."""
        if isinstance(data, dict) and "threshold" in data and "thresholds" not in data:
            data = dict(data)
            one = data.pop("threshold")
            data["thresholds"] = {name: one for name in data.get("edges") or {}}
        return data

    @model_validator(mode="after")
    def _every_signal_has_a_threshold(self) -> DriftReference:
        if set(self.thresholds) != set(self.edges) or not all(t > 0 for t in self.thresholds.values()):
            raise ValueError(f"drift thresholds {self.thresholds} do not give every signal of the edges "
                             f"({sorted(self.edges)}) one threshold above 0")
        return self


def bin_shares(edges: list[float] | np.ndarray, values: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each of the bins the inner ``edges`` make (len(edges) + 1 bins)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=len(edges) + 1) / max(len(values), 1)


def _psi_of_shares(shares: np.ndarray, n: int) -> np.ndarray:
    """PSI of bin shares (last axis) of ``n`` values against equally likely bins: the one formula psi and
    stream_psis share."""
    p = np.maximum(shares, 0.5 / n)  # an empty bin: half a count, so the log is finite
    q = 1.0 / shares.shape[-1]
    return np.sum((p - q) * np.log(p / q), axis=-1)


def psi(edges: list[float] | np.ndarray, values: np.ndarray) -> float:
    """Population stability index of ``values`` against equally likely reference bins."""
    return float(_psi_of_shares(bin_shares(edges, values), max(len(values), 1)))


def stream_psis(edges: list[float] | np.ndarray, stream: np.ndarray, window: int) -> np.ndarray:
    """The PSI of every full ``window`` of a stream of values: what :class:`DriftMonitor` says after each request
    from the window-th on. Also a batch: edges (B, 9) and streams (B, L) give (B, L - window + 1). One pass: the
    bin counts of each window are differences of cumulative counts."""
    e = np.asarray(edges, dtype=np.float64)
    x = np.asarray(stream, dtype=np.float64)
    e2, x2 = np.atleast_2d(e), np.atleast_2d(x)
    idx = (x2[:, :, None] >= e2[:, None, :]).sum(axis=2)  # = searchsorted(edges, x, side="right"), as bin_shares
    counts = np.zeros((x2.shape[0], x2.shape[1] + 1, e2.shape[1] + 1))
    rows, cols = np.indices(idx.shape)
    counts[rows, cols + 1, idx] = 1.0
    counts = np.cumsum(counts, axis=1)
    out = _psi_of_shares((counts[:, window:] - counts[:, :-window]) / window, window)
    return out if x.ndim == 2 else out[0]


def decile_edges(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.quantile(np.asarray(values, dtype=np.float64), np.arange(1, BINS) / BINS)]


def input_signals(x: np.ndarray) -> dict[str, np.ndarray]:
    """The input signals of a preprocessed batch (N, C, H, W), one number per picture: each channel's mean, the red
    mean less the blue mean (3 channels) and the mean absolute difference between neighbouring pixels of the
    channel mean (across and down)."""
    x = np.asarray(x, dtype=np.float32)  # float32 with float64 sums: 0.1 ms for a 224-px picture, not 1 ms
    means = x.reshape(len(x), x.shape[1], -1).mean(axis=2, dtype=np.float64)
    out = {name: means[:, i] for i, name in enumerate(CHANNELS[:means.shape[1]])}
    if means.shape[1] == 3:
        out["input_warmth"] = means[:, 0] - means[:, 2]
    grey = x.mean(axis=1)
    out["input_sharpness"] = (np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2), dtype=np.float64)
                              + np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2), dtype=np.float64))
    return out


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
        """Per signal: its PSI over the current window (None until the window is full), whether it drifted, the
        window's fill and the signal's threshold."""
        with self._lock:
            out = {}
            for name, values in self._values.items():
                full = len(values) == self.ref.window
                value = psi(self.ref.edges[name], np.asarray(values)) if full else None
                threshold = self.ref.thresholds[name]
                out[name] = {"psi": value, "drifted": bool(full and value > threshold), "n": len(values),
                             "threshold": threshold}
            return out
