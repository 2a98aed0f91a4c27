"""Quantization-aware training (QAT) to the same symmetric INT8 Q/DQ ONNX form as post-training quantization.

Implementation: NVIDIA ModelOpt (``nvidia-modelopt``, ``modelopt.torch.quantization``), NVIDIA's maintained
successor of pytorch-quantization, whose ONNX export is TensorRT's explicit-quantization form: FP32 weights
behind a per-channel QuantizeLinear/DequantizeLinear pair (axis 0), per-tensor activation Q/DQ on the input of
every Conv/Gemm, signed INT8 with zero point 0, FP32 biases (what :func:`edge_tl.workstation.quantize.
check_tensorrt_qdq` accepts). PyTorch's own fake-quantize ops (``torch.fake_quantize_per_channel_affine``)
export the same operators, but every quantizer module, its calibration and its placement would be ours to
write and keep; ModelOpt brings them, tested against TensorRT.

Steps (:func:`train_qat`):

1. BatchNorm folded into the convolutions first (``torch.nn.utils.fusion.fuse_conv_bn_eval``), as the FP32
   ONNX export folds it: the weights QAT quantizes are the ones TensorRT runs (BatchNorm statistics stay
   frozen, as in the fine-tune's default ``train.freeze_bn``). Only where a Conv2d and its BatchNorm2d sit in
   one ``nn.Sequential`` (torchvision's MobileNets); timm's EfficientNet-Lite blocks keep their BatchNorm
   (``folded_batchnorms`` = 0 in the stage metrics) between the quantized convolution and its activation,
   which TensorRT fuses into the convolution as it stands ("no need to simulate BN-folding in the training
   network", TensorRT developer guide, Q/DQ fusion). ONNX Runtime's CPU integer kernels take neither form
   (its fusions need a Q on the convolution's output; this form has Q/DQ on the inputs only, folded or not):
   a QAT model runs slower there than a PTQ one (photos: 7.3-8.1 ms against 3.2-3.7 ms, 1 thread,
   benchmarks/RESULTS.md "photos").
2. ``mtq.quantize(model, INT8_DEFAULT_CFG, forward_loop)``: quantizers inserted, ranges (amax) calibrated
   with max calibration on the PTQ stage's calibration images (the same draw; max = ORT's MinMax symmetric).
3. A few epochs of fine-tuning with the quantizers active (straight-through estimator; amax fixed), with
   knowledge distillation from the FP32 fine-tuned model (:func:`edge_tl.workstation.train.fit`'s teacher),
   the best epoch on the validation split kept.
4. Exported with the legacy TorchScript exporter (what ModelOpt's Q/DQ symbolics support), simplified with
   onnxslim, checked: the TensorRT form, Q/DQ evaluable in float, ONNX Runtime (Q/DQ in float) against the
   fake-quantized torch model.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.importer import has_module

#: the fix named when QAT is asked for and ModelOpt (or torch) is missing
QAT_FIX = ("install the workstation extra, which brings nvidia-modelopt: pip install 'edge-tl[workstation,cpu]' "
           "(or set quantize.mode = \"ptq\")")


def check_available(mode: str) -> None:
    """Refuse ``quantize.mode = "qat"`` up front (before any training) when ModelOpt or torch is missing."""
    if mode != "qat":
        return
    for top, dist in (("torch", "torch"), ("modelopt", "nvidia-modelopt")):
        if not has_module(top):
            raise EdgeTLError(f"quantize.mode = \"qat\" needs quantization-aware training, and '{dist}' is not "
                              "installed", QAT_FIX)


def require_modelopt(why: str = "quantize.mode = \"qat\""):
    """``modelopt.torch.quantization``, or a one-line EdgeTLError naming the fix (checked before importing)."""
    for top, dist in (("torch", "torch"), ("modelopt", "nvidia-modelopt")):
        if not has_module(top):
            raise EdgeTLError(f"{why} needs quantization-aware training, and '{dist}' is not installed", QAT_FIX)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import modelopt.torch.quantization as mtq
        except ImportError as exc:  # installed but broken (e.g. a dependency missing)
            raise EdgeTLError(f"{why} needs quantization-aware training, and nvidia-modelopt does not import: "
                              f"{exc}", QAT_FIX) from exc
    return mtq


def fold_batchnorm(model):
    """Fold every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into that convolution
    (in place; eval-mode statistics); the BatchNorm becomes an Identity. Returns how many were folded."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    folded = 0
    for mod in list(model.modules()):
        if not isinstance(mod, nn.Sequential):
            continue
        names = list(mod._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = mod._modules[a], mod._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                mod._modules[a] = fuse_conv_bn_eval(conv, bn)
                mod._modules[b] = nn.Identity()
                folded += 1
    return folded


@dataclass
class QATResult:
    path: Path
    epochs_run: int
    best_epoch: int
    best_val_top1: float  # of the fake-quantized torch model
    seconds: float
    folded_batchnorms: int
    quantizers: int
    max_abs_diff: float  # ONNX Runtime (Q/DQ in float) against the fake-quantized torch model
    op_types: dict[str, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    kept: str = "best"  # the epoch whose weights were exported (quantize.qat_keep)

    def summary(self) -> dict[str, Any]:
        return {"epochs_run": self.epochs_run, "best_epoch": self.best_epoch, "best_val_top1": self.best_val_top1,
                "kept": self.kept,
                "train_seconds": round(self.seconds, 2), "folded_batchnorms": self.folded_batchnorms,
                "quantizers": self.quantizers, "max_abs_diff": self.max_abs_diff,
                "qdq_pairs": self.op_types.get("QuantizeLinear", 0), "implementation": "nvidia-modelopt "
                + _version("nvidia-modelopt"), "calibration": "max (amax) on the PTQ calibration images"}


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def train_qat(model, teacher, backbone: str, calib: np.ndarray, train_ds, val: tuple[np.ndarray, np.ndarray],
              out_path: str | Path, input_size: tuple[int, int], *, epochs: int, lr: float, opset: int,
              target: str | None, distill_weight: float, distill_temperature: float = 4.0, batch_size: int = 32,
              weight_decay: float = 0.0, seed: int = 0, device: str = "auto", calib_batch: int = 64,
              fit_kwargs: dict[str, Any] | None = None) -> QATResult:
    """QAT of ``model`` (an FP32 torch model; a copy is trained) to the Q/DQ ONNX model ``out_path``."""
    import torch

    from edge_tl.workstation.train import fit
    from edge_tl.workstation.train.fit import Phase

    mtq = require_modelopt()
    qmodel = copy.deepcopy(model).cpu().eval()
    folded = fold_batchnorm(qmodel)
    calib = np.ascontiguousarray(calib, dtype=np.float32)

    def forward_loop(m) -> None:
        with torch.no_grad():
            for i in range(0, len(calib), calib_batch):
                m(torch.from_numpy(calib[i:i + calib_batch]))

    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        qmodel = mtq.quantize(qmodel, copy.deepcopy(mtq.INT8_DEFAULT_CFG), forward_loop)
    quantizers = sum(1 for _, m in qmodel.named_modules() if type(m).__name__ == "TensorQuantizer"
                     and getattr(m, "is_enabled", False))
    phases = [Phase("qat", epochs, lr, lr, train_bn=False, early_stop=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit(qmodel, backbone, train_ds, val, phases, batch_size=batch_size, weight_decay=weight_decay,
                  seed=seed, device=device, label="qat", teacher=teacher, distill_weight=distill_weight,
                  distill_temperature=distill_temperature, **(fit_kwargs or {}))
    qmodel.cpu().eval()
    ops, diff = export_qat_onnx(qmodel, out_path, input_size, opset=opset, target=target, check_inputs=calib[:32])
    return QATResult(Path(out_path), res.epochs_run, res.best_epoch, res.best_val_top1, res.seconds, folded,
                     quantizers, diff, ops, res.history, res.kept)


class _quiet:
    """Silence ModelOpt's prints ("Inserted N quantizers") while it calibrates."""

    def __enter__(self):
        import contextlib
        import io

        self._cm = contextlib.redirect_stdout(io.StringIO())
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def export_qat_onnx(qmodel, path: str | Path, input_size: tuple[int, int], *, opset: int, target: str | None,
                    check_inputs: np.ndarray, min_agreement: float = 0.9) -> tuple[dict[str, int], float]:
    """Export the fake-quantized ``qmodel`` to Q/DQ ONNX at ``path`` (atomically) and check it (see the module
    doc) on ``check_inputs`` (real preprocessed images: on random inputs far outside the calibrated ranges the
    two differ by design, ModelOpt clamping to [-127, 127] where QuantizeLinear saturates at -128). Returns (op
    counts, largest |ONNX Runtime - torch| on those images); refuses top-1 agreement below ``min_agreement`` on the
    images that are not near-ties, or when fewer than half of them are decided."""
    import torch

    from edge_tl.core.qdq import check_float_qdq
    from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner
    from edge_tl.workstation.export import export_onnx
    from edge_tl.workstation.quantize import check_tensorrt_qdq

    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        res = export_onnx(qmodel, path, input_size, opset=opset, target=target, check_against_torch=False)
    model = onnx.load(str(path))
    try:
        ops = check_tensorrt_qdq(model)
        check_float_qdq(model)
        zps = _zero_points_checked(model)
        if zps != ops["QuantizeLinear"] + ops["DequantizeLinear"]:
            raise CheckFailed(f"only {zps} of the Q/DQ nodes have a zero point stored as an initializer",
                              "report this export bug (the TensorRT form could not be checked)")
        x = np.ascontiguousarray(check_inputs, dtype=np.float32)
        with OnnxRuntimeRunner.from_path(path, "ort-cpu", qdq="float") as runner, torch.no_grad():
            ref = qmodel(torch.from_numpy(x)).numpy()
            got = next(iter(runner.infer({"input": x}).values()))
        if got.shape != ref.shape:
            raise CheckFailed(f"the QAT model's ONNX output has shape {got.shape}, PyTorch's {ref.shape}",
                              "report this export bug")
        diff = np.abs(got - ref).max(axis=1)
        worst = float(diff.max())
        # near-ties (PyTorch's top-1/top-2 margin within twice the typical |diff|: one rounding step of a
        # borderline activation) may flip either way and say nothing about the export; of the rest, 90% must agree
        # (an activation at the range's end is clamped to -127 by ModelOpt but -128 by QuantizeLinear: one step,
        # enough to flip a close image of a weak model; a broken export agrees on about 1/classes)
        top2 = np.sort(ref, axis=1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) > 2 * float(np.median(diff))
        agree = float((got.argmax(1) == ref.argmax(1))[decided].mean()) if decided.any() else 0.0
        if agree < min_agreement or decided.mean() < 0.5:
            raise CheckFailed(f"the QAT model's ONNX export agrees with PyTorch on only {100 * agree:.1f}% of the "
                              f"{int(decided.sum())} of {len(x)} images that are not near-ties (max |diff| "
                              f"{worst:.3g})", "report this export bug")
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    del res
    return ops, worst


def _zero_points_checked(model: onnx.ModelProto) -> int:
    """Q/DQ nodes whose zero point is an initializer (so check_tensorrt_qdq saw it)."""
    inits = {i.name for i in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
               and len(n.input) > 2 and n.input[2] in inits)
