"""Calibration of the shipped model's scores: temperature scaling (Guo et al., "On Calibration of Modern Neural
Networks", ICML 2017) and the expected calibration error.

The build fits one temperature T on the validation split's logits of the shipped model (INT8 Q/DQ evaluated in
float, as TensorRT computes it) by minimising the negative log-likelihood of ``softmax(logits / T)`` (SciPy's
bounded scalar minimiser on log T), measures the ECE on the test split before (T = 1) and after, and stores T in
the bundle's ``postprocess.json`` (edge_tl.core.postprocess), which ``infer`` and ``serve`` apply without torch.
Dividing the logits by one positive number changes no prediction, only the confidence.

The fitted T ships only where it helps beyond noise: 5-fold cross-validation on the validation split (T fitted on
four folds, the NLL of the fifth at that T against T = 1, every image held out once) gives a per-image NLL gain
whose 95% bootstrap interval must lie above 0, the fit must not sit at its search bound, and at least one
validation image must be wrong (with none, the NLL falls without end as T shrinks). Otherwise T = 1 is
kept and the report says why: on 24 validation images a fitted T = 0.259 took a user's test NLL from 0.49 to 0.89
and scored a horse "astronaut" at 0.999997 (issue 23).

ECE: the test images are put into ``bins`` equal-width bins by their top-1 score; ECE = sum over bins of
(images in bin / all images) * |accuracy in bin - mean top-1 score in bin| (Naeini et al., AAAI 2015; Guo et al.
use 15 bins, as here by default).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_tl.core.drift import BINS, DriftReference, decile_edges, stream_psis
from edge_tl.core.postprocess import OODRule, ood_scores, softmax

ECE_BINS = 15
#: the temperature is searched on a log scale in exp(-5) .. exp(5), i.e. 0.0067 .. 148
LOG_T_BOUNDS = (-5.0, 5.0)
#: cross-validation of the fit: folds, bootstrap resamples of the per-image gains, seed
CV_FOLDS, CV_RESAMPLES, CV_SEED = 5, 2000, 0


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under ``softmax(logits / temperature)`` (float64)."""
    return float(per_image_nll(logits, labels, temperature).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the NLL of ``softmax(logits / T)`` on (logits, labels)."""
    from scipy.optimize import minimize_scalar

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need (N, C) logits and N labels, got {logits.shape} and {labels.shape}")
    res = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def per_image_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per image, the negative log-likelihood of the true class under ``softmax(logits / temperature)``
    (float64; the largest logit subtracted first, so large logits do not overflow)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(labels)), np.asarray(labels)]


def at_bound(temperature: float) -> bool:
    """The fit stopped at an end of its search range (the NLL kept falling: separable or degenerate logits)."""
    return min(abs(np.log(temperature) - b) for b in LOG_T_BOUNDS) < 1e-3


def cv_gain(logits: np.ndarray, labels: np.ndarray, folds: int = CV_FOLDS, seed: int = CV_SEED) -> dict[str, Any]:
    """Cross-validated NLL gain of temperature scaling over T = 1: per image, NLL at T = 1 minus NLL at the T fitted
    on the other folds (every image held out once); the mean and its 95% bootstrap interval."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    n = len(labels)
    k = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    gains = np.empty(n)
    for f in range(k):
        held = order[f::k]
        rest = np.setdiff1d(order, held)
        t = fit_temperature(logits[rest], labels[rest])
        gains[held] = per_image_nll(logits[held], labels[held]) - per_image_nll(logits[held], labels[held], t)
    rng = np.random.default_rng(seed)
    means = np.array([gains[rng.integers(0, n, n)].mean() for _ in range(CV_RESAMPLES)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"folds": k, "mean": float(gains.mean()), "ci95": [float(lo), float(hi)]}


def choose_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, Any]]:
    """The temperature to ship and why: the fit on all of (logits, labels) where it helps held-out images beyond
    noise (:func:`cv_gain`'s interval above 0) and is not at its bound; else 1."""
    fitted = fit_temperature(logits, labels)
    gain = cv_gain(logits, labels) if len(labels) >= 2 else {"folds": 0, "mean": 0.0, "ci95": [0.0, 0.0]}
    # Every image right: the NLL falls without end as T shrinks (each image's loss goes to 0), so the minimiser
    # stops wherever float64 rounds the loss to 0, not at its bound, and every held-out fold "gains" too. On a
    # photo continual build (16 validation photos, all right, NLL 0.11 at T = 1) that gave T = 0.016: test NLL
    # 0.17 -> 3.86, and the continual gate's log-loss evidence -18.8 nats. How sharp the scores should be is set by
    # the errors, and there are none.
    all_right = bool((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).all())
    if at_bound(fitted) or all_right:
        why = (f"every validation image is right (NLL {nll(logits, labels):.2g} at T = 1 keeps falling as T "
               "shrinks: any T < 1 'improves' it)" if all_right else
               f"the fit stopped at its search bound (T = {fitted:.3g})")
        why += ": the validation logits give no usable temperature, so T = 1 is kept"
        return 1.0, {"temperature_fitted": fitted, "cv_nll_gain": gain, "kept_t1": True, "decision": why}
    if gain["ci95"][0] <= 0:
        why = (f"the fitted T = {fitted:.3f} does not improve held-out NLL beyond noise ({gain['folds']}-fold "
               f"cross-validation on {len(labels)} validation images: gain {gain['mean']:+.3f}, 95% CI "
               f"{gain['ci95'][0]:+.3f} to {gain['ci95'][1]:+.3f}), so T = 1 is kept")
        return 1.0, {"temperature_fitted": fitted, "cv_nll_gain": gain, "kept_t1": True, "decision": why}
    why = (f"T = {fitted:.3f} improves held-out NLL by {gain['mean']:.3f} ({gain['folds']}-fold cross-validation, "
           f"95% CI {gain['ci95'][0]:+.3f} to {gain['ci95'][1]:+.3f})")
    return fitted, {"temperature_fitted": fitted, "cv_nll_gain": gain, "kept_t1": False, "decision": why}


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Per equal-width confidence bin: images, accuracy and mean confidence (top-1 score); and the ECE."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = pred == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)  # bin i: (edges[i], edges[i+1]]
    count = np.bincount(which, minlength=bins)
    acc = np.bincount(which, weights=correct, minlength=bins) / np.maximum(count, 1)
    mean_conf = np.bincount(which, weights=conf, minlength=bins) / np.maximum(count, 1)
    ece = float((count / max(len(labels), 1) * np.abs(acc - mean_conf)).sum())
    return {"bins": bins, "edges": edges.tolist(), "count": count.tolist(), "accuracy": acc.tolist(),
            "confidence": mean_conf.tolist(), "ece": ece}


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width bins of the top-1 score."""
    return reliability(probs, labels, bins)["ece"]


def ece_bootstrap(logits: np.ndarray, labels: np.ndarray, temperature: float, bins: int = ECE_BINS,
                  resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """95% paired-bootstrap intervals (percentile; test images resampled, seeded) of the ECE before (T = 1), after
    (``temperature``) and of their difference (before - after)."""
    before, after = softmax(logits), softmax(np.asarray(logits, dtype=np.float64) / temperature)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, 2))
    for i in range(resamples):
        idx = rng.integers(0, len(labels), len(labels))
        draws[i] = ece(before[idx], labels[idx], bins), ece(after[idx], labels[idx], bins)
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
    dlo, dhi = np.percentile(draws[:, 0] - draws[:, 1], [2.5, 97.5])
    return {"ece_before_ci95": [float(lo[0]), float(hi[0])], "ece_after_ci95": [float(lo[1]), float(hi[1])],
            "ece_diff_ci95": [float(dlo), float(dhi)]}


def calibrate(val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray, test_labels: np.ndarray,
              bins: int = ECE_BINS) -> dict[str, Any]:
    """Choose T on validation (:func:`choose_temperature`); ECE and NLL on test before (T = 1) and after. What the
    shipped model's stage records."""
    t, why = choose_temperature(val_logits, val_labels)
    before, after = softmax(test_logits), softmax(np.asarray(test_logits, dtype=np.float64) / t)
    rb, ra = reliability(before, test_labels, bins), reliability(after, test_labels, bins)
    fitted_on = "validation split, NLL, INT8 Q/DQ in float" + (
        ": T = 1 kept (the fit gave no held-out gain beyond noise)" if why["kept_t1"] else "; 5-fold CV gain")
    return {"temperature": t, "fitted_on": fitted_on, "ece_bins": bins,
            "val_images": int(len(val_labels)), "test_images": int(len(test_labels)),
            "ece_before": rb["ece"], "ece_after": ra["ece"],
            "nll_before": nll(test_logits, test_labels), "nll_after": nll(test_logits, test_labels, t),
            "val_nll_before": nll(val_logits, val_labels), "val_nll_after": nll(val_logits, val_labels, t),
            **ece_bootstrap(test_logits, test_labels, t, bins), "reliability_before": rb, "reliability_after": ra,
            **why}


