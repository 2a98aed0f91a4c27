"""The negative-transfer guard: is the pretrained start better than training from scratch, beyond noise?

The build trains the same network twice on the same images: from the pretrained weights (stage ``finetune``)
and from random weights (stage ``scratch``). Both are scored on the same validation images, so the comparison
is paired. :func:`transfer_verdict` decides:

- ``helps``: a one-sided exact McNemar test (``scipy.stats.binomtest`` on the discordant validation images,
  alternative "pretrained right more often") rejects "the pretrained start is no better" at ``alpha`` (5%);
- ``negative``: the same test the other way round says scratch is better (the pretrained start hurts);
- ``no_gain``: neither; the pretrained start is not better beyond the noise of this validation split.

Anything but ``helps`` is a loud warning (:func:`guard_warning`). Both validation accuracies are the best epoch
of their run, picked on these same images, so each leans a little high; both lean the same way and the test
compares them on equal terms. The test decides nothing about the size of the gain; the paired bootstrap
interval of the difference (edge_tl.workstation.stats.paired) is recorded beside it.

``train.continue_with`` then picks the model that goes on to pruning (:func:`choose`): ``finetuned`` (always
the pretrained one), ``scratch`` (always the scratch one), ``auto`` (scratch only when the guard fired and
scratch is ahead on validation; otherwise the pretrained one). Whatever is picked is recorded and said.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HELPS, NO_GAIN, NEGATIVE = "helps", "no_gain", "negative"

METHOD = ("one-sided exact McNemar test (scipy.stats.binomtest on the validation images exactly one of the two "
          "models gets right) of the pretrained start against scratch, alpha 5% each way; paired bootstrap 95% "
          "interval of the difference beside it")


def transfer_verdict(pretrained_correct: np.ndarray, scratch_correct: np.ndarray, alpha: float = 0.05) -> dict:
    """Compare two models' per-image correctness on the same validation images (see the module docstring)."""
    from edge_tl.core.importer import require
    from edge_tl.workstation.stats import paired

    a = np.asarray(pretrained_correct, dtype=bool).reshape(-1)
    b = np.asarray(scratch_correct, dtype=bool).reshape(-1)
    pair = paired(a, b)
    stats = require("scipy.stats", "the negative-transfer guard")
    k = pair.a_only + pair.b_only
    p_helps = 1.0 if k == 0 else float(stats.binomtest(pair.a_only, k, 0.5, alternative="greater").pvalue)
    p_hurts = 1.0 if k == 0 else float(stats.binomtest(pair.b_only, k, 0.5, alternative="greater").pvalue)
    verdict = HELPS if p_helps < alpha else NEGATIVE if p_hurts < alpha else NO_GAIN
    return {"verdict": verdict, "fired": verdict != HELPS, "val_images": int(a.size),
            "pretrained_val_top1": float(a.mean()), "scratch_val_top1": float(b.mean()),
            "diff_points": pair.diff_points, "ci95_points": list(pair.ci_points),
            "pretrained_only": pair.a_only, "scratch_only": pair.b_only,
            "p_pretrained_better": p_helps, "p_scratch_better": p_hurts, "alpha": alpha, "method": METHOD}


def choose(continue_with: str, guard: dict | None) -> tuple[str, str]:
    """(stage whose model goes on to pruning: 'finetune' or 'scratch', why)."""
    if continue_with == "finetuned":
        return "finetune", "train.continue_with = 'finetuned'"
    if continue_with == "scratch":
        return "scratch", "train.continue_with = 'scratch'"
    if guard is None:
        return "finetune", "train.continue_with = 'auto' without a scratch baseline (report.compare_scratch = false)"
    if guard["fired"] and guard["scratch_val_top1"] > guard["pretrained_val_top1"]:
        return "scratch", ("train.continue_with = 'auto': the pretrained start is not better than scratch and "
                           "scratch is ahead on validation")
    if guard["fired"]:
        return "finetune", ("train.continue_with = 'auto': the pretrained start is not better than scratch beyond "
                            "noise, but not behind it on validation either")
    return "finetune", "train.continue_with = 'auto': the pretrained start is better than scratch on validation"


def guard_warning(guard: dict, weights_label: str, continued: str, why: str) -> str | None:
    """The loud warning when the guard fired (None when the pretrained start helps)."""
    if not guard["fired"]:
        return None
    g = guard
    lo, hi = g["ci95_points"]
    how = ("is WORSE than training from scratch" if g["verdict"] == NEGATIVE
           else "is NOT better than training from scratch beyond noise")
    model = "the from-scratch model" if continued == "scratch" else "the fine-tuned (pretrained) model"
    return (f"negative transfer: the pretrained start (weights {weights_label}) {how}: validation top-1 "
            f"{100 * g['pretrained_val_top1']:.1f}% against scratch {100 * g['scratch_val_top1']:.1f}% on "
            f"{g['val_images']} images ({g['diff_points']:+.1f} points, 95% CI {lo:+.1f} to {hi:+.1f}; one-sided "
            f"McNemar p = {g['p_pretrained_better']:.2g} that it is better, needs < {g['alpha']:g}). Likely cause: "
            "the source domain (what the weights were trained on) is far from this data, or the checkpoint learnt "
            "nothing useful. Options: pick other weights or another backbone (edge-tl rank --data DIR ranks them "
            "on your data), train from scratch (--weights none), use more training images, or set "
            "train.continue_with = 'scratch' | 'finetuned' | 'auto' to choose what is pruned and shipped. "
            f"Continuing with {model} ({why}).")


def guard_record(guard: dict | None, continued: str, why: str, warning: str | None) -> dict[str, Any]:
    """What the manifest and metrics.json record."""
    return {"negative_transfer": guard, "continued_from": continued, "continued_because": why, "warning": warning}
