"""Structured channel pruning to a MACs target, with Torch-Pruning.

``prune_to_macs`` removes whole channels (Torch-Pruning's dependency graph keeps residual adds, depthwise
groups, squeeze-excitation and concatenations consistent) so the pruned model is an ordinary smaller
network that ONNX and TensorRT run at full speed. Channel counts are rounded to multiples of ``round_to``
(8: what TensorRT's INT8/FP16 kernels like). The classifier is never pruned, so the class count stays.

The MACs target is reached by a bisection over Torch-Pruning's per-layer channel ratio: each trial prunes
a copy of the model and counts its MACs; the smallest ratio that meets the target wins. The caller runs
the recovery fine-tune.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from edge_tl.core.errors import EdgeTLError
from edge_tl.workstation.modelstats import eval_mode

log = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "fpgm", "lamp", "taylor", "contribution", "random")
#: importances ranked on data: they need ``taylor_batch`` = (images, labels)
DATA_IMPORTANCES = ("taylor", "contribution")


@dataclass
class PruneResult:
    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    pruning_ratio: float  # Torch-Pruning's per-layer channel ratio that reached the target
    target_macs_ratio: float = 0.0  # fraction of MACs asked to be removed
    importance: str = "l1"
    trials: list[tuple[float, int]] = field(default_factory=list)  # (channel ratio, MACs) of every trial

    @property
    def macs_removed(self) -> float:
        """Fraction of MACs removed (0.5 = half)."""
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    @property
    def params_removed(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def summary(self) -> dict:
        return {"macs_before": self.macs_before, "macs_after": self.macs_after, "params_before": self.params_before,
                "params_after": self.params_after, "macs_removed": round(self.macs_removed, 4),
                "params_removed": round(self.params_removed, 4), "channel_ratio": round(self.pruning_ratio, 4),
                "target_macs_ratio": self.target_macs_ratio, "importance": self.importance}


def find_classifier(model: nn.Module) -> str:
    """Name of the final Linear/Conv (torchvision's classifiers; SqueezeNet's is a 1x1 Conv)."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            name = n
    if name is None:
        raise EdgeTLError("the model has no Linear or Conv2d layer to keep as classifier",
                          "prune a CNN classifier (torchvision backbone)")
    return name


def _importance(name: str):
    import torch_pruning as tp

    imp = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "contribution": _contribution_importance,
        "random": lambda: tp.importance.RandomImportance(),
    }
    if name not in imp:
        raise EdgeTLError(f"unknown pruning importance '{name}'", f"choose one of: {', '.join(IMPORTANCES)}")
    return imp[name]()


#: the blocks whose last convolution writes the residual stream (torchvision's MobileNetV2/V3, timm's EfficientNet)
BLOCK_TYPES = ("InvertedResidual", "DepthwiseSeparableConv")


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's inverted-residual blocks (:data:`BLOCK_TYPES`), by name, in order."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in BLOCK_TYPES]


