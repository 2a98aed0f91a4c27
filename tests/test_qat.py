"""Issue 13 items 1-2: quantization-aware training (NVIDIA ModelOpt, real, on a tiny CNN and tiny data), the auto
decision, sensitivity-guided mixed precision picking the smallest set, and QAT asked without ModelOpt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge_tl.workstation.pipeline.qat_stage import needs_qat, pick_int8
from edge_tl.workstation.quantize import check_tensorrt_qdq, quantize_int8, quantized_node_names
from tests.bundle_factory import tiny_onnx

SIZE = 16


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes: a bright square in the top-left, centre or bottom-right of a noisy image."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (n, 3, SIZE, SIZE)).astype(np.float32)
    for i, c in enumerate(y):
        o = (1, 6, 11)[c]
        x[i, :, o:o + 4, o:o + 4] += 2.0
    return x, y.astype(np.int64)


def test_qat_on_a_tiny_cnn_exports_the_tensorrt_qdq_form(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("modelopt", reason="QAT needs nvidia-modelopt (workstation extra)")
    from torch import nn

    from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner
    from edge_tl.workstation.qat import train_qat
    from edge_tl.workstation.train import fit
    from edge_tl.workstation.train.fit import Phase

    torch.manual_seed(0)
    model = nn.Sequential()
    model.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(16, 3))  # the head "squeezenet1_1" names
    x, y = _images(96, 0)
    xv, yv = _images(60, 1)
    train = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    fit(model, "squeezenet1_1", train, (xv, yv), [Phase("fp32", 6, 1e-2, 1e-2, train_bn=True, early_stop=False)],
        batch_size=16, seed=0, device="cpu")
    teacher = model
    res = train_qat(model, teacher, "squeezenet1_1", x[:32], train, (xv, yv), tmp_path / "qat.onnx", (SIZE, SIZE),
                    epochs=2, lr=1e-3, opset=17, target=None, distill_weight=0.5, batch_size=16, device="cpu")
    proto = onnx.load(str(tmp_path / "qat.onnx"))
    ops = check_tensorrt_qdq(proto)  # symmetric signed INT8 (zero point 0), no integer-only ops
    # BatchNorm folded before quantizing; Q/DQ on the input and the weight of both Convs and the Gemm, and on the
    # pooling's input (ModelOpt quantizes nn.AdaptiveAvgPool2d too)
    assert "BatchNormalization" not in ops and res.folded_batchnorms == 2
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 7 and res.summary()["qdq_pairs"] == 7
    names = set(quantized_node_names(proto))
    assert sorted(n.op_type for n in proto.graph.node if n.name in names) == ["Conv", "Conv", "Gemm",
                                                                               "GlobalAveragePool"]
    inits = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:  # weights stay FP32 behind their Q/DQ pair, as TensorRT's ONNX parser takes them
        if n.op_type == "QuantizeLinear" and n.input[0] in inits:
            assert numpy_helper.to_array(inits[n.input[0]]).dtype == np.float32
            assert numpy_helper.to_array(inits[n.input[2]]).dtype == np.int8
    # ONNX Runtime runs it with Q/DQ evaluated in float (dynamic batch), and it learned the task
    with OnnxRuntimeRunner.from_path(tmp_path / "qat.onnx", "ort-cpu", qdq="float") as runner:
        pred = runner.infer({"input": xv})["logits"].argmax(1)
    assert (pred == yv).mean() > 0.8  # chance is 1/3
    assert res.max_abs_diff < 1e-2 and res.epochs_run == 2
    assert res.summary()["kept"] == "best"
    # quantize.qat_keep = "last": the last epoch exported, whichever scored best on validation
    last = train_qat(model, teacher, "squeezenet1_1", x[:32], train, (xv, yv), tmp_path / "last.onnx", (SIZE, SIZE),
                     epochs=2, lr=1e-3, opset=17, target=None, distill_weight=0.5, batch_size=16, device="cpu",
                     fit_kwargs={"keep": "last"})
    assert last.summary()["kept"] == "last" and last.history[-1]["epoch"] == 2


def test_auto_runs_qat_only_when_ptq_costs_more_than_the_threshold():
    assert needs_qat("auto", 0.25, 0.5) == (False, needs_qat("auto", 0.25, 0.5)[1])
    assert "QAT not needed" in needs_qat("auto", 0.5, 0.5)[1]
    run, why = needs_qat("auto", 0.75, 0.5)
    assert run and "+0.75 points" in why and "max_cost_points = 0.5" in why
    assert needs_qat("ptq", 30.0, 0.5)[0] is False and needs_qat("qat", -1.0, 0.5)[0] is True


def _scored(right: list[int], images: int = 10, copies: int = 3) -> dict:
    """A candidate that gets validation images ``right`` (and all their augmented copies) right."""
    correct = np.isin(np.arange(images * copies) % images, right)
    return {"decision_correct": correct, "decision_top1": float(correct.mean())}


def test_a_trained_int8_model_replaces_ptq_only_beyond_noise():
    """quantize.mode = "auto": QAT (or mixed precision) ships only when its decision-set gain over PTQ has a
    one-sided 95% lower bound above 0, copies of one validation image counted once; "qat" asked: the reverse."""
    ptq = _scored(list(range(8)))
    one_more = _scored(list(range(9)))  # one image of 10 ahead: mean -0.1, se 0.1, upper bound +0.06
    assert pick_int8({"ptq": ptq, "qat": one_more}, 10) == "ptq"
    assert pick_int8({"ptq": ptq, "qat": dict(ptq)}, 10) == "ptq"  # a tie: nothing gained by training
    weak, strong = _scored(list(range(5))), _scored(list(range(10)))  # five images ahead: upper bound -0.23
    assert pick_int8({"ptq": weak, "qat": strong}, 10) == "qat"
    # of two that beat PTQ, the higher ships; one that does not beat it is never picked for scoring higher
    assert pick_int8({"ptq": weak, "qat": _scored(list(range(9))), "mixed": strong}, 10) == "mixed"
    assert pick_int8({"ptq": ptq, "qat": _scored([0, 1]), "mixed": one_more}, 10) == "ptq"
    # asked for QAT: it ships unless PTQ beats it beyond noise
    assert pick_int8({"ptq": one_more, "qat": ptq}, 10, base="qat") == "qat"
    assert pick_int8({"ptq": strong, "qat": weak}, 10, base="qat") == "ptq"


def test_mixed_precision_keeps_the_smallest_set_that_meets_the_target(tmp_path):
    """One layer of the INT8 model is broken (its weight DequantizeLinear scales negated: the Q/DQ weights become
    -w); the sensitivity ranking must put it first and the search, smallest set first, stop at it alone. With a
    target no set can meet, every k up to the limit is tried in order and the best is kept, marked not met."""
    from edge_tl.device.engine.fallback import node_id
    from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner
    from edge_tl.workstation.mixed import keep_sensitive, macs_shares

    fp32 = tiny_onnx(tmp_path / "fp32.onnx", size=SIZE, num_classes=4)
    x = np.random.default_rng(3).normal(0, 1, (80, 3, SIZE, SIZE)).astype(np.float32)
    quantize_int8(fp32, tmp_path / "int8.onnx", x[:32])
    model = onnx.load(str(tmp_path / "int8.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    dq = producers[gemm.input[1]]
    # the QuantizeLinear shares the scale: the DequantizeLinear gets its own, negated copy
    model.graph.initializer.append(numpy_helper.from_array(-numpy_helper.to_array(inits[dq.input[1]]), "neg_scale"))
    dq.input[1] = "neg_scale"
    onnx.save(model, tmp_path / "broken.onnx")
    broken = node_id(gemm)
    with OnnxRuntimeRunner.from_path(fp32, "ort-cpu") as runner:
        logits = runner.infer({"input": x})["logits"]
    y = logits.argmax(1)  # labels the FP32 model gets all right: its accuracy is 100%
    with OnnxRuntimeRunner.from_path(tmp_path / "broken.onnx", "ort-cpu", qdq="float") as runner:
        assert (runner.infer({"input": x})["logits"].argmax(1) == y).mean() < 0.5
    # the target allows the INT8 rounding left elsewhere (a few images of 80), not a broken layer
    res = keep_sensitive(tmp_path / "broken.onnx", x, y, logits, max_cost_points=5.0, max_layers=3,
                         out_path=tmp_path / "mixed.onnx")
    assert res.met and res.layers == [broken] and res.val_top1 >= 0.95
    assert [t["k"] for t in res.tried] == [1] and res.ranking[0]["name"] == broken
    with OnnxRuntimeRunner.from_path(tmp_path / "mixed.onnx", "ort-cpu", qdq="float") as runner:
        assert (runner.infer({"input": x})["logits"].argmax(1) == y).mean() == res.val_top1
    still = quantized_node_names(onnx.load(str(tmp_path / "mixed.onnx")))
    assert len(still) == len(quantized_node_names(model)) - 1
    # MACs shares from ONNX shapes: conv1 16x16x8 x 27, conv2 8x8x16 x 72, gemm 4 x 16
    shares = macs_shares(onnx.load(str(tmp_path / "int8.onnx")))
    macs = np.array([16 * 16 * 8 * 27, 8 * 8 * 16 * 72, 4 * 16])
    assert list(shares.values()) == pytest.approx(list(macs / macs.sum()))
    assert res.macs_share == {broken: shares[broken]}
    # a target no set meets: k = 1, 2 tried in order, the best on validation kept and marked not met
    res = keep_sensitive(tmp_path / "broken.onnx", x, y, logits, max_cost_points=-1.0, max_layers=2,
                         out_path=tmp_path / "mixed2.onnx")
    assert not res.met and [t["k"] for t in res.tried] == [1, 2]
    assert res.val_top1 == max(t["val_top1"] for t in res.tried) and (tmp_path / "mixed2.onnx").is_file()


def test_qat_asked_without_modelopt_fails_in_one_line_and_writes_nothing(tmp_path):
    """ModelOpt made unimportable for real (a None entry in sys.modules is how Python marks a module that must
    not import: importlib.util.find_spec raises ValueError, import raises ImportError), through the real CLI."""
    pytest.importorskip("torch")
    run = tmp_path / "run"
    code = "import sys; sys.modules['modelopt'] = None; from edge_tl.cli import main; sys.argv[0] = 'edge-tl'; main()"
    proc = subprocess.run([sys.executable, "-c", code, "build", "--out", str(run), "--quantize-mode", "qat"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode != 0
    err = " ".join(proc.stderr.split())
    assert "nvidia-modelopt' is not installed" in err and "pip install 'edge-tl[workstation,cpu]'" in err
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not run.exists()  # refused before the run folder (and any stage) was written


def test_auto_runs_qat_unless_ptq_is_confidently_within_the_threshold():
    """The cost on the decision set is counted per validation image (its copies are not independent): 100
    images, 3 copies each. Two images lost outright: cost +2.00 points, bound above it; nothing lost: cost and
    bound 0; one copy of one image lost: cost +0.25 points, within 0.5, yet its one-sided 95% bound is not (one
    image in a hundred), so auto runs QAT."""
    from edge_tl.workstation.pipeline.qat_stage import cost_bound

    ref = np.ones(400, dtype=bool)  # the FP32 model right on every image and copy
    lost_two = ref.copy()
    lost_two[[3, 103, 203, 303, 7, 107, 207, 307]] = False  # images 3 and 7: every copy wrong
    cost, upper = cost_bound(ref, lost_two, 100)
    assert cost == pytest.approx(2.0) and upper > cost
    assert cost_bound(ref, ref, 100) == (0.0, 0.0)
    one = ref.copy()
    one[205] = False  # image 5, its second copy
    cost, upper = cost_bound(ref, one, 100)
    assert cost == pytest.approx(0.25) and upper == pytest.approx(0.25 + 1.645 * 25 / np.sqrt(100 * 100))
    run, why = needs_qat("auto", cost, 0.5, "the decision set", upper)
    assert run and f"upper bound {upper:+.2f}" in why and "possibly more than" in why
    worse_ref = ref.copy()
    worse_ref[[205, 305]] = False  # the reference misses two copies of image 5, the model one of them
    cost, upper = cost_bound(worse_ref, one, 100)
    assert cost == pytest.approx(-0.25) and upper < 0.5
    run, why = needs_qat("auto", cost, 0.5, "the decision set", upper)
    assert not run and "QAT not needed" in why
