"""ONNX export (dynamic batch, onnxslim, checker, parity with PyTorch), INT8 Q/DQ quantization, model stats.

A MobileNetV3-Small is trained for two epochs on scikit-learn's handwritten digits (32x32, a few seconds) so
the FP32/INT8 comparison is made on a model that really classifies, not on a random one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch", reason="export is part of the workstation stack (torch)")
torchvision = pytest.importorskip("torchvision", reason="export is part of the workstation stack")
ort = pytest.importorskip("onnxruntime", reason="the checks run the models with ONNX Runtime")

from edge_tl.core.errors import CheckFailed, EdgeTLError  # noqa: E402
from edge_tl.workstation.export import export_onnx  # noqa: E402
from edge_tl.workstation.modelstats import count_macs_params, onnx_latency_ms, onnx_top1, torch_latency_ms  # noqa: E402
from edge_tl.workstation.quantize import FORBIDDEN_OPS, check_tensorrt_qdq, quantize_int8  # noqa: E402

SIZE = (32, 32)


@pytest.fixture(scope="module")
def digits():
    sklearn = pytest.importorskip("sklearn.datasets", reason="the digits data set comes with scikit-learn")
    d = sklearn.load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=SIZE, mode="bilinear").repeat(1, 3, 1, 1)
    x = ((x - 0.3) / 0.4).numpy()
    y = d.target.astype(np.int64)
    return x[:1200], y[:1200], x[1200:], y[1200:]


@pytest.fixture(scope="module")
def trained(digits):
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: far faster than two on a busy 2-core machine
    model.train()
    for _ in range(2):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    with torch.no_grad():  # exact BatchNorm statistics (few steps leave the running averages off)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for i in range(0, len(xt), 200):
            model(xt[i:i + 200])
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export_onnx(trained, tmp_path_factory.mktemp("export") / "model.onnx", SIZE)


@pytest.fixture(scope="module")
def int8(exported, digits, tmp_path_factory):
    calib = digits[0][:64]
    return quantize_int8(exported.path, tmp_path_factory.mktemp("int8") / "model.int8.onnx", calib)


def run(path, x, qdq="float"):
    """Outputs with ONNX Runtime CPU; a Q/DQ model with Q/DQ evaluated in float (as TensorRT computes it, the
    same on every CPU). ``qdq="kernels"``: ORT's fused integer kernels, whose numerics depend on the CPU (an
    AVX2-only EPYC scored 14.6 points below a VNNI Xeon on this very model), so tests assert nothing on their
    accuracy."""
    from edge_tl.device.runtime.onnxrt import SessionFromOnnx

    sess = SessionFromOnnx(path, qdq=qdq)()
    return sess.run(None, {"input": x})[0]


def test_export_is_dynamic_checked_and_matches_torch(exported, trained, digits):
    assert exported.opset == 17 and exported.slimmed and exported.checked_batches == (1, 3)
    assert exported.max_abs_diff is not None and exported.max_abs_diff < 1e-3
    model = onnx.load(exported.path)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type.tensor_type.shape.dim[0].dim_param and out.type.tensor_type.shape.dim[0].dim_param
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, *SIZE]
    assert "HardSwish" in exported.op_types and "Conv" in exported.op_types  # plain ONNX ops TensorRT parses
    assert not any(op.startswith(("ATen", "Custom")) for op in exported.op_types)
    x = digits[2][:5]
    with torch.no_grad():
        ref = trained(torch.from_numpy(x)).numpy()
    for batch in (1, 5):
        got = run(exported.path, x[:batch])
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, ref[:batch], atol=1e-3)
    assert not list(exported.path.parent.glob(".model.onnx*"))  # no temporary file left behind


def test_opset_above_the_target_is_refused(trained, tmp_path):
    with pytest.raises(EdgeTLError, match="opset 18 is above what TensorRT 8.5.2"):
        export_onnx(trained, tmp_path / "a.onnx", SIZE, opset=18, target="jetpack5")
    with pytest.raises(EdgeTLError, match="opset 21 is above what TensorRT 10.3"):
        export_onnx(trained, tmp_path / "b.onnx", SIZE, opset=21)
    with pytest.raises(EdgeTLError, match="too old"):
        export_onnx(trained, tmp_path / "c.onnx", SIZE, opset=11)
    with pytest.raises(EdgeTLError, match="unknown target"):
        export_onnx(trained, tmp_path / "d.onnx", SIZE, target="jetpack99")
    assert list(tmp_path.iterdir()) == []


def test_export_parity_failure_leaves_no_file(trained, tmp_path):
    with pytest.raises(CheckFailed, match="differ by"):
        export_onnx(trained, tmp_path / "m.onnx", SIZE, atol=-1.0, rtol=0.0)  # an impossible tolerance
    assert list(tmp_path.iterdir()) == []


def test_int8_is_tensorrt_qdq(int8, exported):
    assert (int8.method, int8.calib_count, int8.per_channel, int8.for_tensorrt) == ("minmax", 64, True, True)
    model = onnx.load(int8.path)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and not ops & FORBIDDEN_OPS
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    conv_weight_scales = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]]
            assert zp.dtype == np.int8 and not zp.any()  # symmetric signed INT8
        if node.op_type == "Conv":
            dq = producers[node.input[1]]  # the weight goes FP32 -> Q -> DQ -> Conv
            assert dq.op_type == "DequantizeLinear"
            q = producers[dq.input[0]]
            assert q.op_type == "QuantizeLinear" and q.input[0] in inits and inits[q.input[0]].dtype == np.float32
            conv_weight_scales.append(inits[q.input[1]].shape == (inits[q.input[0]].shape[0],))
            if len(node.input) > 2:  # biases stay FP32 (TensorRT refuses INT32 DequantizeLinear)
                assert node.input[2] in inits and inits[node.input[2]].dtype == np.float32
    assert conv_weight_scales and all(conv_weight_scales)  # per-channel weight scales on every Conv
    assert len(int8.quantized_nodes) >= sum(1 for n in model.graph.node if n.op_type == "Conv")
    assert check_tensorrt_qdq(model)["QuantizeLinear"] > 0


def test_int8_accuracy_follows_fp32(int8, exported, digits):
    _, _, xte, yte = digits
    fp32_top1 = onnx_top1(exported.path, xte, yte, batch=128)
    int8_top1 = onnx_top1(int8.path, xte, yte, batch=128)  # Q/DQ in float: what TensorRT computes
    assert fp32_top1 > 0.5  # a real classifier (chance is 0.1)
    assert abs(fp32_top1 - int8_top1) <= 0.03
    agree = (run(exported.path, xte).argmax(1) == run(int8.path, xte).argmax(1)).mean()
    assert agree >= 0.9
    assert run(int8.path, xte[:1]).shape == (1, 10) and run(int8.path, xte[:3]).shape == (3, 10)
    # ONNX Runtime's CPU integer kernels: only what holds on every CPU (they run, batch-dynamic, finite logits)
    kernels = run(int8.path, xte[:3], qdq="kernels")
    assert kernels.shape == (3, 10) and np.isfinite(kernels).all()
    assert 0.0 <= onnx_top1(int8.path, xte[:50], yte[:50], qdq="kernels") <= 1.0


def test_float_qdq_matches_onnx_reference_evaluator(int8, digits):
    """ORT with Q/DQ in float computes what the ONNX spec says: checked against ONNX's pure-numpy reference
    evaluator (onnx.reference), which implements every QuantizeLinear/DequantizeLinear as written."""
    from onnx.reference import ReferenceEvaluator

    _, _, xte, _ = digits
    x = xte[:64]
    model = onnx.load(int8.path)
    for op in model.opset_import:  # onnx.reference implements Q/DQ from opset 19 (INT8 maths unchanged since 13)
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, 19)
    ref = ReferenceEvaluator(model).run(None, {"input": x})[0]
    got = run(int8.path, x)
    # Float sums in another order may move a value across a rounding boundary of a QuantizeLinear (one INT8
    # step, then propagated); anything beyond that would be different maths.
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98
    assert np.abs(got - ref).mean() <= 0.01 * np.abs(ref).mean()


def test_exclude_nodes_stay_fp32_and_other_methods(exported, digits, tmp_path):
    first_conv = next(n.name for n in onnx.load(exported.path).graph.node if n.op_type == "Conv")
    res = quantize_int8(exported.path, tmp_path / "ex.onnx", digits[0][:16], method="percentile",
                        exclude_nodes=[first_conv])
    assert res.excluded_nodes == [first_conv] and first_conv not in res.quantized_nodes
    node = next(n for n in onnx.load(res.path).graph.node if n.name == first_conv)
    producers = {o: n.op_type for n in onnx.load(res.path).graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in node.input)
    res2 = quantize_int8(exported.path, tmp_path / "pct.onnx", digits[0][:16], method="percentile",
                         per_channel=False)
    assert res2.method == "percentile" and not res2.per_channel and res2.quantized_nodes


def test_percentile_takes_an_image_count_that_is_no_multiple_of_the_batch(exported, digits, tmp_path):
    """ORT's histogram calibrators stack per-batch outputs; 20 images in batches of 16 crashed them (entropy:
    test_entropy_is_not_minmax)."""
    res = quantize_int8(exported.path, tmp_path / "percentile.onnx", digits[0][:20], method="percentile",
                        calib_batch=16)
    assert res.calib_count == 20 and res.quantized_nodes
    x = digits[0][:8]
    assert (run(exported.path, x).argmax(1) == run(res.path, x).argmax(1)).mean() >= 0.75


def _activation_scales(path) -> dict[str, float]:
    """The scale of every activation QuantizeLinear (the weights' Q/DQ pairs read an initializer)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_entropy_is_not_minmax(exported, digits, tmp_path):
    """ORT's quantize_static builds its Entropy calibrator with 128 bins for 128 quantized bins, whose one candidate
    is the whole range: a user asking for entropy got MinMax's scales. With TensorRT's 2048 bins the KL rule clips
    where the histogram's tail is thin, so some activation ranges shrink. 20 images in batches of 16: ORT's
    histogram calibrators stack per-batch outputs, and unequal batches crashed them. (The search over 2048 bins
    takes about 30 s, once in the suite.)"""
    x = digits[0][:20]
    res = quantize_int8(exported.path, tmp_path / "ent.onnx", x, method="entropy", calib_batch=16)
    assert res.calib_count == 20 and res.method == "entropy"
    assert (run(exported.path, x[:8]).argmax(1) == run(res.path, x[:8]).argmax(1)).mean() >= 0.75
    mm = _activation_scales(quantize_int8(exported.path, tmp_path / "mm.onnx", x, method="minmax").path)
    ent = _activation_scales(res.path)
    assert mm.keys() == ent.keys()
    shrunk = [t for t in mm if ent[t] < 0.99 * mm[t]]
    assert shrunk, "entropy calibration gave MinMax's scales"
    assert np.median([ent[t] / mm[t] for t in mm]) <= 1.0  # clipping, not widening (ORT's bin edges may
    # leave a range a bin wider than its maximum)


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "magic"}, "unknown calibration method"),
    ({"calib": np.zeros((4, 3, 16, 16), np.float32)}, "calibration data has shape"),
    ({"calib": np.zeros((0, 3, 32, 32), np.float32)}, "calibration data has shape"),
    ({"calib": np.full((2, 3, 32, 32), np.nan, np.float32)}, "NaN"),
    ({"exclude_nodes": ["no_such_node"]}, "not in the model: no_such_node"),
])
def test_quantize_bad_input(exported, tmp_path, kwargs, words):
    args = {"calib": np.zeros((4, 3, 32, 32), np.float32), **kwargs}
    with pytest.raises(EdgeTLError, match=words):
        quantize_int8(exported.path, tmp_path / "q.onnx", **args)
    assert not (tmp_path / "q.onnx").exists()


