"""Accuracy against measured latency (and MACs) of pruned variants of one build: the Pareto report (issue 13 item 4).

Each point is one pruned + recovered model (``prune.target = {macs = ...}`` or ``{latency_ms = ...}``) with its
test top-1 and 95% Wilson interval, its MACs and its batch-1 ONNX Runtime CPU latency. Latencies of all points
are measured in ONE interleaved session (:func:`measure_interleaved`: round-robin over the models, the fastest
per-round median, pinned intra-op threads), so drift on a shared machine hits every model alike.
:func:`margins` compares latency-targeted against MACs-targeted pruning at the same level on the same test images
(paired bootstrap interval, exact McNemar; :func:`edge_tl.workstation.stats.paired`).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge_tl.core.importer import require


@dataclass
class ParetoPoint:
    method: str  # "unpruned" | "macs" | "latency"
    level: str  # which target this is (e.g. "a", "b", "c": the latency run aims at the MACs run's latency)
    seed: int
    target: str  # what was asked, in words ("50% MACs", "0.180 ms ort-cpu")
    correct: np.ndarray = field(repr=False)  # per test image: right or wrong
    macs: int = 0
    onnx: Path | None = None
    latency_ms: float | None = None  # measured, interleaved
    target_ms: float | None = None
    ci: tuple[float, float] = (0.0, 0.0)

    @property
    def top1(self) -> float:
        return float(np.mean(self.correct))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["correct"] = [int(v) for v in self.correct]
        d["onnx"] = str(self.onnx) if self.onnx else None
        d["top1"] = self.top1
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ParetoPoint:
        keep = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        keep["correct"] = np.asarray(d["correct"], dtype=bool)
        keep["onnx"] = Path(d["onnx"]) if d.get("onnx") else None
        keep["ci"] = tuple(d.get("ci", (0.0, 0.0)))
        return cls(**keep)


def with_intervals(points: list[ParetoPoint]) -> list[ParetoPoint]:
    from edge_tl.workstation.stats import wilson

    for p in points:
        p.ci = wilson(int(p.correct.sum()), int(p.correct.size))
    return points


def measure_interleaved(paths: list[Path], size: tuple[int, int], *, threads: int = 1, rounds: int = 7,
                        iters: int = 100, warmup: int = 20) -> list[float]:
    """Batch-1 ONNX Runtime CPU latency (ms) of each model: ``rounds`` round-robin passes of ``iters`` timed runs
    per model (one warm-up per session), the fastest of the per-round medians (other work on a shared machine
    only adds time; the least disturbed round is the best estimate)."""
    from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner

    h, w = size
    x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
    runners = [OnnxRuntimeRunner.from_path(p, "ort-cpu", intra_op_threads=threads) for p in paths]
    per: list[list[float]] = [[] for _ in paths]
    try:
        for r in runners:
            r.activate()
            feed = {r.get_input_metadata()[0].name: x}
            for _ in range(warmup):
                r.infer(feed)
        for _ in range(rounds):
            for i, r in enumerate(runners):
                feed = {r.get_input_metadata()[0].name: x}
                times = []
                for _ in range(iters):
                    r.infer(feed)
                    times.append(r.last_inference_ns / 1e6)
                per[i].append(statistics.median(times))
    finally:
        for r in runners:
            if r.is_active:
                r.deactivate()
    return [float(min(v)) for v in per]


EQUAL_LATENCY = 0.10  # two models measured within 10% of each other in one session count as "equal latency"


def margins(points: list[ParetoPoint]) -> list[dict]:
    """Latency-targeted minus MACs-targeted top-1 at each (seed, level), with the paired interval, and whether the
    two were at equal latency when measured side by side (:data:`EQUAL_LATENCY`)."""
    from edge_tl.workstation.stats import paired

    out = []
    by = {(p.seed, p.level, p.method): p for p in points}
    for (seed, level, method), lat in sorted(by.items()):
        mac = by.get((seed, level, "macs"))
        if method != "latency" or mac is None:
            continue
        pr = paired(lat.correct, mac.correct)
        equal = (lat.latency_ms is not None and mac.latency_ms is not None
                 and abs(lat.latency_ms / mac.latency_ms - 1) <= EQUAL_LATENCY)
        out.append({"seed": seed, "level": level, "diff_points": pr.diff_points, "ci_points": pr.ci_points,
                    "mcnemar_p": pr.mcnemar_p, "latency_ms": lat.latency_ms, "macs_latency_ms": mac.latency_ms,
                    "equal_latency": equal})
    return out


def pooled_margin(points: list[ParetoPoint]) -> dict | None:
    """Latency-targeted minus MACs-targeted top-1 over every pair at equal latency together, two ways: pooled over
    the images of all pairs (paired bootstrap and exact McNemar, as for one pair), and the mean of the per-pair
    margins with its Student t 95% interval (each pair is one unit: it takes in how much the recovery moves from
    one pruned network to the next, which the pooled images do not). None without such a pair."""
    from edge_tl.workstation.stats import paired

    by = {(p.seed, p.level, p.method): p for p in points}
    rows = [r for r in margins(points) if r["equal_latency"]]
    if not rows:
        return None
    lat = np.concatenate([by[(r["seed"], r["level"], "latency")].correct for r in rows])
    mac = np.concatenate([by[(r["seed"], r["level"], "macs")].correct for r in rows])
    pr = paired(lat, mac)
    d = np.array([r["diff_points"] for r in rows], dtype=float)
    out = {"pairs": len(rows), "images": pr.n, "pooled_points": pr.diff_points, "pooled_ci_points": pr.ci_points,
           "pooled_mcnemar_p": pr.mcnemar_p, "mean_points": float(d.mean()), "mean_ci_points": None}
    if len(d) > 1:
        stats = require("scipy.stats", "the Pareto report's interval over pairs")
        half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
        out["mean_ci_points"] = (float(d.mean()) - half, float(d.mean()) + half)
    return out


def table(points: list[ParetoPoint]) -> str:
    lines = ["| seed | pruning | target | top-1 [95% Wilson] | MACs | ORT CPU latency (ms) | vs target |",
             "|---|---|---|---|---:|---:|---:|"]
    for p in sorted(points, key=lambda q: (q.seed, q.method != "unpruned", q.level, q.method)):
        off = (f"{100 * (p.latency_ms / p.target_ms - 1):+.1f}%" if p.target_ms and p.latency_ms else "")
        lat = f"{p.latency_ms:.4f}" if p.latency_ms is not None else "-"
        lo, hi = p.ci
        lines.append(f"| {p.seed} | {p.method} | {p.target} | {100 * p.top1:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}] | "
                     f"{p.macs / 1e6:.2f} M | {lat} | {off} |")
    return "\n".join(lines)


def figure(points: list[ParetoPoint], path: str | Path) -> Path:
    """Two panels: top-1 (Wilson bars) against measured latency and against MACs, one marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_tl.core.fsutil import atomic_file

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    style = {"unpruned": ("k", "s"), "macs": ("tab:blue", "o"), "latency": ("tab:orange", "^")}
    for method, (color, marker) in style.items():
        pts = [p for p in points if p.method == method and p.latency_ms is not None]
        if not pts:
            continue
        y = np.array([100 * p.top1 for p in pts])
        err = np.array([[100 * (p.top1 - p.ci[0]) for p in pts], [100 * (p.ci[1] - p.top1) for p in pts]])
        for ax, xs in ((axes[0], [p.latency_ms for p in pts]), (axes[1], [p.macs / 1e6 for p in pts])):
            ax.errorbar(xs, y, yerr=err, fmt=marker, color=color, label=f"{method}-targeted" if method != "unpruned"
                        else "unpruned", capsize=3, alpha=0.8)
    axes[0].set_xlabel("ONNX Runtime CPU latency, batch 1 (ms, median)")
    axes[1].set_xlabel("MACs (M)")
    axes[0].set_ylabel("test top-1 (%), 95% Wilson")
    axes[0].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
