"""Honest uncertainty for accuracies measured on a finite test split (workstation side; scipy).

- :func:`wilson`: 95 % Wilson score interval of one accuracy (``scipy.stats.binomtest(...).proportion_ci``).
- :func:`paired`: two models scored on the *same* images: the exact McNemar test (a two-sided binomial test on
  the discordant images, ``scipy.stats.binomtest``) and a paired-bootstrap 95 % interval of the difference in
  points (seeded, so the same predictions always give the same interval).
- :func:`paired_mean`: the same for a per-image score (a log-loss): a paired-bootstrap interval of the mean
  difference and the Wilcoxon signed-rank test.
- :func:`verdict`: "met", "missed" or "not distinguishable from the target at this test size", from an
  interval and a limit.

With 400 test images one image moves an accuracy by 0.25 points; a 1-point difference between two stages is
often within what the test split can resolve, and the report says so instead of a yes/no.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edge_tl.core.importer import require

MET, MISSED, UNSURE = "met", "missed", "not distinguishable from the target at this test size"


def wilson(correct: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval of ``correct / total``, as fractions 0..1."""
    if total <= 0:
        return (0.0, 1.0)
    stats = require("scipy.stats", "confidence intervals in the build report")
    ci = stats.binomtest(int(correct), int(total)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass
class Paired:
    """Model A against model B on the same images (difference = A - B, in points)."""

    n: int
    a_only: int  # images A gets right and B wrong
    b_only: int
    diff_points: float
    ci_points: tuple[float, float]
    mcnemar_p: float

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        lo, hi = self.ci_points
        return (f"{self.diff_points:+.2f} points [95% CI {lo:+.2f}, {hi:+.2f}]; McNemar exact p = {self.mcnemar_p:.3g} "
                f"({self.a_only} vs {self.b_only} discordant of {self.n})")


def paired(a_correct: np.ndarray, b_correct: np.ndarray, *, boot: int = 4000, seed: int = 0,
           level: float = 0.95) -> Paired:
    """Exact McNemar test and paired-bootstrap interval of accuracy(A) - accuracy(B) on the same images."""
    a = np.asarray(a_correct, dtype=bool).reshape(-1)
    b = np.asarray(b_correct, dtype=bool).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired comparison needs two equal, non-empty sets of results ({a.shape} vs {b.shape})")
    stats = require("scipy.stats", "paired tests in the build report")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if a_only + b_only == 0 else float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)
    d = a.astype(np.int8) - b.astype(np.int8)
    return Paired(int(d.size), a_only, b_only, float(100.0 * d.mean()), _bootstrap(d, 100.0, boot, seed, level), p)


def _bootstrap(d: np.ndarray, scale: float, boot: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile interval of ``scale * mean(d)`` over ``boot`` resamples of the images (seeded)."""
    idx = np.random.default_rng(seed).integers(0, d.size, size=(boot, d.size))
    means = scale * d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = (float(v) for v in np.quantile(means, [alpha, 1 - alpha]))
    return lo, hi


@dataclass
class PairedMean:
    """A per-image score of model A against model B on the same images (difference = mean of A - B)."""

    n: int
    diff: float
    ci: tuple[float, float]
    wilcoxon_p: float  # two-sided Wilcoxon signed-rank test of the per-image differences (1.0 when all are 0)

    def as_dict(self) -> dict:
        return asdict(self)


def paired_mean(a: np.ndarray, b: np.ndarray, *, boot: int = 4000, seed: int = 0, level: float = 0.95) -> PairedMean:
    """Paired-bootstrap interval of mean(A - B) for a per-image score (e.g. a log-loss), and the Wilcoxon
    signed-rank test of the differences (``scipy.stats.wilcoxon``); the same resampling as :func:`paired`."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"paired comparison needs two equal, non-empty sets of finite scores ({a.shape} vs {b.shape})")
    stats = require("scipy.stats", "paired tests in the build report")
    d = a - b
    p = 1.0 if not np.any(d) else float(stats.wilcoxon(d).pvalue)
    return PairedMean(int(d.size), float(d.mean()), _bootstrap(d, 1.0, boot, seed, level), p)


def verdict(low: float, high: float, limit: float, *, at_most: bool) -> str:
    """Judge an interval [low, high] against ``limit``: ``at_most`` means the target is value <= limit."""
    if at_most:
        return MET if high <= limit else MISSED if low > limit else UNSURE
    return MET if low >= limit else MISSED if high < limit else UNSURE


#: how :func:`chance_check` decides (recorded with every check)
CHANCE_METHOD = ("one-sided exact binomial test (scipy.stats.binomtest, alternative='greater') of the correct "
                 "validation images against the better of chance (1/classes) and always answering the training "
                 "set's majority class, at 5% divided by the epochs the best one was picked from (Bonferroni)")


def chance_check(val_top1: float, val_labels: np.ndarray, train_labels: np.ndarray, n_classes: int,
                 picked_from: int = 1, alpha: float = 0.05) -> dict:
    """Is a trained model's validation accuracy better than guessing, beyond noise?

    The baseline is the better of chance (``1 / n_classes``) and always answering the majority class of the
    training set (its accuracy on these validation images). ``passed`` is True when a one-sided exact binomial
    test rejects "accuracy <= baseline" at ``alpha / picked_from``. The validation accuracy is the best of
    ``picked_from`` epochs scored on the same images, so it leans high (a net at chance on 8 validation images
    scored 7/8 at its best of 2 epochs); the Bonferroni division keeps the chance of calling a guessing model
    better than guessing below ``alpha`` whichever epoch was kept.
    """
    val = np.asarray(val_labels).reshape(-1)
    train = np.asarray(train_labels).reshape(-1)
    n = int(val.size)
    chance = 1.0 / max(int(n_classes), 1)
    majority = int(np.bincount(train, minlength=n_classes).argmax()) if train.size else 0
    majority_top1 = float((val == majority).mean()) if n else 0.0
    baseline = max(chance, majority_top1)
    correct = int(round(float(val_top1) * n))
    if n == 0:
        p = 1.0
    else:
        stats = require("scipy.stats", "the build's check against chance")
        p = float(stats.binomtest(correct, n, min(baseline, 1.0), alternative="greater").pvalue)
    level = alpha / max(int(picked_from), 1)
    return {"passed": bool(p < level), "val_top1": float(val_top1), "val_correct": correct, "val_images": n,
            "chance": chance, "majority_class": majority, "majority_top1": majority_top1, "baseline": baseline,
            "p_value": p, "alpha": alpha, "picked_from_epochs": max(int(picked_from), 1), "level": level,
            "method": CHANCE_METHOD}
