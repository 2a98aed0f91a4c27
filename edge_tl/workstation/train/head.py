"""The head of a frozen backbone fitted to its optimum: multinomial logistic regression (L-BFGS, L2) on the
backbone's features, written into the model's Linear classifier.

With the backbone frozen, training the head is a convex problem. The SGD epochs of the feature-extract mode stop
far from its optimum on a hundred images (35 epochs of 4 steps: 78.1% on the real photos), where scikit-learn's
``LogisticRegression`` solved on the same frozen ImageNet Lite0 features scores 90.0% (benchmarks/RESULTS.md,
"photo-modes" and "ood-features"). The same fit, run again on a pruned backbone's features, is the last step of
the recovery after pruning by feature distillation (:func:`edge_tl.workstation.train.fit.fit`,
``distill_on = "features"``).

The features are those the classifier sees (its input, by a forward hook: no copy of the model, nothing
replaced), of the training images as the device preprocesses them plus ``views`` augmented copies of each
(the training augmentation, seeded). SqueezeNet's classifier is a 1x1 convolution followed by ReLU and pooling,
not a linear map of pooled features: it keeps the SGD epochs (:func:`supports`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_tl.core.errors import EdgeTLError
from edge_tl.workstation.train.backbones import head_name
from edge_tl.workstation.train.datasets import with_views

#: L2 strength of the head's fit (scikit-learn's C, the inverse of the penalty; its default). On the photos'
#: frozen Lite0 features, seeds 0-4, C = 0.1 and 10 scored within 2 of 105 test photos of C = 1 at every input
#: size and number of views (benchmarks/RESULTS.md "input-size"): not tuned
HEAD_C = 1.0
#: L-BFGS iterations at most (each is one pass over the cached features: milliseconds)
HEAD_MAX_ITER = 3000


@dataclass
class HeadFit:
    images: int  # feature vectors fitted: training images x (1 + views)
    views: int
    features: int  # their width
    iterations: int
    train_top1: float  # on the un-augmented training images
    seconds: float
    solver: str = "lbfgs"
    C: float = HEAD_C

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: backbones whose classifier is not a Linear layer on pooled features (SqueezeNet's is a 1x1 convolution)
CONV_HEADS = ("squeezenet1_1",)


def solver(backbone: str, asked: str) -> str:
    """``train.head`` resolved for ``backbone``: "lbfgs" or "sgd"."""
    if asked == "auto":
        return "sgd" if backbone in CONV_HEADS else "lbfgs"
    if asked == "lbfgs" and backbone in CONV_HEADS:
        raise EdgeTLError(f"train.head = 'lbfgs' needs a Linear classifier; {backbone}'s is a 1x1 convolution",
                          "use train.head = 'sgd' (or 'auto') with this backbone")
    return asked


def supports(model: nn.Module, backbone: str) -> bool:
    """Whether ``backbone``'s head is a Linear layer on pooled features (every backbone but SqueezeNet)."""
    return isinstance(model.get_submodule(head_name(backbone)), nn.Linear)


@torch.no_grad()
def features(model: nn.Module, backbone: str, x: np.ndarray | torch.Tensor, batch: int = 64,
             device: torch.device | str = "cpu") -> np.ndarray:
    """What the classifier of ``model`` sees for the preprocessed images ``x`` (eval mode)."""
    head = model.get_submodule(head_name(backbone))
    grabbed: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda mod, inp, out: grabbed.append(inp[0].detach().flatten(1).cpu()))
    model.eval().to(device)
    try:
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            model((torch.from_numpy(xb) if isinstance(xb, np.ndarray) else xb).to(device))
    finally:
        hook.remove()
    return torch.cat(grabbed).numpy() if grabbed else np.zeros((0, head.in_features), np.float32)


def fit_head(model: nn.Module, backbone: str, dataset: torch.utils.data.Dataset, *, views: int = 4, seed: int = 0,
             device: torch.device | str = "cpu") -> HeadFit:
    """Fit ``model``'s Linear classifier in place to the optimum of the L2-regularised multinomial logistic loss
    on the frozen features of ``dataset`` (a :class:`TrainDataset`) and ``views`` augmented copies of it."""
    import time

    from sklearn.linear_model import LogisticRegression

    if not supports(model, backbone):
        raise EdgeTLError(f"the {backbone} head is not a Linear layer on pooled features",
                          "train its head with epochs (train.head = 'sgd')")
    start = time.perf_counter()
    x, y = with_views(dataset, views, seed)
    f = features(model, backbone, x, device=device)
    classes = int(model.get_submodule(head_name(backbone)).out_features)
    missing = sorted(set(range(classes)) - set(np.unique(y).tolist()))
    if missing:
        raise EdgeTLError(f"class index(es) {missing} have no training image: the head cannot be fitted",
                          "give every class training images")
    clf = LogisticRegression(C=HEAD_C, max_iter=HEAD_MAX_ITER).fit(f.astype(np.float64), y)
    coef, bias = clf.coef_, clf.intercept_
    if classes == 2:  # scikit-learn's binary fit: one logit z for class 1; [-z/2, z/2] gives the same softmax
        coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
    head = model.get_submodule(head_name(backbone))
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(coef, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    n = len(dataset)
    train_top1 = float((clf.predict(f[:n].astype(np.float64)) == y[:n]).mean())
    return HeadFit(images=len(y), views=views, features=int(f.shape[1]), iterations=int(np.max(clf.n_iter_)),
                   train_top1=train_top1, seconds=round(time.perf_counter() - start, 2))
