"""Sensitivity-guided mixed precision on the workstation: the fewest layers kept in float that bring an INT8
Q/DQ model within its accuracy target.

The ranking is the device's INT8 fallback ranking (:func:`edge_tl.device.engine.fallback.sensitivity`: each
quantized Conv/Gemm alone in float, Q/DQ evaluated in float as TensorRT computes it, scored by how much the error
against the FP32 model's outputs drops), here on the images it is given (the build passes its decision set:
validation images and their augmented copies) with the FP32 ONNX model's outputs as the reference. Sets are
tried smallest first, the top 1, 2, ... layers of the ranking
(:func:`edge_tl.device.engine.fallback.keep_layers_in_float`, the same rewrite the device applies), until the
accuracy on those images (Q/DQ in float) is within the target of the FP32 model's. Torch-free (onnx + ONNX
Runtime).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edge_tl.core.fsutil import atomic_write_bytes


@dataclass
class MixedResult:
    met: bool  # the chosen set meets the target on validation
    layers: list[str]  # kept in float (empty: no set tried)
    val_top1: float
    val_cost_points: float  # FP32 - mixed, validation, points
    tried: list[dict] = field(default_factory=list)  # {"k", "layers", "val_top1", "val_cost_points"} per set
    ranking: list[dict] = field(default_factory=list)  # {"name", "op_type", "gain"}, worst first
    macs_share: dict[str, float] = field(default_factory=dict)  # layer -> share of the model's Conv/Gemm MACs

    def summary(self) -> dict:
        return asdict(self)


def _predict(model: onnx.ModelProto, x: np.ndarray, batch: int = 256) -> np.ndarray:
    from edge_tl.device.runtime.onnxrt import SessionFromOnnx

    session = SessionFromOnnx(model.SerializeToString(), qdq="float")()
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: np.ascontiguousarray(x[i:i + batch])})[0]
                           for i in range(0, len(x), batch)])


def keep_sensitive(int8_path: str | Path, x: np.ndarray, y: np.ndarray, fp32_logits: np.ndarray,
                   max_cost_points: float, max_layers: int, out_path: str | Path, *, rank_images: int = 256,
                   seed: int = 0, progress: Callable[[str], None] | None = None) -> MixedResult:
    """Write to ``out_path`` the model ``int8_path`` with the smallest top-k of the sensitivity ranking kept in
    float whose validation top-1 (``x``, ``y``) is within ``max_cost_points`` of the FP32 model's (whose outputs
    on ``x`` are ``fp32_logits``); k = 1 .. ``max_layers``. When no k meets it, the k with the best validation
    top-1 (the smallest on a tie) is written and ``met`` is False."""
    from edge_tl.device.engine.fallback import keep_layers_in_float, sensitivity

    fp32_top1 = float((fp32_logits.argmax(1) == y).mean())
    idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:rank_images])
    report = sensitivity(int8_path, np.ascontiguousarray(x[idx]), fp32_logits[idx], progress=progress)
    int8 = onnx.load(str(int8_path))
    shares = macs_shares(int8)
    ranking = [{"name": s.name, "op_type": s.op_type, "gain": s.gain} for s in report.layers]
    tried, best = [], None
    for k in range(1, min(max_layers, len(report.layers)) + 1):
        names = report.worst(k)
        model = keep_layers_in_float(int8, names)
        top1 = float((_predict(model, x).argmax(1) == y).mean())
        cost = 100 * (fp32_top1 - top1)
        tried.append({"k": k, "layers": names, "val_top1": top1, "val_cost_points": cost})
        if best is None or top1 > best[1]:
            best = (names, top1, cost, model)
        if cost <= max_cost_points:
            best = (names, top1, cost, model)
            break
    if best is None:
        return MixedResult(False, [], float("nan"), float("nan"), tried, ranking, {})
    names, top1, cost, model = best
    onnx.checker.check_model(model)
    atomic_write_bytes(Path(out_path), model.SerializeToString())
    return MixedResult(cost <= max_cost_points, list(names), top1, cost, tried, ranking,
                       {n: shares.get(n, 0.0) for n in names})


def macs_shares(model: onnx.ModelProto) -> dict[str, float]:
    """Each Conv/Gemm node's share of the model's Conv + Gemm multiply-accumulates at batch 1 (from ONNX shape
    inference; the weight found behind its Q/DQ pair). Nodes without inferred shapes are left out."""
    from edge_tl.device.engine.fallback import node_id

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.output)}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def weight_dims(tensor: str) -> list[int] | None:
        for _ in range(3):  # weight -> QuantizeLinear -> DequantizeLinear -> node
            if tensor in inits:
                return inits[tensor]
            node = producers.get(tensor)
            if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                return None
            tensor = node.input[0]
        return inits.get(tensor)

    macs: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        w, out = weight_dims(node.input[1]), shapes.get(node.output[0])
        if not w or not out or any(d <= 0 for d in out[1:]):
            continue
        per_out = int(np.prod(w[1:])) if node.op_type == "Conv" else (w[1] if len(w) > 1 else w[0])
        macs[node_id(node)] = int(np.prod(out[1:])) * per_out
    total = sum(macs.values()) or 1
    return {k: v / total for k, v in macs.items()}

