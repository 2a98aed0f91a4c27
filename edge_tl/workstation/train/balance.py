"""Class imbalance in training (``train.balance``): a class-balanced sampler, or a class-weighted loss.

- ``sampler``: :class:`torch.utils.data.WeightedRandomSampler` with each image weighted 1 / (its class's count),
  drawn with replacement, one epoch = as many draws as images: every class is drawn equally often on average.
- ``loss``: cross-entropy weighted per class by ``n / (k * n_c)`` (scikit-learn's "balanced" class weights),
  or the focal loss of Lin et al. ("Focal Loss for Dense Object Detection", ICCV 2017) with the same weights.
- ``auto``: ``sampler`` when the largest class has more than ``threshold`` times the smallest one's training
  images (the data check's ``data.imbalance_ratio``), else ``none``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def imbalance_ratio(labels: np.ndarray, num_classes: int) -> float:
    counts = class_counts(labels, num_classes)
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def resolve(mode: str, labels: np.ndarray, num_classes: int, threshold: float, loss: str = "weighted-ce",
            gamma: float = 2.0) -> dict[str, Any]:
    """What ``train.balance = mode`` does on these training labels (recorded in metrics and the manifest)."""
    ratio = imbalance_ratio(labels, num_classes)
    used = mode
    if mode == "auto":
        used = "sampler" if ratio > threshold else "none"
    out: dict[str, Any] = {"requested": mode, "used": used, "class_ratio": round(ratio, 3), "threshold": threshold,
                           "train_counts": class_counts(labels, num_classes).tolist()}
    if used == "loss":
        out["loss"] = loss
        out["class_weights"] = [round(float(w), 4) for w in class_weights(labels, num_classes)]
        if loss == "focal":
            out["focal_gamma"] = gamma
    return out


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (k * n_c) per class (1 for every class when balanced; a class with no images gets 0)."""
    counts = class_counts(labels, num_classes).astype(np.float64)
    n, k = counts.sum(), float((counts > 0).sum())
    return np.where(counts > 0, n / (k * np.maximum(counts, 1)), 0.0)


def make_sampler(labels: np.ndarray, num_classes: int, seed: int) -> torch.utils.data.WeightedRandomSampler:
    counts = class_counts(labels, num_classes)
    per_image = 1.0 / counts[np.asarray(labels, dtype=np.int64)]
    return torch.utils.data.WeightedRandomSampler(torch.as_tensor(per_image, dtype=torch.double),
                                                  num_samples=len(labels), replacement=True,
                                                  generator=torch.Generator().manual_seed(seed))


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): ``-w_y (1 - p_y)^gamma log p_y``, normalised like weighted cross-entropy
    (divided by the sum of the weights of the batch's labels); ``gamma = 0`` is weighted cross-entropy."""

    def __init__(self, weight: torch.Tensor | None = None, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = nn.functional.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        w = self.weight[target] if self.weight is not None else torch.ones_like(logp)
        loss = -w * (1 - logp.exp()).pow(self.gamma) * logp
        return loss.sum() / w.sum().clamp_min(1e-12)


def fit_kwargs(setup: dict[str, Any], labels: np.ndarray, num_classes: int, seed: int,
               label_smoothing: float = 0.0) -> dict[str, Any]:
    """``sampler`` / ``loss_fn`` for :func:`edge_tl.workstation.train.fit` from a :func:`resolve` result."""
    used = setup["used"]
    if used == "sampler":
        return {"sampler": make_sampler(labels, num_classes, seed)}
    if used == "loss":
        w = torch.as_tensor(class_weights(labels, num_classes), dtype=torch.float32)
        if setup.get("loss") == "focal":
            return {"loss_fn": FocalLoss(w, setup.get("focal_gamma", 2.0))}
        return {"loss_fn": nn.CrossEntropyLoss(weight=w, label_smoothing=label_smoothing)}
    return {}
