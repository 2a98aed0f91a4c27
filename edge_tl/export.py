"""FP32 ONNX export: dynamic batch, onnxslim-simplified, checked, and compared with PyTorch.

The TorchScript exporter (``torch.onnx.export(dynamo=False)``) is used: it runs offline without
onnxscript, emits plain ONNX ops at the requested opset (17 by default, which TensorRT 8.5 through 10.x
parse), and supports ``dynamic_axes`` for the batch dimension. The file appears at ``path`` only after
every check passed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edge_tl.errors import CheckFailed, EdgeTLError, InternalError
from edge_tl.fsutil import chmod_default
from edge_tl.targets import DEFAULT_TARGET, get_target

log = logging.getLogger(__name__)

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the INT8 stage) need opset 13


@dataclass
class ExportResult:
    path: Path
    opset: int
    max_abs_diff: float | None  # ONNX Runtime vs PyTorch, over every checked batch (None: not checked)
    slimmed: bool
    checked_batches: tuple[int, ...] = ()
    op_types: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"path": str(self.path), "opset": self.opset, "max_abs_diff": self.max_abs_diff,
                "slimmed": self.slimmed, "checked_batches": list(self.checked_batches), "op_types": self.op_types}


def check_opset(opset: int, target: str | None = None) -> int:
    """``opset`` if the target's TensorRT accepts it and ORT quantization can work with it, else EdgeTLError."""
    tgt = get_target(target or DEFAULT_TARGET)
    if opset > tgt.max_opset:
        raise EdgeTLError(f"ONNX opset {opset} is above what TensorRT {tgt.tensorrt} (target {tgt.name}) accepts "
                          f"(max {tgt.max_opset})", f"use --opset {tgt.export_opset} or lower")
    if opset < MIN_OPSET:
        raise EdgeTLError(f"ONNX opset {opset} is too old for per-channel INT8 Q/DQ",
                          f"use opset {MIN_OPSET}..{tgt.max_opset}")
    return opset


def _slim(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim is not installed: the ONNX model is exported unsimplified")
        return model, False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return onnxslim.slim(model), True
    except Exception as exc:  # onnxslim failing must not lose a valid export; it is recorded as slimmed=False
        log.warning("onnxslim could not simplify the model (%s): keeping the unsimplified export", exc)
        return model, False


def _batch_is_dynamic(model: onnx.ModelProto) -> bool:
    dims = [v.type.tensor_type.shape.dim for v in (*model.graph.input, *model.graph.output)]
    return all(d and d[0].dim_param and not d[0].dim_value for d in dims)


def export_onnx(model: nn.Module, path: str | Path, input_size: Sequence[int] = (224, 224), opset: int = 17,
                input_name: str = "input", output_name: str = "logits", check_against_torch: bool = True, *,
                target: str | None = None, check_batches: Sequence[int] = (1, 3), atol: float = 1e-4,
                rtol: float = 1e-3, slim: bool = True, seed: int = 0) -> ExportResult:
    """Export ``model`` (a copy on CPU, eval mode) to ``path`` as FP32 ONNX with a dynamic batch axis.

    ``target`` (default: the default target) bounds ``opset``. With ``check_against_torch`` the ONNX model is
    run with ONNX Runtime CPU on random inputs at each of ``check_batches`` and compared with PyTorch; a
    difference above ``atol + rtol * max|torch output|`` raises CheckFailed (the export is broken).
    """
    opset = check_opset(int(opset), target)
    h, w = (int(s) for s in input_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_model = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(1, 3, h, w)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        chmod_default(tmp, directory=False)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(cpu_model, (example,), tmp, dynamo=False, opset_version=opset,
                              input_names=[input_name], output_names=[output_name], do_constant_folding=True,
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
        proto = onnx.load(tmp)
        slimmed = False
        if slim:
            proto, slimmed = _slim(proto)
        if not _batch_is_dynamic(proto):
            raise InternalError("the exported ONNX model lost its dynamic batch axis")
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        diff = None
        if check_against_torch:
            diff = _compare(cpu_model, tmp, input_name, (h, w), check_batches, atol, rtol, seed)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ExportResult(path, opset, diff, slimmed, tuple(int(b) for b in check_batches) if diff is not None else (),
                        dict(sorted(ops.items())))


def _compare(model: nn.Module, onnx_path: str, input_name: str, size: tuple[int, int], batches: Sequence[int],
             atol: float, rtol: float, seed: int) -> float:
    from edge_tl.runtime.onnxrt import OnnxRuntimeRunner

    rng = np.random.default_rng(seed)
    worst = 0.0
    with OnnxRuntimeRunner.from_path(onnx_path, "ort-cpu") as runner, torch.no_grad():
        for b in batches:
            x = rng.standard_normal((int(b), 3, *size)).astype(np.float32)
            ref = model(torch.from_numpy(x)).numpy()
            got = next(iter(runner.infer({input_name: x}).values()))
            if got.shape != ref.shape:
                raise CheckFailed(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape} at batch {b}",
                                  "report this export bug")
            diff = float(np.max(np.abs(got - ref)))
            worst = max(worst, diff)
            if diff > atol + rtol * float(np.max(np.abs(ref))):
                raise CheckFailed(f"ONNX and PyTorch outputs differ by {diff:.3g} at batch {b}",
                                  "the export is wrong: try another opset (--opset) and report it")
    return worst
