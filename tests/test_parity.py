"""The parity gate on ONNX Runtime CPU against the tiny bundle's golden outputs, the CLI's exit codes and
report file, and the INT8 fallback: the sensitivity ranking and keeping layers in float."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from bundle_factory import make_tiny_bundle

from edge_tl.cli import main
from edge_tl.core.bundle import Bundle
from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.parity import derive_tolerances, int8_departure, judge
from edge_tl.device.engine.fallback import (
    keep_layers_in_float,
    keep_layers_model,
    node_id,
    quantized_nodes,
    sensitivity,
)
from edge_tl.device.engine.parity import DEFAULT_THRESHOLDS, ParityThresholds, check_parity, compare_outputs
from edge_tl.device.runners import create_runner
from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner


@pytest.fixture(scope="module")
def broken_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("broken") / "tiny", broken_int8=True, tarball=False)


def test_compare_outputs_maths():
    golden = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    actual = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 1.5]])
    out = compare_outputs("logits", actual, golden)
    assert out.count == 2 and out.judged == 2 and out.top1_agreement == 0.5 and out.top1_mismatches == [1]
    assert out.max_abs_diff == 1.5 and out.mean_abs_diff == pytest.approx(3.0 / 6)
    assert out.max_rel_diff == pytest.approx(0.75)
    assert out.cosine_min == pytest.approx(2.0 / (2.0 * np.sqrt(3.25)))  # [0,1,1.5].[0,2,0] / (|a||g|)
    assert out.cosine_mean == pytest.approx((1 / np.sqrt(1.25) + 1 / np.sqrt(3.25)) / 2)
    nan = compare_outputs("logits", np.array([[np.nan, 1.0]]), np.array([[0.0, 1.0]]))
    assert nan.finite is False
    with pytest.raises(EdgeTLError, match="shape"):
        compare_outputs("logits", np.zeros((2, 3)), np.zeros((2, 4)))


def test_a_near_tie_is_reported_not_counted_and_a_clear_flip_is_counted():
    """The demo's failure (issue 22): one golden input with a reference margin of 0.115 flipped and failed the
    gate. Below the tolerance a flip is a near-tie: reported, not counted; above it, counted."""
    ref = np.array([[2.0, 1.885, 0.0]] + [[8.0, 0.0, 1.0]] * 9)  # input 0: margin 0.115
    dev = ref.copy()
    dev[0] = [1.9, 1.95, 0.0]  # the near-tie flips
    th = ParityThresholds.for_precision("int8", min_int8_departure=None)
    out = compare_outputs("logits", dev, ref, margin_tolerance=0.5, reference_kind="int8")
    assert out.judged == 9 and out.top1_mismatches == [] and out.near_tie_changes == [0]
    assert out.top1_agreement == 1.0 and judge(out, th) == []
    old_rule = compare_outputs("logits", dev, ref)  # no tolerance: every input judged, as before
    assert old_rule.top1_mismatches == [0] and judge(old_rule, th) == []  # 1/10 is within 0.10 ...
    assert judge(compare_outputs("logits", dev[:8], ref[:8]), th)  # ... 1/8 was not (the demo's 8 golden inputs)
    dev[1] = [0.0, 8.0, 1.0]  # a clear flip
    dev[2] = [0.0, 8.0, 1.0]
    flipped = compare_outputs("logits", dev, ref, margin_tolerance=0.5, reference_kind="int8")
    assert flipped.top1_mismatches == [1, 2] and judge(flipped, th)[0].startswith("logits top-1 changed on 2/9")


def test_int8_departure_tells_the_int8_model_from_a_float_one():
    rng = np.random.default_rng(0)
    fp32 = rng.normal(0, 3, (64, 5))
    int8 = fp32 + rng.normal(0, 0.3, fp32.shape)
    assert int8_departure(int8, int8, fp32) == 1.0
    assert int8_departure(fp32, int8, fp32) == 0.0
    kernels = fp32 + rng.normal(0, 0.3, fp32.shape)  # another INT8 implementation: its own quantization noise
    assert 0.8 < int8_departure(kernels, int8, fp32) < 1.2
    fp16 = fp32 + rng.normal(0, 0.003, fp32.shape)  # a float engine: close to FP32
    assert int8_departure(fp16, int8, fp32) < 0.05
    assert int8_departure(fp32, fp32, fp32) is None  # INT8 == FP32: nothing to tell them apart by


def test_tolerances_follow_the_quantization_shift():
    rng = np.random.default_rng(1)
    fp32 = rng.normal(0, 4, (200, 10))
    small, note = derive_tolerances(fp32, fp32 + rng.normal(0, 0.05, fp32.shape))
    large, _ = derive_tolerances(fp32, fp32 + rng.normal(0, 0.5, fp32.shape))
    assert large["int8"] > 5 * small["int8"] and large["best"] == large["int8"]
    assert small["fp16"] == pytest.approx(10 * small["fp32"], rel=1e-3) and small["int8"] >= small["fp16"]
    assert "95% quantile" in note
    with pytest.raises(EdgeTLError, match="NaN"):
        derive_tolerances(fp32, np.full_like(fp32, np.nan))


def test_thresholds_by_precision_and_overrides():
    assert ParityThresholds.for_precision("fp32").max_top1_drop == 0.0
    assert ParityThresholds.for_precision("int8") == DEFAULT_THRESHOLDS["best"]
    assert ParityThresholds.for_precision("int8").min_int8_departure == 0.4
    assert ParityThresholds.for_precision("fp16").min_int8_departure is None
    th = ParityThresholds.for_precision("int8", min_cosine=0.5, max_top1_drop=None)
    assert th.min_cosine == 0.5 and th.max_top1_drop == 0.10
    with pytest.raises(EdgeTLError):
        ParityThresholds.for_precision("int4")


def test_fp32_and_int8_pass_on_onnxruntime(tiny_bundle_src):
    bundle = Bundle.open(tiny_bundle_src)
    assert bundle.manifest.schema_version == 4 and bundle.golden_crops().dtype == np.uint8
    fp32 = check_parity(bundle, create_runner(bundle, "ort-cpu", "fp32"), "fp32")
    assert fp32.passed and fp32.failures == []
    logits = fp32.outputs["logits"]
    assert logits.count == 6 and logits.top1_agreement == 1.0 and logits.max_abs_diff < 1e-5
    assert logits.cosine_min > 0.999999 and logits.reference == "fp32" and logits.int8_departure is None
    # the INT8 model with Q/DQ in float is the reference itself: the build's own gate
    int8 = check_parity(bundle, create_runner(bundle, "ort-cpu", "int8", qdq="float"), "int8", batch_size=4)
    o = int8.outputs["logits"]
    assert int8.passed and o.reference == "int8" and o.top1_agreement == 1.0 and o.max_abs_diff < 1e-5
    assert o.int8_departure == pytest.approx(1.0, abs=1e-4) and o.margin_tolerance > 0
    assert int8.runner["qdq"] == "float" and int8.bundle["reference"] == "int8"
    # ONNX Runtime's CPU integer kernels: their numerics depend on the CPU (an AVX2-only EPYC gave cosine 0.996
    # where a VNNI Xeon gives 0.9999), so only what holds everywhere: they run and give finite outputs
    kernels = check_parity(bundle, create_runner(bundle, "ort-cpu", "int8"), "int8", batch_size=4)
    assert kernels.runner["qdq"] == "kernels" and kernels.outputs["logits"].finite
    # an already active runner stays active
    runner = OnnxRuntimeRunner.from_path(bundle.model_path("fp32")).activate()
    assert check_parity(bundle, runner, "fp32").passed and runner.is_active
    runner.deactivate()


class _Twisted(OnnxRuntimeRunner):
    """A runner whose outputs are changed after the model ran: what a wrong engine would give."""

    def __init__(self, model, twist):
        src = OnnxRuntimeRunner.from_path(model)
        super().__init__(src._session_src, name="twisted")
        self.twist = twist

    def infer_impl(self, feed):
        return {k: self.twist(v) for k, v in super().infer_impl(feed).items()}


def test_gates_that_must_fail_still_fail(tiny_bundle_src, broken_bundle):
    """A model with other weights, an FP32 or FP16 model gated as INT8, a reversed class order, NaN outputs."""
    bundle = Bundle.open(broken_bundle)
    report = check_parity(bundle, create_runner(bundle, "ort-cpu", "int8", qdq="float"), "int8")
    assert not report.passed and report.failures
    with pytest.raises(CheckFailed) as exc:
        report.raise_if_failed()
    assert exc.value.exit_code == 3 and "keep-worst" in str(exc.value)
    good = Bundle.open(tiny_bundle_src)
    as_int8 = check_parity(good, create_runner(good, "ort-cpu", "fp32"), "int8")  # a float engine gated as INT8
    assert not as_int8.passed and as_int8.outputs["logits"].int8_departure == pytest.approx(0.0, abs=1e-4)
    assert any("does not compute the INT8 model" in f for f in as_int8.failures)
    rng = np.random.default_rng(0)
    fp16 = _Twisted(good.model_path("fp32"), lambda v: (v.astype(np.float16).astype(np.float32)
                                                        + rng.normal(0, 1e-3, v.shape).astype(np.float32)))
    assert not check_parity(good, fp16, "int8").passed
    assert check_parity(good, fp16, "fp16").passed  # the same outputs pass as what they are
    reversed_ = _Twisted(good.model_path("int8"), lambda v: v[:, ::-1].copy())
    rev = check_parity(good, reversed_, "int8")
    assert not rev.passed and any("top-1 changed" in f for f in rev.failures)
    nan = _Twisted(good.model_path("int8"), lambda v: np.full_like(v, np.nan))
    assert any("NaN" in f for f in check_parity(good, nan, "int8").failures)
    strict = check_parity(good, create_runner(good, "ort-cpu", "int8", qdq="float"), "int8",
                          ParityThresholds(max_top1_drop=0.0, min_cosine=0.999999, max_rel_diff=1e-5,
                                           min_int8_departure=0.999))
    assert strict.passed  # the reference itself passes the tightest thresholds


def test_cli_check_exit_codes_and_report(tiny_bundle_src, broken_bundle, tmp_path, capsys):
    ok = tmp_path / "ok.json"
    with pytest.raises(SystemExit) as exc:
        main(["engine", "check", str(tiny_bundle_src), "--backend", "ort-cpu", "--precision", "fp32",
              "--json", str(ok)])
    assert exc.value.code == 0
    data = json.loads(ok.read_text())
    assert data["passed"] is True and data["outputs"]["logits"]["top1_agreement"] == 1.0
    assert data["thresholds"] == {"max_top1_drop": 0.0, "min_cosine": 0.9999, "max_rel_diff": 0.01,
                                  "min_int8_departure": None}
    assert "passed" in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    with pytest.raises(SystemExit) as exc:
        main(["engine", "check", str(broken_bundle), "--backend", "ort-cpu", "--precision", "int8",
              "--json", str(bad)])
    assert exc.value.code == 3
    data = json.loads(bad.read_text())
    assert data["passed"] is False and data["outputs"]["logits"]["reference"] == "int8"
    assert data["runner"]["qdq"] == "float"  # ort-cpu judges the Q/DQ model as written, on every CPU
    assert "top-1 changed on 6/6 judged" in capsys.readouterr().err

    # loosened from the command line, the same engine passes
    with pytest.raises(SystemExit) as exc:
        main(["engine", "check", str(broken_bundle), "--backend", "ort-cpu", "--precision", "int8",
              "--max-top1-drop", "1", "--min-cosine", "-1", "--max-rel-diff", "10",
              "--min-int8-departure", "0"])
    assert exc.value.code == 0


def test_an_old_bundle_without_int8_reference_is_refused_for_int8_only(tmp_path, capsys):
    old = make_tiny_bundle(tmp_path / "old", schema=2, tarball=False)
    bundle = Bundle.open(old)
    assert bundle.golden_crops() is None and bundle.golden_inputs().dtype == np.float32
    assert check_parity(bundle, create_runner(bundle, "ort-cpu", "fp32"), "fp32").passed
    out = tmp_path / "old.json"
    with pytest.raises(SystemExit) as exc:
        main(["engine", "check", str(old), "--backend", "ort-cpu", "--precision", "int8", "--json", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no INT8 reference outputs" in err and "rebuild it with this edge-tl" in err and "Traceback" not in err
    assert "no INT8 reference" in json.loads(out.read_text())["error"]


def test_a_golden_set_with_nan_or_the_wrong_dtype_is_refused_in_one_line(tmp_path):
    from bundle_factory import reseal

    src = make_tiny_bundle(tmp_path / "b", tarball=False)
    ref = np.load(src / "golden/outputs.int8.npy")
    ref[2, 1] = np.nan
    np.save(src / "golden/outputs.int8.npy", ref)
    reseal(src)
    bundle = Bundle.open(src)
    with pytest.raises(EdgeTLError, match="INT8 reference outputs .* hold NaN") as exc:
        check_parity(bundle, create_runner(bundle, "ort-cpu", "int8", qdq="float"), "int8")
    assert "rebuild the bundle" in exc.value.fix
    np.save(src / "golden/inputs.u8.npy", np.load(src / "golden/inputs.u8.npy").astype(np.float32))
    reseal(src)
    with pytest.raises(EdgeTLError, match="are float32 6x16x16x3, not uint8"):
        Bundle.open(src).golden_inputs()


def test_cli_check_writes_report_on_errors(tmp_path):
    out = tmp_path / "err.json"
    with pytest.raises(SystemExit) as exc:
        main(["engine", "check", str(tmp_path / "missing"), "--backend", "ort-cpu", "--json", str(out)])
    assert exc.value.code == 2
    data = json.loads(out.read_text())
    assert data["passed"] is False and "does not exist" in data["error"]


def test_sensitivity_ranks_layers_worst_first(tiny_bundle_src):
    bundle = Bundle.open(tiny_bundle_src)
    report = sensitivity(bundle.model_path("int8"), bundle.golden_inputs(), bundle.golden_outputs(),
                         fp32_path=bundle.model_path("fp32"))
    names = [layer.name for layer in report.layers]
    assert names == ["node_of_logits_QuantizeLinear_Input", "node_of_c2", "node_of_c1"]
    assert [layer.op_type for layer in report.layers] == ["Gemm", "Conv", "Conv"]
    gains = [layer.gain for layer in report.layers]
    assert gains == sorted(gains, reverse=True) and gains[0] > 0
    assert report.baseline_rel_error == pytest.approx(report.layers[0].rel_error + report.layers[0].gain)
    assert report.worst(2) == names[:2]


def test_keep_layers_in_float_rewires_and_helps(tiny_bundle_src, tmp_path):
    import onnxruntime as ort

    bundle = Bundle.open(tiny_bundle_src)
    int8 = onnx.load(str(bundle.model_path("int8")))
    every = [node_id(n) for n in quantized_nodes(int8, None)]
    assert len(every) == 7  # Conv, Relu, Conv, Relu, GlobalAveragePool, Flatten, Gemm
    path = keep_layers_model(bundle.model_path("int8"), every, tmp_path, bundle.model_path("fp32"))
    assert keep_layers_model(bundle.model_path("int8"), every, tmp_path, bundle.model_path("fp32")) == path
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1  # only the output's Q/DQ pair is left
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert conv.input[0] == "input" and conv.input[1] == "w1_quantized__float"
    golden = bundle.golden_outputs()
    outputs = {}
    for name, p in (("int8", bundle.model_path("int8")), ("kept", path)):
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        outputs[name] = sess.run(None, {"input": bundle.golden_inputs()})[0]
    assert np.abs(outputs["kept"] - golden).mean() < np.abs(outputs["int8"] - golden).mean()
    # without the FP32 model the weights are dequantized from INT8
    alone = keep_layers_in_float(int8, ["node_of_c1"])
    w = next(i for i in alone.graph.initializer if i.name == "w1_quantized__float")
    assert w.data_type == onnx.TensorProto.FLOAT
    with pytest.raises(EdgeTLError, match="not in the INT8 model"):
        keep_layers_in_float(int8, ["no_such_layer"])


def test_cli_sensitivity_and_keep_worst_without_tensorrt(tiny_bundle_src, tmp_path, capsys):
    out = tmp_path / "sens.json"
    with pytest.raises(SystemExit) as exc:
        main(["engine", "sensitivity", str(tiny_bundle_src), "--top", "2", "--json", str(out)])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip().endswith("--precision int8 --keep-worst 2")
    assert json.loads(out.read_text())["layers"][0]["name"] == "node_of_logits_QuantizeLinear_Input"
