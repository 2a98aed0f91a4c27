"""Grad-CAM explanations for the build report: did pruning change what the model looks at?

Grad-CAM (Selvaraju et al., ICCV 2017) weights a convolutional layer's feature maps by the spatially averaged
gradient of a class score and keeps the positive part: a coarse map of the pixels that raised that score. It is
computed with Captum's ``LayerGradCam`` (PyTorch's interpretability library, the workstation extra; imported
through edge_tl.core.importer, never by the device side) for the fine-tuned model and for the shipped pruned model
(the pruned + recovered PyTorch model, before quantization: Grad-CAM needs gradients, which the INT8 ONNX model
does not have).

The layer is picked automatically (:func:`target_layer`): the last block of the backbone's ``features`` (the last
conv block of MobileNetV2/V3 and SqueezeNet) whose output map is at least ``min_cells`` x ``min_cells``. At 224
pixels that is the last conv block itself (7x7 map); on small inputs the last blocks shrink to 1x1, where a map
cannot localise anything, so an earlier block is taken (the demo's 32x32 MobileNetV2: ``features.6``, 4x4). Both
models use the same layer (pruning keeps the architecture's blocks, only thinner).

The report shows a few correctly and wrongly classified test images of each class (classified by the shipped INT8
model), each with both models' maps for their own predicted class, and one number per class on how much pruning
changed the attention: the mean Pearson correlation between the two models' maps for the true class over that
class's test images (1: the same map), with the mean IoU of their top-20% regions beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

#: share of a map's pixels that make up its "top region" for the IoU
TOP_SHARE = 0.2


def feature_blocks(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of the children of ``model.features`` that hold a convolution, in order; else every Conv2d."""
    from torch import nn

    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        blocks = [(f"features.{name}", m) for name, m in features.named_children()
                  if isinstance(m, nn.Conv2d) or any(isinstance(c, nn.Conv2d) for c in m.modules())]
        if blocks:
            return blocks
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def target_layer(model: Any, input_size: tuple[int, int], min_cells: int = 4) -> str:
    """The name of the last conv block whose output map is at least ``min_cells`` on both sides (the first block
    when none is); measured with one forward pass of a zero image."""
    import torch

    blocks = feature_blocks(model)
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:])))
             for name, m in blocks]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    fits = [name for name, _ in blocks if name in sizes and min(sizes[name]) >= min_cells]
    return fits[-1] if fits else blocks[0][0]


def grad_cam(model: Any, layer: str, x: np.ndarray, targets: np.ndarray, batch: int = 64) -> np.ndarray:
    """Grad-CAM maps (N, H, W) of ``model`` at ``layer`` for the class ``targets[i]`` of each image, upsampled
    (bilinear) to the input size and scaled to [0, 1] per image (an all-zero map stays zero)."""
    import torch

    from edge_tl.core.importer import require

    captum = require("captum.attr", "Grad-CAM explanations in the build report (report.explain)")
    model.eval()
    cam = captum.LayerGradCam(model, model.get_submodule(layer))
    out = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))
        tb = torch.from_numpy(np.asarray(targets[i:i + batch], dtype=np.int64))
        attr = cam.attribute(xb, target=tb, relu_attributions=True)
        attr = captum.LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")
        out.append(attr.detach()[:, 0].clamp_min(0).numpy())
    maps = np.concatenate(out).astype(np.float64) if out else np.zeros((0, *x.shape[-2:]))
    peak = maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0)
    return (maps / np.where(peak > 0, peak, 1.0)[:, None, None]).astype(np.float32)


