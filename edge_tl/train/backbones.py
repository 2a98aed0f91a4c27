"""torchvision backbones with a new head, their weights (ImageNet, a local checkpoint, none), and checkpoints of
pruned models (plain state_dicts, loaded with ``weights_only=True`` into a reshaped skeleton)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from edge_tl.errors import EdgeTLError
from edge_tl.spec import BACKBONES

# Where each backbone's classifier sits: (attribute path of the new head, attribute path of its dropout).
_HEADS = {
    "mobilenet_v2": ("classifier.1", "classifier.0"),
    "mobilenet_v3_small": ("classifier.3", "classifier.2"),
    "mobilenet_v3_large": ("classifier.3", "classifier.2"),
    "squeezenet1_1": ("classifier.1", "classifier.0"),
}


def head_name(backbone: str) -> str:
    return _HEADS[backbone][0]


def _get(model: nn.Module, dotted: str) -> nn.Module:
    return model.get_submodule(dotted)


def _set(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def is_head_param(backbone: str, param_name: str) -> bool:
    return param_name.startswith(head_name(backbone) + ".")


def build(backbone: str, num_classes: int, dropout: float = 0.2, seed: int | None = None) -> nn.Module:
    """The torchvision architecture with a freshly initialised head for ``num_classes`` (no weights loaded).
    ``seed`` seeds the initialisation (repeatable builds)."""
    if backbone not in BACKBONES:
        raise EdgeTLError(f"unknown backbone '{backbone}'", f"choose one of {', '.join(BACKBONES)}")
    from torchvision import models

    if seed is not None:
        torch.manual_seed(seed)
    model = models.get_model(backbone, weights=None)
    head, drop = _HEADS[backbone]
    old = _get(model, head)
    if isinstance(old, nn.Conv2d):  # squeezenet: a 1x1 conv classifier
        new: nn.Module = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        nn.init.normal_(new.weight, 0.0, 0.01)
        nn.init.zeros_(new.bias)
        model.num_classes = num_classes
    else:
        new = nn.Linear(old.in_features, num_classes)
    _set(model, head, new)
    dropout_module = _get(model, drop)
    if isinstance(dropout_module, nn.Dropout):
        dropout_module.p = dropout
    return model


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's DEFAULT ImageNet weights, from the torch hub cache or downloaded into it.

    Offline without the file: an EdgeTLError naming the exact file and the folder to put it in.
    """
    from torchvision.models import get_model_weights

    weights = get_model_weights(backbone).DEFAULT
    fname = Path(urlparse(weights.url).path).name
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's "Downloading: ..." line
            return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; hash mismatches are RuntimeErrors
        raise EdgeTLError(f"cannot get the ImageNet weights of {backbone} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'download failed'})",
                          f"download {weights.url} and put it at {cache / fname} "
                          "(or pass --weights PATH / --weights none)") from exc


def checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A local checkpoint: a state_dict (or {'state_dict': ...} / {'model': ...}) loaded with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise EdgeTLError(f"weights file {path} does not exist", "pass --weights imagenet, none, or an existing file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, forbidden globals: all mean "not a safe state_dict"
        raise EdgeTLError(f"{path} is not a state_dict that loads with weights_only=True ({type(exc).__name__})",
                          "save the model with torch.save(model.state_dict(), path)") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EdgeTLError(f"{path} does not hold a state_dict of tensors", "save model.state_dict() to it")
    return obj


def load_backbone_weights(model: nn.Module, backbone: str, state: dict[str, torch.Tensor], origin: str) -> int:
    """Load ``state`` into ``model`` except a head of another size (the head is new). Returns tensors loaded.

    Any other missing, unexpected or mis-shaped key is an EdgeTLError naming it.
    """
    own = model.state_dict()
    head = head_name(backbone) + "."
    state = {k: v for k, v in state.items() if not (k.startswith(head) and own.get(k, v).shape != v.shape)}
    missing = [k for k in own if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise EdgeTLError(f"weights {origin} do not fit {backbone}: {', '.join(parts)}",
                          f"use a checkpoint of torchvision's {backbone} (a state_dict), or pass --weights none")
    model.load_state_dict(state, strict=False)
    return len(state)


def create_model(backbone: str, num_classes: int, weights: str, dropout: float = 0.2,
                 seed: int | None = None) -> nn.Module:
    """``weights``: 'imagenet', 'none', or a checkpoint path ('demo' is resolved by the caller)."""
    model = build(backbone, num_classes, dropout, seed)
    if weights == "none":
        return model
    state = imagenet_state_dict(backbone) if weights == "imagenet" else checkpoint_state_dict(weights)
    load_backbone_weights(model, backbone, state, "imagenet" if weights == "imagenet" else str(weights))
    return model


# -- pruned checkpoints ----------------------------------------------------------------------------------------
def reshape_to(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Resize the Conv2d / BatchNorm2d / Linear layers of an unpruned ``model`` to the shapes in ``state`` (a
    pruned model's state_dict), then load it strictly. Depthwise convs stay depthwise."""
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        w = state.get(prefix + "weight")
        if w is None or not isinstance(mod, nn.Conv2d | nn.BatchNorm2d | nn.Linear):
            continue
        if isinstance(mod, nn.Conv2d):
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            mod.out_channels = w.shape[0]
            mod.groups = w.shape[0] if depthwise else mod.groups
            mod.in_channels = w.shape[1] * mod.groups
        elif isinstance(mod, nn.BatchNorm2d):
            mod.num_features = w.shape[0]
            for buf in ("running_mean", "running_var"):
                setattr(mod, buf, torch.empty_like(state[prefix + buf]))
        else:
            mod.out_features, mod.in_features = w.shape
        mod.weight = nn.Parameter(torch.empty_like(w))
        if getattr(mod, "bias", None) is not None and prefix + "bias" in state:
            mod.bias = nn.Parameter(torch.empty_like(state[prefix + "bias"]))
    model.load_state_dict(state, strict=True)
    return model


def save_state(model: nn.Module, path: str | Path) -> None:
    """A plain state_dict on CPU (loadable with ``weights_only=True``), written atomically."""
    import os
    import tempfile

    path = Path(path)
    from edge_tl.fsutil import chmod_default

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        chmod_default(tmp, directory=False)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(backbone: str, num_classes: int, path: str | Path, dropout: float = 0.2) -> nn.Module:
    """A model saved by :func:`save_state`, pruned or not."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return reshape_to(build(backbone, num_classes, dropout), state)