def fit_ood_rule(val_logits: np.ndarray, score: str, keep: float, temperature: float = 1.0) -> OODRule:
    """The OOD threshold that keeps ``keep`` of the validation images: the score of the ``floor((1 - keep) * n)``-th
    lowest one (all of them at keep = 1). Few validation images make it coarse: 21 images at 0.95 put it at the
    lowest score."""
    scores = np.sort(ood_scores(val_logits, score, temperature))
    n = len(scores)
    if n == 0:
        raise ValueError("no validation logits to fit the OOD threshold on")
    k = min(int(np.floor((1.0 - keep) * n)), n - 1)
    kept = float(np.mean(scores >= scores[k]))
    return OODRule(score=score, threshold=round(float(scores[k]), 6), in_distribution_kept=round(kept, 4),
                   fitted_on=f"{n} validation images, the shipped INT8 model (Q/DQ in float), {100 * keep:g}% kept")


#: the drift thresholds: an undrifted stream of DRIFT_STREAM requests crosses one (any signal, any window) with
#: probability DRIFT_FALSE_ALARM, estimated from DRIFT_BOOT simulated streams per signal
DRIFT_STREAM = 2000
DRIFT_FALSE_ALARM = 0.01
DRIFT_BOOT = 2000


def fit_drift_reference(signals: dict[str, np.ndarray], window: int, variety: int, seed: int = 0) -> DriftReference:
    """The reference of serve's drift check (edge_tl.core.drift): each signal's decile edges, and its PSI
    threshold. Signals may hold different numbers of reference values (the input statistics: training and
    validation pictures; the confidence: validation only); one with fewer than BINS distinct values is left out.

    An undrifted stream is simulated as serve sees it: a bootstrap redraws the reference (its edges come from a
    few hundred values at most, and are noisy too), draws a field of ``variety`` distinct pictures from the same
    values (a camera's stream repeats what it sees: the build assumes no more variety than the validation split
    has), and streams DRIFT_STREAM requests from that field through a sliding window of ``window``; the largest
    PSI over the stream is its statistic (serve compares at every request, so thousands of correlated
    comparisons). Each signal's threshold is the 1 - DRIFT_FALSE_ALARM / k quantile of that statistic (k signals,
    Bonferroni): an undrifted stream of DRIFT_STREAM requests flags with probability DRIFT_FALSE_ALARM at most."""
    rng = np.random.default_rng(seed)
    vals = {k: np.asarray(v, dtype=np.float64) for k, v in signals.items()}
    flat = sorted(k for k, v in vals.items() if len(np.unique(v)) < BINS)  # e.g. warmth on grey pictures: all 0
    vals = {k: v for k, v in vals.items() if k not in flat}
    if not vals:
        raise ValueError(f"every drift signal ({', '.join(flat)}) has fewer than {BINS} distinct values")
    n = min(len(v) for v in vals.values())
    if n < 20 or variety < 20:
        raise ValueError(f"{min(n, variety)} validation images are too few for a drift reference (20 or more)")
    length = max(DRIFT_STREAM, 2 * window)
    q = 1.0 - DRIFT_FALSE_ALARM / len(vals)
    chunk = max(1, 400_000 // length)  # streams simulated at once (memory: chunk x length x 10 counts, 32 MB)
    thresholds = {}
    for name, v in vals.items():
        worst = []
        for start in range(0, DRIFT_BOOT, chunk):
            b = min(chunk, DRIFT_BOOT - start)
            edges = np.quantile(v[rng.integers(0, len(v), (b, len(v)))], np.arange(1, BINS) / BINS, axis=1).T
            fields = v[rng.integers(0, len(v), (b, variety))]
            streams = np.take_along_axis(fields, rng.integers(0, variety, (b, length)), axis=1)
            worst.append(stream_psis(edges, streams, window).max(axis=1))
        thresholds[name] = round(float(np.quantile(np.concatenate(worst), q)), 6)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in vals.items())
    return DriftReference(window=window, thresholds=thresholds, edges={k: decile_edges(v) for k, v in vals.items()},
                          fitted_on=f"reference values per signal: {sizes} (the shipped INT8 model's calibrated "
                                    f"top-1 score on the validation images; the input statistics of the "
                                    f"preprocessed training and validation images); thresholds: an undrifted "
                                    f"stream of {length} requests from {variety} distinct pictures flags with "
                                    f"probability {DRIFT_FALSE_ALARM:g} ({DRIFT_BOOT} simulated streams a signal)"
                                    + (f"; left out, fewer than {BINS} distinct values: {', '.join(flat)}"
                                       if flat else ""))


