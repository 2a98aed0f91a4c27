"""The INT8 form a bundle ships: Q/DQ ONNX with standard operators (TensorRT's explicit quantization).

Shared by both machines: the workstation's quantizer checks what it wrote against it, and the device's ONNX
Runtime runner refuses to evaluate a model "with Q/DQ in float" that holds operators only integer kernels run.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from edge_tl.core.errors import EdgeTLError

# Operators TensorRT's explicit-quantization path does not take (ORT's QOperator format / integer ops).
FORBIDDEN_OPS = frozenset({"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QLinearAdd",
                           "QLinearMul", "QLinearGlobalAveragePool", "QGemm", "DynamicQuantizeLinear"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def check_float_qdq(model: onnx.ModelProto | str | Path | bytes) -> None:
    """Refuse a model that ONNX Runtime cannot evaluate with its Q/DQ in float (see edge_tl.device.runtime.onnxrt):
    an operator that exists only as an integer kernel (QLinearConv, ConvInteger, ...) or one from another
    domain (com.microsoft's QuantizeLinear, QLinear*, ...) would run on the CPU's integer kernels whatever the
    session says. The error names the first such node. A file ONNX cannot parse is left to ONNX Runtime."""
    label = "the model"
    if not isinstance(model, onnx.ModelProto):
        try:
            if isinstance(model, bytes):
                model = onnx.load_from_string(model)
            else:
                label = Path(model).name
                model = onnx.load(str(model), load_external_data=False)
        except Exception:  # not ONNX: ONNX Runtime's own load error says so
            return
    for node in model.graph.node:
        why = None
        if node.domain not in ("", "ai.onnx"):
            why = f"an operator of domain '{node.domain}'"
        elif node.op_type in FORBIDDEN_OPS:
            why = "an integer-only operator"
        if why:
            name = node.name or f"node_of_{node.output[0]}"  # as TensorRT's ONNX parser names it
            raise EdgeTLError(f"node '{name}' ({node.op_type}) of {label} is {why}, which "
                              "ONNX Runtime cannot evaluate with Q/DQ in float (only with its CPU integer kernels)",
                              "quantize in QDQ format with standard ONNX ops (edge-tl build does), or measure this "
                              "model on TensorRT")
