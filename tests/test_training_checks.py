"""Issue 14 item 8, "training that fails says so": weights = none trains with the from-scratch recipe, a training
stage no better than guessing on validation gets a loud warning, and ``--require-targets`` turns a missed target
into exit 3 (after the bundle and report are written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_tl.core.bundle import Bundle
from edge_tl.workstation.stats import chance_check

pytest.importorskip("torch", reason="the workstation extra (torch) is not installed")

EDGE_TL = [str(Path(sys.executable).with_name("edge-tl"))]
TINY = ["--weights", "none", "--backbone", "mobilenet_v3_small", "--input-size", "32", "--resize", "32",
        "--epochs", "3", "--warmup-epochs", "1", "--recovery-epochs", "2", "--golden-count", "2",
        "--calib-count", "16", "--quantize-mode", "ptq"]  # a signal-free model: QAT would only add time


def edge_tl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGE_TL, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "400"})


def test_chance_check_on_demo_like_and_guessing_numbers():
    val = np.repeat(np.arange(5), 20)  # 5 classes, 20 validation images each
    train = np.repeat(np.arange(5), 10)
    good = chance_check(0.80, val, train, 5, picked_from=60)  # a demo-like fine-tune
    assert good["passed"] and good["baseline"] == pytest.approx(0.2) and good["p_value"] < 1e-20
    at_chance = chance_check(0.22, val, train, 5, picked_from=60)
    assert not at_chance["passed"] and at_chance["val_correct"] == 22
    # the majority class is the baseline when it beats 1/classes: 70% of validation is class 0
    val_skew, train_skew = np.array([0] * 70 + [1] * 30), np.array([0] * 60 + [1] * 10)
    skew = chance_check(0.72, val_skew, train_skew, 2)
    assert skew["majority_class"] == 0 and skew["baseline"] == pytest.approx(0.7) and not skew["passed"]
    # 7 of 8 right is p = 0.035 against 50%: enough for one epoch, not for the best of two (Bonferroni)
    two = np.array([0, 1] * 4)
    assert chance_check(7 / 8, two, two, 2)["passed"]
    assert not chance_check(7 / 8, two, two, 2, picked_from=2)["passed"]


@pytest.fixture(scope="module")
def signal_free(tmp_path_factory) -> Path:
    """Two classes of the very same image: the labels carry no signal, so every model answers one class for all
    validation images and scores exactly the share of that class (50%), on any CPU."""
    from PIL import Image

    root = tmp_path_factory.mktemp("nosignal") / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (16, 16), (120, 130, 140)).save(root / c / f"{c}{i}.png")
    return root


@pytest.mark.slow
def test_signal_free_build_warns_records_and_fails_with_require_targets(signal_free, tmp_path):
    run = tmp_path / "run"
    proc = edge_tl("build", "--data", str(signal_free), "--out", str(run), *TINY, "--require-targets")
    # (c) a missed target: exit 3 and one line naming it, after the bundle and the report are written
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "quality target(s) missed" in err[0]
    assert "fine-tuned model better than chance and the majority class" in err[0]
    assert "Traceback" not in proc.stderr
    Bundle.open(run / "bundle").verify()
    report = (run / "report.md").read_text()
    assert json.loads((run / "run.json").read_text())["status"] == "done"
    # (a) the from-scratch recipe, said in one line, recorded in the metrics
    assert "the fine-tune stage uses the from-scratch recipe" in " ".join(proc.stderr.split())
    ft = json.loads(next(run.glob("stages/finetune-*/metrics.json")).read_text())
    assert ft["recipe"] == "scratch" and ft["mode"] == "finetune"
    assert [p["name"] for p in ft["phases"]] == ["scratch"]
    phase = ft["phases"][0]
    assert phase["lr_backbone"] == phase["lr_head"] == 1e-3 and phase["train_bn"] and phase["epochs"] == 4
    assert phase["bn_momentum"] == 0.1 and not phase["early_stop"]
    assert ft["epochs_run"] == 4  # warm-up epochs join the budget, no early stopping
    # (b) the warning: loud, with its causes, in the stage metrics, the run's metrics, the manifest and the report
    said = " ".join(proc.stderr.split())
    assert "WARNING: the fine-tuned model is NOT better than guessing: validation top-1 50.0%" in said
    for cause in ("too few epochs", "report.scratch_lr", "weights = none", "broken labels"):
        assert cause in said
    assert not ft["chance_check"]["passed"] and ft["chance_check"]["baseline"] == 0.5
    stages = json.loads((run / "metrics.json").read_text())["stages"]
    assert "NOT better than guessing" in stages["finetune"]["chance_warning"]
    assert Bundle.open(run / "bundle").manifest.stages["finetune"].chance_check["passed"] is False
    assert "**WARNING: training failed.** the fine-tuned model is NOT better than guessing" in report
    assert "| fine-tuned model better than chance and the majority class (validation, one-sided exact binomial) " \
           "| 50.0% (" in report
    # without --require-targets the same build (all stages reused) exits 0, and still warns
    again = edge_tl("build", "--data", str(signal_free), "--out", str(run), *TINY, "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "NOT better than guessing" in " ".join(again.stderr.split())
    # a missed target is said in the terminal too, not only in report.md (issue 23)
    assert "target missed: fine-tuned model better than chance" in " ".join(again.stderr.split())
    assert json.loads((run / "run.json").read_text())["skipped"] == ["data", "finetune", "prune", "export",
                                                                     "quantize", "qat"]


def test_require_targets_gates_only_what_the_workstation_can_judge():
    """Issue 23: --require-targets exited 3 on a good model because ONNX Runtime's CPU INT8 kernels made it 2.9x,
    not 5x, faster than eager FP32: a figure that says little about the Jetson is reported, never gated."""
    from edge_tl.workstation.pipeline.report import SPEED_TARGET, missed_targets

    checks = [(SPEED_TARGET, "2.9x (ONNX Runtime CPU)", "missed"), ("INT8 within 1.0 point", "0.4", "met"),
              ("pruning removes >= 50% of the MACs", "31%", "missed")]
    assert missed_targets(checks) == [SPEED_TARGET, "pruning removes >= 50% of the MACs"]
    assert missed_targets(checks, gated_only=True) == ["pruning removes >= 50% of the MACs"]


def test_the_shipped_row_names_its_model_and_gives_one_model_one_latency():
    """Issue 23: the report gave the shipped model two latencies (4.174 and 3.921 ms, two measurements of the PTQ
    model) and did not say whether PTQ, QAT or mixed precision shipped."""
    from edge_tl.workstation.pipeline.report import stage_rows

    stages = {"finetune": {"top1": 0.9}, "prune": {"top1": 0.9}, "export": {"top1": 0.9},
              "quantize": {"top1": 0.89, "top1_ort_cpu_kernels": 0.88}, "qat": {"top1": 0.89, "selected": "ptq"}}
    latency = {"finetune": 5.0, "prune": 2.0, "export": 0.2, "quantize": 4.174, "qat": 3.921}
    shipped = stage_rows(stages, latency)[-1]
    assert shipped[0] == "shipped INT8: PTQ (Q/DQ in float)" and shipped[-1] == "as the PTQ row"
    qat = stage_rows({**stages, "qat": {"top1": 0.9, "selected": "qat"}}, latency)[-1]
    assert qat[0] == "shipped INT8: QAT (Q/DQ in float)" and qat[-1] == "3.921 ms"