def summary_line(cal: dict[str, Any]) -> str:
    """One line for the build's console and the report."""
    chosen = (f"temperature 1 kept ({cal['decision']})" if cal.get("kept_t1") else
              f"temperature {cal['temperature']:.3f} (fitted on {cal['val_images']} validation images, NLL"
              + (f"; {cal['decision']}" if cal.get("decision") else "") + ")")
    return (f"calibration: {chosen}; test ECE ({cal['ece_bins']} bins) {100 * cal['ece_before']:.2f}% before, "
            f"{100 * cal['ece_after']:.2f}% after; test NLL {cal['nll_before']:.3f} -> {cal['nll_after']:.3f}")


def reliability_plot(cal: dict[str, Any], path: Any) -> None:
    """The reliability diagram (accuracy against confidence per bin, before and after) as a PNG."""
    from edge_tl.core.importer import require

    mpl = require("matplotlib", "the build report's plots")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharey=True)
    for ax, key, title in ((axes[0], "reliability_before", "before (T = 1)"),
                           (axes[1], "reliability_after", f"after (T = {cal['temperature']:.2f})")):
        r = cal[key]
        edges, count = np.asarray(r["edges"]), np.asarray(r["count"])
        mids, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        filled = count > 0
        ax.bar(mids[filled], np.asarray(r["accuracy"])[filled], width=width * 0.95, color="tab:blue",
               edgecolor="k", label="accuracy")
        ax.bar(mids[filled], (np.asarray(r["confidence"]) - np.asarray(r["accuracy"]))[filled],
               bottom=np.asarray(r["accuracy"])[filled], width=width * 0.95, color="tab:red", alpha=0.35,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlabel="confidence (top-1 score)", xlim=(0, 1), ylim=(0, 1),
               title=f"{title}: ECE {100 * r['ece']:.2f}%")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Shipped INT8 model, test split, {cal['ece_bins']} bins", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_section(cal: dict[str, Any] | None, plots: Any) -> list[str]:
    """The report's calibration section (markdown lines); draws ``plots/reliability.png``."""
    from pathlib import Path

    if not cal:
        return []
    reliability_plot(cal, Path(plots) / "reliability.png")
    return ["", "## Calibration (shipped INT8 model)", "",
            f"Temperature **{cal['temperature']:.3f}**: " + (cal.get("decision") or "fitted") + ". Fitted on the "
            f"{cal['val_images']} validation images by minimising the negative log-likelihood (temperature scaling; "
            "it ships only where 5-fold cross-validation shows a held-out gain beyond noise), stored in the "
            "bundle's `postprocess.json`: `edge-tl infer` and `serve` report `softmax(logits / T)`. It changes no "
            "prediction.",
            "", f"| test split | ECE ({cal['ece_bins']} bins{', 95% CI' if 'ece_before_ci95' in cal else ''}) | NLL |",
            "|---|---|---|",
            f"| before (T = 1) | {_ece(cal, 'before')} | {cal['nll_before']:.3f} |",
            f"| after (T = {cal['temperature']:.3f}) | {_ece(cal, 'after')} | {cal['nll_after']:.3f} |", "",
            *([f"ECE before - after: 95% paired-bootstrap interval {100 * cal['ece_diff_ci95'][0]:+.2f} to "
               f"{100 * cal['ece_diff_ci95'][1]:+.2f} points (2000 resamples of the test images)."]
              if "ece_diff_ci95" in cal else []),
            "", "![reliability diagram](plots/reliability.png)"]


def _ece(cal: dict[str, Any], when: str) -> str:
    ci = cal.get(f"ece_{when}_ci95")
    return f"{100 * cal[f'ece_{when}']:.2f}%" + (f" ({100 * ci[0]:.2f}–{100 * ci[1]:.2f})" if ci else "")
