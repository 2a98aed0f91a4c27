"""``train.mode = "auto"``: feature extraction and fine-tuning tried under the same budget, the better one on
validation kept.

Both start from the same pretrained weights and the same seed, see the same augmented batches and get the same
number of epochs (``warmup_epochs + epochs``; early stopping may end either sooner; a head fitted by L-BFGS needs
one pass, not epochs):

- feature extraction: the backbone frozen (BatchNorm statistics too), only the new head trains: fitted once to
  its optimum by L-BFGS (``train.head = "lbfgs"``, the default where the head is Linear), or at ``lr_head``;
- fine-tuning: ``warmup_epochs`` head-only, then every layer, the backbone at the lower ``lr_backbone``.

:func:`pick` keeps the higher best validation top-1; on a tie the lower validation loss at that epoch; on a tie
of both, feature extraction (fewer weights changed). Each run's curves are kept (``fit_<mode>.json``) for the
report's plot. The choice is made on validation only: the test split stays untouched for the final numbers.
"""

from __future__ import annotations

from typing import Any

from edge_tl.workstation.train.fit import FitResult, Phase, finetune_phases

MODES = ("feature-extract", "finetune")


def candidates(epochs: int, warmup_epochs: int, lr_head: float, lr_backbone: float,
               freeze_bn: bool, head: str = "sgd", head_views: int = 4) -> dict[str, list[Phase]]:
    """The phases of both modes under the same epoch budget (``head = "lbfgs"``: feature extraction fits its head
    once, to the optimum, instead: :mod:`edge_tl.workstation.train.head`)."""
    return {"feature-extract": finetune_phases("feature-extract", epochs + warmup_epochs, 0, lr_head, lr_backbone,
                                               freeze_bn, head, head_views),
            "finetune": finetune_phases("finetune", epochs, warmup_epochs, lr_head, lr_backbone, freeze_bn)}


def _best_loss(res: FitResult) -> float:
    return next((h["val_loss"] for h in res.history if h["epoch"] == res.best_epoch), float("inf"))


def pick(results: dict[str, FitResult]) -> tuple[str, str]:
    """(the mode kept, why)."""
    def score(mode: str) -> tuple[float, float, int]:
        r = results[mode]
        return (r.best_val_top1, -_best_loss(r), mode == "feature-extract")

    best = max(results, key=score)
    other = next(m for m in results if m != best)
    a, b = results[best], results[other]
    if a.best_val_top1 > b.best_val_top1:
        why = f"higher validation top-1 ({100 * a.best_val_top1:.1f}% vs {100 * b.best_val_top1:.1f}%)"
    elif _best_loss(a) < _best_loss(b):
        why = (f"same validation top-1 ({100 * a.best_val_top1:.1f}%), lower validation loss "
               f"({_best_loss(a):.3f} vs {_best_loss(b):.3f})")
    else:
        why = "same validation top-1 and loss: the one that changes fewer weights"
    return best, why


def summary(results: dict[str, FitResult], chosen: str, why: str, phases: dict[str, list[Phase]]) -> dict[str, Any]:
    """What the finetune stage's metrics (and the manifest) record."""
    return {"chosen": chosen, "why": why, "budget_epochs": sum(p.epochs for p in phases[chosen]),
            "tried": {m: {"val_top1": r.best_val_top1, "val_loss": _best_loss(r), "best_epoch": r.best_epoch,
                          "epochs_run": r.epochs_run, "train_seconds": round(r.seconds, 2),
                          "phases": [p.__dict__ for p in phases[m]]} for m, r in results.items()}}


def plot_tried(ax: Any, folder: Any, metrics: dict[str, Any]) -> None:
    """Draw the curves of the mode that was NOT kept (mode = auto) onto the report's training-curve axes."""
    import json

    auto = metrics.get("mode_auto")
    if not auto:
        return
    for mode in MODES:
        f = folder / f"fit_{mode}.json"
        if mode == auto["chosen"] or not f.is_file():
            continue
        hist = json.loads(f.read_text())["history"]
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h["val_top1"] for h in hist], color="tab:purple", label=f"{mode} val (tried, not kept)")
        ax.plot(ep, [h["train_top1"] for h in hist], color="tab:purple", ls="--", alpha=0.6,
                label=f"{mode} train (tried, not kept)")