def map_agreement(a: np.ndarray, b: np.ndarray, top_share: float = TOP_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Per pair of maps: Pearson correlation (NaN when either map is constant) and IoU of the top ``top_share``
    pixels of each."""
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    ac, bc = a2 - a2.mean(1, keepdims=True), b2 - b2.mean(1, keepdims=True)
    den = np.sqrt((ac ** 2).sum(1) * (bc ** 2).sum(1))
    corr = np.where(den > 0, (ac * bc).sum(1) / np.where(den > 0, den, 1.0), np.nan)
    k = max(1, int(round(top_share * a2.shape[1])))
    ta = np.zeros_like(a2, dtype=bool)
    tb = np.zeros_like(b2, dtype=bool)
    np.put_along_axis(ta, np.argsort(-a2, axis=1, kind="stable")[:, :k], True, axis=1)
    np.put_along_axis(tb, np.argsort(-b2, axis=1, kind="stable")[:, :k], True, axis=1)
    iou = (ta & tb).sum(1) / (ta | tb).sum(1)
    return corr, iou


def pick_examples(y: np.ndarray, pred: np.ndarray, per_class: int = 1, max_images: int = 12) -> list[int]:
    """Up to ``per_class`` correctly and ``per_class`` wrongly classified test images of each class (the first in
    test order), round-robin over the classes until ``max_images``; sorted by class."""
    picks: list[list[int]] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        right, wrong = idx[pred[idx] == c][:per_class], idx[pred[idx] != c][:per_class]
        picks.append([int(i) for pair in zip_longest(right, wrong) for i in pair if i is not None])
    out: list[int] = []
    while len(out) < max_images and any(picks):
        for row in picks:
            if row and len(out) < max_images:
                out.append(row.pop(0))
    return sorted(out, key=lambda i: (int(y[i]), i))


@dataclass
class Explanation:
    layer: str
    examples: list[int]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    figure: str | None = None


def explain(finetuned: Any, pruned: Any, x: np.ndarray, y: np.ndarray, shipped_pred: np.ndarray, classes: list[str],
            figure: Path, *, mean: tuple[float, ...], std: tuple[float, ...], per_class: int = 1,
            max_images: int = 12, metric_per_class: int = 20) -> Explanation:
    """Grad-CAM of both models on the test split: the per-class agreement (up to ``metric_per_class`` images of
    each class, true class as the target) and the overlay figure of :func:`pick_examples` (each model's predicted
    class as the target). One Grad-CAM pass per model covers both."""
    import torch

    start = time.perf_counter()
    layer = target_layer(finetuned, tuple(x.shape[-2:]))
    metric_idx = np.concatenate([np.flatnonzero(y == c)[:metric_per_class] for c in range(len(classes))]).astype(int)
    examples = pick_examples(y, shipped_pred, per_class, max_images)
    ex = np.asarray(examples, dtype=int)
    preds, cams = {}, {}
    for name, model in (("finetune", finetuned), ("prune", pruned)):
        model.eval()
        with torch.no_grad():
            preds[name] = model(torch.from_numpy(x[ex])).argmax(1).numpy() if len(ex) else np.zeros(0, int)
        maps = grad_cam(model, layer, x[np.concatenate([metric_idx, ex])],
                        np.concatenate([y[metric_idx], preds[name]]), batch=128)
        cams[name] = (maps[:len(metric_idx)], maps[len(metric_idx):])
    corr, iou = map_agreement(cams["finetune"][0], cams["prune"][0])
    rows: list[dict[str, Any]] = []
    for c, name in enumerate(classes):
        sel = y[metric_idx] == c
        n = int(sel.sum())
        rows.append({"class": name, "images": n,
                     "correlation": None if not n or np.isnan(corr[sel]).all() else float(np.nanmean(corr[sel])),
                     "iou_top20": float(iou[sel].mean()) if n else None,
                     "constant_maps": int(np.isnan(corr[sel]).sum())})
    result = Explanation(layer, examples, rows)
    if examples:
        _figure(x[ex], y[ex], shipped_pred[ex], preds, {k: v[1] for k, v in cams.items()}, classes, figure,
                mean, std, layer)
        result.figure = figure.name
    result.seconds = time.perf_counter() - start
    return result


def _figure(x: np.ndarray, y: np.ndarray, shipped: np.ndarray, preds: dict[str, np.ndarray],
            cams: dict[str, np.ndarray], classes: list[str], path: Path, mean: tuple[float, ...],
            std: tuple[float, ...], layer: str) -> None:
    from edge_tl.core.importer import require

    mpl = require("matplotlib", "the build report's plots")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    rgb = np.clip(x.transpose(0, 2, 3, 1) * np.asarray(std) + np.asarray(mean), 0, 1)
    n = len(x)
    fig, axes = plt.subplots(n, 3, figsize=(5.4, 1.75 * n + 0.4), squeeze=False)
    titles = ("image", "fine-tuned", "pruned (before INT8)")
    for r in range(n):
        verdict = "right" if shipped[r] == y[r] else f"wrong: {classes[shipped[r]]}"
        axes[r, 0].imshow(rgb[r])
        axes[r, 0].set_title(f"{classes[y[r]]} (INT8 {verdict})", fontsize=7)
        for col, key in ((1, "finetune"), (2, "prune")):
            axes[r, col].imshow(rgb[r])
            axes[r, col].imshow(cams[key][r], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            axes[r, col].set_title(f"{titles[col]}: {classes[preds[key][r]]}", fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle(f"Grad-CAM at {layer}, map of each model's predicted class", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_section(ctx: Any, plots: Path) -> list[str]:
    """The report's explanation section (``report.explain``); draws ``plots/gradcam.png``."""
    from edge_tl.workstation.pipeline.stages import MODEL_PT
    from edge_tl.workstation.train import load_state

    s = ctx.spec
    if not s.report.explain:
        return []
    n = len(ctx.classes)
    models = [load_state(s.model.backbone, n, ctx.folder(k) / MODEL_PT, s.model.dropout) for k in ("finetune", "prune")]
    x, y = ctx.arrays("test")
    shipped = np.load(ctx.folder("quantize") / "test_predictions.npy")
    plots.mkdir(exist_ok=True)
    e = explain(*models, x, y, shipped, ctx.classes, plots / "gradcam.png", mean=ctx.pre.mean, std=ctx.pre.std,
                max_images=s.report.explain_images)
    ctx.console.print(f"explanations: Grad-CAM at {e.layer} for {len(e.examples)} test images and the per-class "
                      f"agreement ({e.seconds:.1f} s)")
    import json

    from edge_tl.core.fsutil import atomic_write_text

    atomic_write_text(plots / "gradcam.json", json.dumps({"layer": e.layer, "examples": e.examples,
                                                          "per_class": e.per_class, "seconds": round(e.seconds, 3),
                                                          "pruned_model": "pruned + recovered PyTorch model, before "
                                                          "quantization"}, indent=2) + "\n")
    lines = ["", "## Explanations: where the models look (Grad-CAM)", "",
             f"Grad-CAM (Captum `LayerGradCam`) at `{e.layer}`, the last conv block of the backbone with a map of at "
             "least 4x4 cells, for the fine-tuned model and the shipped pruned model (the pruned + recovered PyTorch "
             "model **before quantization**: Grad-CAM needs gradients, the INT8 model has none). Each map is that "
             "model's predicted class; right/wrong is the shipped INT8 model's answer.", "",
             "How much pruning changed the attention, per class (maps for the true class, test images): mean Pearson "
             "correlation of the two models' maps (1 = the same map) and mean IoU of their top-20% regions.", "",
             "| class | images | correlation | IoU (top 20%) |", "|---|---|---|---|"]
    for r in e.per_class:
        corr = "-" if r["correlation"] is None else f"{r['correlation']:.3f}"
        iou = "-" if r["iou_top20"] is None else f"{r['iou_top20']:.3f}"
        note = f" ({r['constant_maps']} constant maps left out)" if r["constant_maps"] else ""
        lines.append(f"| {r['class']} | {r['images']} | {corr}{note} | {iou} |")
    if e.figure:
        lines += ["", f"![Grad-CAM overlays](plots/{e.figure})"]
    return lines


def run_model(run: str | Path) -> tuple[Any, Any]:
    """The PyTorch model a finished build's bundle ships, before INT8 (the pruned one; the fine-tuned one for a build
    without pruning), in eval mode, with the run's parent record (``edge_tl.workstation.continual.load_parent``:
    its bundle verified)."""
    from edge_tl.workstation.continual import load_parent
    from edge_tl.workstation.train.backbones import load_state

    parent = load_parent(run)  # a finished run whose bundle verifies
    keys = json.loads((parent.run / "run.json").read_text())["stage_keys"]
    pruned = parent.run / "stages" / f"prune-{keys.get('prune')}" / "model.pt"
    path = pruned if keys.get("prune") and pruned.is_file() else parent.start
    model = load_state(parent.spec.model.backbone, len(parent.bundle.labels), path, parent.spec.model.dropout)
    return model.eval(), parent


def run_explainer(run: str | Path) -> tuple[Any, Any]:
    """Grad-CAM for the label page (edge_tl.workstation.label.Explain) from a finished build's run folder
    (``edge-tl label --run RUN``): the pruned model the bundle ships (before INT8; the fine-tuned one for a build
    without pruning), this module's Grad-CAM, its map laid back over the whole picture (the model saw the centre
    crop of the resized picture). Returns (explain, the run's bundle, verified)."""
    from PIL import Image

    model, parent = run_model(run)
    bundle = parent.bundle
    cfg = bundle.preprocessor.config
    layer = target_layer(model, tuple(cfg.input_size))

    def explain(image: Any, index: int) -> np.ndarray:
        x = np.asarray(bundle.preprocessor(image), dtype=np.float32)[None]
        cam = grad_cam(model, layer, x, np.asarray([index]))[0]
        w, h = image.size
        (rw, rh), (left, top) = bundle.preprocessor.geometry(w, h)
        ch, cw = cfg.input_size
        frame = np.zeros((rh, rw), dtype=np.float32)  # outside the crop the model saw nothing
        frame[top:top + ch, left:left + cw] = cam
        back = Image.fromarray(frame, mode="F").resize((w, h), Image.Resampling.BILINEAR)
        return np.clip(np.asarray(back, dtype=np.float32), 0, 1)

    return explain, bundle