def test_qoperator_models_are_rejected(exported, digits, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": digits[0][:8]}])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(exported.path), str(tmp_path / "qop.onnx"), Reader(), quant_format=QuantFormat.QOperator)
    with pytest.raises(CheckFailed, match="QLinearConv"):
        check_tensorrt_qdq(onnx.load(tmp_path / "qop.onnx"))


def test_model_stats(trained, exported, digits):
    import torch_pruning as tp

    macs, params = count_macs_params(trained, SIZE)
    assert params == sum(p.numel() for p in trained.parameters())
    assert macs == int(tp.utils.count_ops_and_params(trained, torch.zeros(1, 3, *SIZE))[0]) > 0
    labels = run(exported.path, digits[2][:20]).argmax(1)
    assert onnx_top1(exported.path, digits[2][:20], labels, batch=7) == 1.0
    assert onnx_top1(exported.path, digits[2][:20], (labels + 1) % 10) == 0.0
    with pytest.raises(EdgeTLError, match="no images"):
        onnx_top1(exported.path, digits[2][:0], labels[:0])
    assert onnx_latency_ms(exported.path, SIZE, iters=5, warmup=1, threads=1) > 0
    assert torch_latency_ms(trained, SIZE, iters=3, warmup=1, threads=1) > 0
    assert trained.training is False