def stream_layers(model: nn.Module) -> list[str]:
    """The layers that keep their output width when only the hidden channels are pruned (``prune.channels =
    "hidden"``): the stem (the first convolution), the last convolution and any Linear layer before the
    classifier (the features the classifier sees), and each inverted-residual block's projection (its last
    convolution, whose outputs are the residual stream every later block reads). What is left to prune are the
    blocks' expanded channels (expansion, depthwise, squeeze-excite), which no other block sees."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    classifier = find_classifier(model)
    found = blocks(model)
    if not found:
        raise EdgeTLError(f"{type(model).__name__} has no inverted-residual blocks whose hidden channels could be "
                          "pruned alone", "use prune.channels = 'all' with this backbone")
    keep = [convs[0], next(n for n in reversed(convs) if n != classifier)]
    # MobileNetV3's hidden Linear layer between the pooled features and the classifier
    keep += [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != classifier]
    for name, block in found:
        inner = [f"{name}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
        keep.append(inner[-1])
    return list(dict.fromkeys(keep))


def _contribution_importance():
    """A channel's mean |activation| on the task's own images times the L2 norm of the weights that read it: how
    far the next layer's output moves without it, to first order. Torch-Pruning's ActivationImportance scores the
    activation alone; a channel that is large but read with tiny weights matters little, hence the product. Ranked
    on the data, not on the weights alone: a pretrained ImageNet channel that these images never excite goes
    first. The activations are recorded by :func:`_record_activations` before the pruner steps."""
    import torch_pruning as tp
    from torch_pruning.pruner import function

    class ContributionImportance(tp.importance.GroupMagnitudeImportance):
        @torch.no_grad()
        def __call__(self, group):
            group_imp, group_idxs = [], []
            for i, (dep, idxs) in enumerate(group):
                layer, fn = dep.target.module, dep.handler
                if fn not in (function.prune_conv_in_channels, function.prune_linear_in_channels):
                    continue
                act = getattr(layer, ACTIVATION_ATTR, None)
                if act is None or (isinstance(layer, nn.Conv2d) and layer.groups != 1):  # depthwise: its own channel
                    continue
                reads = layer.weight.data.transpose(0, 1).flatten(1).norm(dim=1)
                group_imp.append((act * reads)[list(idxs)])  # in the order of root_idxs
                group_idxs.append(group[i].root_idxs)
            if not group_imp:
                return None
            return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)

    return ContributionImportance()


#: where :func:`_record_activations` leaves each layer's mean |input| per channel
ACTIVATION_ATTR = "_edge_tl_activation"


@torch.no_grad()
def _record_activations(model: nn.Module, x: torch.Tensor, batch: int = 32) -> None:
    """Mean |input| per channel of every Conv2d and Linear layer over the images ``x`` (eval mode)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    sums: dict[int, torch.Tensor] = {}

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        a = inp[0].abs()
        a = a.mean((0, 2, 3)) if a.dim() == 4 else a.reshape(-1, a.shape[-1]).mean(0)
        sums[id(mod)] = sums.get(id(mod), 0) + a * len(inp[0])

    hooks = [m.register_forward_hook(hook) for m in layers]
    try:
        with eval_mode(model):
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    for m in layers:
        if id(m) in sums:
            setattr(m, ACTIVATION_ATTR, sums[id(m)] / len(x))


def _forget_activations(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, ACTIVATION_ATTR):
            delattr(m, ACTIVATION_ATTR)


def _ignored_names(model: nn.Module, ignored_layers: Sequence[str | nn.Module] | None) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    out = [find_classifier(model)]
    for item in ignored_layers or ():
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise EdgeTLError("an ignored layer is not part of the model", "pass layers of this model or names")
            out.append(names[id(item)])
        elif item in modules:
            out.append(item)
        else:
            raise EdgeTLError(f"ignored layer '{item}' is not a module of the model",
                              "give names as in model.named_modules()")
    return out


