"""Shared by bench_rank.py and bench_imbalance.py: fine-tune with the build's own training code on an
ImageFolder task, and the intervals the results carry (Wilson for accuracy, bootstrap for balanced accuracy)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from edge_tl.workstation.data import scan
from edge_tl.workstation.spec import BuildSpec
from edge_tl.workstation.stats import wilson  # noqa: F401  (the benchmarks' one interval, re-exported)
from edge_tl.workstation.train import create_model, evaluate, finetune_phases, fit, scratch_phases
from edge_tl.workstation.train.balance import fit_kwargs, resolve
from edge_tl.workstation.train.datasets import TrainDataset, eval_arrays


def load_task(root: Path, spec: BuildSpec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = scan(root, seed=spec.seed)
    pre = spec.model.preprocess()
    arrays = {s: eval_arrays(split.paths(s), split.labels(s), pre) for s in ("val", "test")}
    return split, arrays


def finetune(spec: BuildSpec, split, arrays, backbone: str, weights: str, seed: int, balance: str = "none",
             balance_loss: str = "weighted-ce") -> dict:
    """Fine-tune like the build's finetune stage (same phases, fit, data pipeline); test predictions. Weights
    ``none`` train with the build's from-scratch recipe (its scratch stage: every layer, BatchNorm training, no
    early stopping): the fine-tune recipe keeps a random net's BatchNorm frozen and stays at chance."""
    t = spec.train
    labels = split.labels("train")
    from edge_tl.workstation.train.augment import resolve as resolve_augment

    aug = resolve_augment(t.augment, t.hflip, spec.data.kind)
    ds = TrainDataset(split.paths("train"), labels, spec.model.preprocess(), augment=aug["policy"],
                      hflip=aug["hflip"])
    model = create_model(backbone, len(split.classes), weights, spec.model.dropout, seed=seed)
    setup = resolve(balance, labels, len(split.classes), spec.data.imbalance_ratio, balance_loss, t.focal_gamma)
    extra = fit_kwargs(setup, labels, len(split.classes), seed, t.label_smoothing)
    if weights == "none":  # the build's from-scratch recipe (its scratch stage; issue 14 item 8 for weights none)
        phases = scratch_phases(t.epochs + t.warmup_epochs, spec.report.scratch_lr)
    else:
        phases = finetune_phases(t.mode, t.epochs, t.warmup_epochs, t.lr_head, t.lr_backbone, t.freeze_bn)
    res = fit(model, backbone, ds, arrays["val"], phases, batch_size=t.batch_size, weight_decay=t.weight_decay,
              patience=t.patience,
              label_smoothing=t.label_smoothing, seed=seed, device="cpu", label=f"{backbone}/{weights}", **extra)
    top1, _, pred = evaluate(model.cpu(), *arrays["test"])
    return {"top1": top1, "pred": pred, "seconds": res.seconds, "val_top1": res.best_val_top1, "setup": setup}


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def bootstrap_balanced(y: np.ndarray, pred: np.ndarray, reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the balanced accuracy, resampling test images within each class."""
    rng = np.random.default_rng(seed)
    idx_by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    vals = []
    for _ in range(reps):
        idx = np.concatenate([rng.choice(ix, len(ix)) for ix in idx_by_class])
        vals.append(balanced_accuracy(y[idx], pred[idx]))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def t_interval(values: list[float]) -> tuple[float, float]:
    """95% t interval of the mean over seeds."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float(v.mean())
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return max(0.0, float(v.mean() - half)), min(1.0, float(v.mean() + half))  # an accuracy stays in [0, 1]
