"""INT8 accuracy as TensorRT computes it, on any CPU: ONNX Runtime with Q/DQ evaluated in float
(edge_tl.device.runtime.onnxrt, ``qdq="float"``), checked against ONNX's pure-numpy reference evaluator; models it
cannot evaluate that way are refused by name; the statistics the build report judges targets with."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from bundle_factory import tiny_onnx
from onnx import helper

from edge_tl.core.bundle import Bundle
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.qdq import check_float_qdq
from edge_tl.device.runners import create_runner
from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner, SessionFromOnnx
from edge_tl.workstation.stats import MET, MISSED, UNSURE, paired, verdict, wilson

ort = pytest.importorskip("onnxruntime")


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for op in model.opset_import:  # onnx.reference implements Q/DQ from opset 19 (INT8 maths unchanged since 13)
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, 19)
    return ReferenceEvaluator(model).run(None, {"input": x})[0]


def test_float_qdq_computes_what_the_onnx_spec_says(tiny_bundle_src):
    """The tiny bundle's Q/DQ model (Conv, Relu, pooling, Gemm, its logits quantized too) on the golden inputs:
    ORT with Q/DQ in float against onnx.reference, which runs every QuantizeLinear/DequantizeLinear as written."""
    bundle = Bundle.open(tiny_bundle_src)
    path, x = bundle.model_path("int8"), bundle.golden_inputs()
    model = onnx.load(str(path))
    ref = _reference(model, x)
    with OnnxRuntimeRunner.from_path(path, qdq="float") as runner:
        got = runner.infer(x)["logits"]
        assert runner.describe()["qdq"] == "float"
    # the logits pass a QuantizeLinear: values are multiples of its scale. Summing floats in another order may
    # move a value across a rounding boundary (one step); anything more would be different maths.
    out_q = next(n for n in model.graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] == "logits_QuantizeLinear_Input")
    scale = float(onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == out_q.input[1])))
    assert np.abs(got - ref).max() <= 1.01 * scale
    assert np.mean(got == ref) >= 0.9
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))


def test_modes_and_unknown_mode(tiny_bundle_src):
    path = Bundle.open(tiny_bundle_src).model_path("int8")
    with OnnxRuntimeRunner.from_path(path) as runner:  # ORT's default: its own CPU kernels (for latency)
        assert runner.describe()["qdq"] == "kernels"
        assert np.isfinite(runner.infer(Bundle.open(tiny_bundle_src).golden_inputs())["logits"]).all()
    with pytest.raises(EdgeTLError, match="unknown Q/DQ mode 'int'"):
        OnnxRuntimeRunner.from_path(path, qdq="int")
    # the session really carries the switch (ORT's config key, onnxruntime_session_options_config_keys.h)
    sess = SessionFromOnnx(path, qdq="float")()
    assert sess.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"


def _with_node(tmp_path, node: onnx.NodeProto, name: str):
    """The tiny FP32 model with ``node`` appended before the output (no silent pass-through: the node must run)."""
    model = onnx.load(str(tiny_onnx(tmp_path / "fp32.onnx")))
    g = model.graph
    last = g.node[-1]
    last.output[0] = "pre_logits"
    node.input[0] = "pre_logits"
    node.output[0] = "logits"
    g.node.append(node)
    if node.domain:
        model.opset_import.append(helper.make_opsetid(node.domain, 1))
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_models_float_mode_cannot_evaluate_are_refused_by_node(tmp_path):
    """No silent fallback to the kernel path: an integer-only op or an op of another domain is a one-line error
    naming the node."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    fp32 = tiny_onnx(tmp_path / "tiny.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(tmp_path / "qop.onnx"), Reader(), quant_format=QuantFormat.QOperator)
    qlinear = next(n for n in onnx.load(tmp_path / "qop.onnx").graph.node if n.op_type == "QLinearConv")
    name = qlinear.name or f"node_of_{qlinear.output[0]}"  # TensorRT's name for an unnamed node
    with pytest.raises(EdgeTLError) as exc:  # what `engine check --backend ort-cpu --precision int8` runs
        create_runner(tmp_path / "qop.onnx", "ort-cpu", "int8", qdq="float").activate()
    msg = exc.value.one_line()
    assert f"node '{name}' (QLinearConv) of qop.onnx is an integer-only operator" in msg
    assert "\n" not in msg
    ms = helper.make_node("QuantizeLinear", ["x", "s"], ["y"], name="ms_quant", domain="com.microsoft")
    with pytest.raises(EdgeTLError, match="node 'ms_quant' \\(QuantizeLinear\\) .* of domain 'com.microsoft'"):
        check_float_qdq(_with_node(tmp_path, ms, "ms.onnx"))
    # the kernel path still loads the QOperator model (it is what ORT CPU latency measures)
    OnnxRuntimeRunner.from_path(tmp_path / "qop.onnx").activate().deactivate()
    check_float_qdq(fp32)  # a plain float model is fine
    check_float_qdq(b"not an onnx model")  # left to ONNX Runtime's own load error


def test_wilson_interval():
    lo, hi = wilson(342, 400)
    assert lo < 342 / 400 < hi and lo == pytest.approx(0.8171, abs=1e-4) and hi == pytest.approx(0.8861, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)


def test_paired_mcnemar_and_bootstrap():
    a = np.ones(400, bool)
    b = a.copy()
    b[:6] = False  # B misses 6 images A gets right, no image the other way round
    p = paired(a, b)
    assert (p.a_only, p.b_only, p.n) == (6, 0, 400) and p.diff_points == pytest.approx(1.5)
    assert p.mcnemar_p == pytest.approx(2 * 0.5 ** 6)  # exact two-sided binomial on 6 discordant images
    lo, hi = p.ci_points
    assert 0 <= lo < 1.5 < hi and paired(a, b).ci_points == (lo, hi)  # seeded: the same every time
    same = paired(a, a)
    assert same.mcnemar_p == 1.0 and same.ci_points == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired(a, a[:10])


def test_verdicts():
    assert verdict(-0.5, 0.8, 1.0, at_most=True) == MET
    assert verdict(1.2, 3.0, 1.0, at_most=True) == MISSED
    assert verdict(0.2, 1.7, 1.0, at_most=True) == UNSURE == "not distinguishable from the target at this test size"
    assert verdict(22, 40, 20, at_most=False) == MET and verdict(5, 15, 20, at_most=False) == MISSED
    assert verdict(15, 25, 20, at_most=False) == UNSURE


def test_build_warning_when_kernels_and_float_differ():
    from edge_tl.workstation.pipeline.stages import kernel_gap_note

    assert kernel_gap_note(0.883, 0.878) is None  # within a point: nothing to say
    note = kernel_gap_note(0.883, 0.732)
    assert "-15.1 points" in note and "TensorRT does not run those kernels and is not affected" in note
    assert "VNNI" in note and "\n" not in note