def _prune_copy(model: nn.Module, example: torch.Tensor, ratio: float, ignored: list[str], round_to: int,
                importance: str, global_pruning: bool, taylor_batch, *, wrap_importance=None,
                max_pruning_ratio: float = 1.0) -> nn.Module:
    """A pruned deep copy of ``model``. ``wrap_importance(imp, copy)`` may replace the criterion with one built on
    the copy (edge_tl.workstation.latency: importance per ms); ``max_pruning_ratio`` caps any one layer."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    modules = dict(m.named_modules())
    imp = _importance(importance)
    if wrap_importance is not None:
        imp = wrap_importance(imp, m)
    pruner = tp.pruner.MetaPruner(m, example, importance=imp, pruning_ratio=ratio,
                                  ignored_layers=[modules[n] for n in ignored], round_to=round_to or None,
                                  global_pruning=global_pruning, max_pruning_ratio=max_pruning_ratio)
    if importance == "taylor":
        x, y = taylor_batch
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
    if importance == "contribution" and not any(hasattr(k, ACTIVATION_ATTR) for k in m.modules()):
        _record_activations(m, taylor_batch[0])
    pruner.step()
    m.zero_grad(set_to_none=True)
    _forget_activations(m)
    return m


def prune_to_macs(model: nn.Module, example_input: torch.Tensor, target_macs_ratio: float = 0.5, round_to: int = 8,
                  ignored_layers: Sequence[str | nn.Module] | None = None, importance: str = "l1", *,
                  global_pruning: bool = False, max_channel_ratio: float = 0.9, tolerance: float = 0.01,
                  max_trials: int = 8,
                  taylor_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> PruneResult:
    """Prune channels of a copy of ``model`` until at least ``target_macs_ratio`` of its MACs are gone.

    ``target_macs_ratio`` is the FRACTION OF MACs REMOVED (0.5: the result has <= half the MACs).
    ``example_input``: one batch shaped like the real input (only its shape and device matter).
    ``importance``: how channels are ranked (``l1``/``l2`` magnitude, ``fpgm``, ``lamp``, ``random``, or
    ``taylor``, which needs ``taylor_batch`` = (images, labels) for one gradient pass, or ``contribution``, which
    needs its images for one forward pass: :func:`_contribution_importance`).
    ``model`` itself is left untouched; the pruned copy is ``result.model`` (in ``model``'s training mode).
    """
    import torch_pruning as tp

    if not 0.0 < float(target_macs_ratio) < 1.0:
        raise EdgeTLError(f"prune target {target_macs_ratio} is not a fraction of MACs to remove",
                          "give a number between 0 and 1 (0.5 removes half the MACs)")
    if round_to is not None and int(round_to) < 1:
        raise EdgeTLError(f"round_to={round_to} must be a positive channel multiple", "use 8 for TensorRT")
    if importance in DATA_IMPORTANCES and taylor_batch is None:
        what = "labelled images (one gradient pass)" if importance == "taylor" else "images (one forward pass)"
        raise EdgeTLError(f"{importance} importance needs a batch of {what}",
                          "pass taylor_batch=(images, labels) or use importance='l1'")
    _importance(importance)  # validate the name before any work
    ignored = _ignored_names(model, ignored_layers)
    was_training = model.training
    with eval_mode(model):
        with torch.no_grad():
            macs0, params0 = (int(v) for v in tp.utils.count_ops_and_params(model, example_input))
        goal = (1.0 - target_macs_ratio) * macs0

        def trial(ratio: float) -> tuple[nn.Module, int]:
            pruned = _prune_copy(model, example_input, ratio, ignored, round_to, importance, global_pruning,
                                 taylor_batch)
            with torch.no_grad():
                macs = int(tp.utils.count_ops_and_params(pruned.eval(), example_input)[0])
            trials.append((round(ratio, 5), macs))
            return pruned, macs

        trials: list[tuple[float, int]] = []
        if importance == "contribution":  # recorded once; every trial's copy carries them
            _record_activations(model, taylor_batch[0])
        try:
            best, best_hi = _search(trial, macs0, goal, max_channel_ratio, tolerance, max_trials)
        finally:
            _forget_activations(model)
        if best is None:
            reached = 1 - min(m for _, m in trials) / macs0
            raise EdgeTLError(f"pruning cannot remove {target_macs_ratio:.0%} of the MACs: the most removed in "
                              f"{len(trials)} trials (channel ratio up to {max_channel_ratio}) was {reached:.1%} "
                              f"(layers kept: {', '.join(ignored)})", "lower the prune target")
        best_model, best_macs = best
    with torch.no_grad():
        params1 = int(tp.utils.count_ops_and_params(best_model, example_input)[1])
    best_model.train(was_training)
    log.info("pruned %s: MACs %d -> %d (%.1f%% removed) at channel ratio %.3f in %d trials", type(model).__name__,
             macs0, best_macs, 100 * (1 - best_macs / macs0), best_hi, len(trials))
    return PruneResult(best_model, macs0, best_macs, params0, params1, best_hi, float(target_macs_ratio), importance,
                       trials)


def _search(trial, macs0: int, goal: float, max_ratio: float, tolerance: float, max_trials: int):
    """Smallest channel ratio whose pruned MACs are <= goal: ((model, macs), ratio), or (None, None).

    MACs fall roughly like (1 - ratio)^2 under uniform channel pruning, so the first guess is
    1 - sqrt(goal / MACs) and later ones interpolate inside the bracket (a few trials, not a full bisection).
    It stops when the result is within 1% of the MACs goal or the bracket is narrower than ``tolerance``.
    """
    lo_r, lo_m = 0.0, float(macs0)
    hi_r, hi = None, None
    for _ in range(max(1, max_trials)):
        if hi is None:
            if lo_r >= max_ratio:
                break
            scale = lo_m / (1.0 - lo_r) ** 2
            guess = 1.0 - (goal / scale) ** 0.5
            r = min(max_ratio, guess if not lo_r else max(guess + 0.01, lo_r + 0.05))
        else:
            frac = (lo_m - goal) / max(lo_m - hi[1], 1.0)
            width = hi_r - lo_r
            r = lo_r + min(0.8, max(0.2, frac)) * width
        model, macs = trial(r)
        if macs <= goal:
            hi_r, hi = r, (model, macs)
        else:
            lo_r, lo_m = r, float(macs)
        if hi is not None and ((goal - hi[1]) / macs0 <= 0.01 or hi_r - lo_r <= tolerance):
            break
    return hi, hi_r



def channel_report(model: nn.Module) -> list[tuple[str, int, int, int]]:
    """(name, in_channels, out_channels, groups) of every Conv2d, for checks and the report."""
    return [(n, m.in_channels, m.out_channels, m.groups) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
