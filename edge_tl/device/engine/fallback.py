"""Layer fallback for INT8: keep named layers out of INT8, and find the layers worth keeping.

Where the parity gate fails at INT8 (depthwise convolutions of MobileNet-style nets are the usual suspects),
keep the K layers that hurt most in higher precision and rebuild. Two mechanisms, one per build precision:

- **INT8 / best** (the bundle's Q/DQ model, explicit quantization): TensorRT runs a layer in INT8 exactly where
  the Q/DQ nodes say so, and ignores precision constraints there. So :func:`keep_layers_model` rewrites the Q/DQ
  model: each kept node reads the float tensors its DequantizeLinear inputs approximate (the tensor entering the
  activation's QuantizeLinear; the FP32 weight of the same name from ``model.onnx``, or the dequantized weight
  when there is none), and Q/DQ pairs left unused are dropped. No re-calibration: every other layer keeps the
  scales the workstation calibrated. TensorRT then runs the kept layers in FP32 (``int8``) or FP16/FP32 (``best``).
- **FP16**: ``BuildSpec.keep_layers`` sets ``layer.precision`` and the output types of the named layers and the
  OBEY_PRECISION_CONSTRAINTS flag (``--precisionConstraints=obey --layerPrecisions`` with trtexec).

Layers are named as TensorRT's ONNX parser names them: the ONNX node name, or ``node_of_<first output>`` for
an unnamed node. :func:`sensitivity` ranks the quantized layers worst first: for each one, the model with only
that layer in float is run with ONNX Runtime (CPU, Q/DQ evaluated in float as TensorRT computes it, so the
ranking is the same on every CPU; ORT's integer kernels are never used) on the golden inputs, and the layer's
score is how much the error against the golden FP32 outputs drops. Everything here is torch-free (onnx + onnxruntime).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_write_bytes

#: Ops whose quantization the sensitivity pass ranks by default (those carrying weights).
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def node_id(node: onnx.NodeProto) -> str:
    """The name TensorRT gives the layer(s) of ``node`` (onnx-tensorrt's ``getNodeName``)."""
    return node.name or (f"node_of_{node.output[0]}" if node.output else "")


def quantized_nodes(model: onnx.ModelProto, ops: Sequence[str] | None = WEIGHTED_OPS) -> list[onnx.NodeProto]:
    """Non-Q/DQ nodes that read at least one DequantizeLinear output (optionally only of the given op types)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n for n in model.graph.node if n.op_type not in _QDQ and (ops is None or n.op_type in ops)
            and any(i in dq_outputs for i in n.input)]


def _dequantized(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if np.ndim(scale) == 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = np.reshape(zp, shape) if np.ndim(zp) == 1 else zp
    return ((q - zp) * scale).astype(np.float32)


def keep_layers_in_float(int8: onnx.ModelProto, names: Iterable[str],
                         fp32: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A copy of the Q/DQ model ``int8`` in which the named layers read float inputs (see the module doc)."""
    model = onnx.ModelProto()
    model.CopyFrom(int8)
    graph = model.graph
    wanted = list(dict.fromkeys(names))
    by_id = {node_id(n): n for n in graph.node}
    missing = [n for n in wanted if n not in by_id]
    if missing:
        sample = ", ".join(node_id(n) for n in quantized_nodes(model)[:6])
        raise EdgeTLError(f"layer(s) {', '.join(missing)} are not in the INT8 model (its quantized layers include "
                          f"{sample})", "take names from `edge-tl engine sensitivity BUNDLE`")
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    fp32_inits = {i.name: i for i in fp32.graph.initializer} if fp32 is not None else {}
    added: dict[str, onnx.TensorProto] = {}
    for name in wanted:
        node = by_id[name]
        for idx, tensor in enumerate(node.input):
            dq = producers.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src = dq.input[0]
            q = producers.get(src)
            if q is not None and q.op_type == "QuantizeLinear":  # activation: read what entered the Q node
                node.input[idx] = q.input[0]
            elif src in inits:  # quantized weight or bias
                float_name = f"{src}__float"
                if float_name not in added:
                    base = src[: -len("_quantized")] if src.endswith("_quantized") else src
                    ref = fp32_inits.get(base)
                    arr = (numpy_helper.to_array(ref).astype(np.float32)
                           if ref is not None and list(ref.dims) == list(inits[src].dims) else _dequantized(dq, inits))
                    added[float_name] = numpy_helper.from_array(arr, float_name)
                node.input[idx] = float_name
    graph.initializer.extend(added.values())
    _drop_dead_nodes(graph)
    return model


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def keep_layers_model(int8_path: str | Path, names: Sequence[str], out_dir: str | Path,
                      fp32_path: str | Path | None = None) -> Path:
    """Write the Q/DQ model with ``names`` kept in float to ``out_dir`` (named by a hash of inputs); returns it."""
    int8_path = Path(int8_path)
    raw = int8_path.read_bytes()
    digest = hashlib.sha256(raw + "\0".join(sorted(names)).encode()).hexdigest()[:16]
    out = Path(out_dir) / f"{int8_path.name.removesuffix('.onnx')}.keep-{digest}.onnx"
    if out.is_file():
        return out
    fp32 = onnx.load(str(fp32_path)) if fp32_path else None
    model = keep_layers_in_float(onnx.load_from_string(raw), names, fp32)
    onnx.checker.check_model(model)
    atomic_write_bytes(out, model.SerializeToString())
    return out


# -- sensitivity ------------------------------------------------------------------------------------------
@dataclass
class LayerScore:
    name: str
    op_type: str
    rel_error: float  # mean |out - golden| / mean |golden| with only this layer in float
    gain: float  # baseline rel_error - rel_error: how much keeping this layer helps
    top1_agreement: float


@dataclass
class SensitivityReport:
    baseline_rel_error: float
    baseline_top1_agreement: float
    layers: list[LayerScore] = field(default_factory=list)  # worst (largest gain) first

    def worst(self, k: int) -> list[str]:
        return [layer.name for layer in self.layers[:k]]

    def to_dict(self) -> dict:
        return asdict(self)


def _errors(out: np.ndarray, golden: np.ndarray) -> tuple[float, float]:
    rel = float(np.abs(out - golden).mean() / (np.abs(golden).mean() or 1.0))
    n = golden.shape[0]
    agree = float((out.reshape(n, -1).argmax(1) == golden.reshape(n, -1).argmax(1)).mean())
    return rel, agree


def _run(model: onnx.ModelProto, inputs: np.ndarray, threads: int | None) -> np.ndarray:
    from edge_tl.device.runtime.onnxrt import SessionFromOnnx

    session = SessionFromOnnx(model.SerializeToString(), intra_op_threads=threads, qdq="float")()
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


def sensitivity(int8_path: str | Path, inputs: np.ndarray, golden: np.ndarray, *,
                fp32_path: str | Path | None = None, ops: Sequence[str] | None = WEIGHTED_OPS,
                threads: int | None = None, progress: Callable[[str], None] | None = None) -> SensitivityReport:
    """Rank the quantized layers of ``int8_path`` worst first (see the module doc). ONNX Runtime CPU only."""
    int8 = onnx.load(str(int8_path))
    fp32 = onnx.load(str(fp32_path)) if fp32_path else None
    candidates = quantized_nodes(int8, ops)
    if not candidates:
        raise EdgeTLError(f"{Path(int8_path).name} has no quantized layers of types {list(ops or [])}",
                          "give the bundle's Q/DQ model (model.int8.onnx)")
    base_rel, base_top1 = _errors(_run(int8, inputs, threads), golden)
    scores = []
    for node in candidates:
        name = node_id(node)
        if progress:
            progress(name)
        rel, top1 = _errors(_run(keep_layers_in_float(int8, [name], fp32), inputs, threads), golden)
        scores.append(LayerScore(name, node.op_type, rel, base_rel - rel, top1))
    scores.sort(key=lambda s: s.gain, reverse=True)
    return SensitivityReport(base_rel, base_top1, scores)
