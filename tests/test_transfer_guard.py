"""Issue 14 items 2, 3, 5: the negative-transfer guard (pretrained vs scratch on validation, train.continue_with),
mode = "auto" (feature extraction vs fine-tuning, the better on validation kept) and the augmentation policies
(torchvision transforms v2, defaults per data kind)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_tl.core.bundle import Bundle
from edge_tl.core.errors import EdgeTLError
from edge_tl.workstation.spec import BuildSpec, load_spec

pytest.importorskip("torch", reason="the workstation extra (torch) is not installed")

from edge_tl.workstation.train import augment, modes, transfer  # noqa: E402
from edge_tl.workstation.train.fit import FitResult  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EDGE_TL = [str(Path(sys.executable).with_name("edge-tl"))]
HURTFUL = REPO / "models" / "demo_dead.pt"


def _correct(both: int, a_only: int, b_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * both + [1] * a_only + [0] * b_only + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * a_only + [1] * b_only + [0] * neither, dtype=bool)
    return a, b


def test_verdict_helps_no_gain_negative_on_paired_validation_results():
    # 100 validation images (the demo's): 20 vs 4 discordant -> one-sided McNemar p = 0.0008: helps
    g = transfer.transfer_verdict(*_correct(60, 20, 4, 16))
    assert g["verdict"] == "helps" and not g["fired"] and g["p_pretrained_better"] < 0.05
    assert g["pretrained_val_top1"] == 0.8 and g["scratch_val_top1"] == 0.64
    assert g["diff_points"] == pytest.approx(16.0) and g["ci95_points"][0] > 0
    # 12 vs 8: four images ahead is noise on 100 (p = 0.25): the guard fires, not "negative"
    g = transfer.transfer_verdict(*_correct(60, 12, 8, 20))
    assert g["verdict"] == "no_gain" and g["fired"] and g["p_pretrained_better"] > 0.05
    # scratch ahead beyond noise: negative transfer
    g = transfer.transfer_verdict(*_correct(40, 3, 25, 32))
    assert g["verdict"] == "negative" and g["fired"] and g["p_scratch_better"] < 0.05
    # identical results: no discordant image, no evidence either way
    g = transfer.transfer_verdict(*_correct(50, 0, 0, 50))
    assert g["verdict"] == "no_gain" and g["p_pretrained_better"] == 1.0


def test_continue_with_picks_and_says_why():
    helps = transfer.transfer_verdict(*_correct(60, 20, 4, 16))
    hurts = transfer.transfer_verdict(*_correct(40, 3, 25, 32))
    tie = transfer.transfer_verdict(*_correct(60, 10, 10, 20))
    assert transfer.choose("finetuned", hurts)[0] == "finetune"
    assert transfer.choose("scratch", helps)[0] == "scratch"
    assert transfer.choose("auto", helps)[0] == "finetune"
    assert transfer.choose("auto", hurts) == ("scratch", transfer.choose("auto", hurts)[1])
    assert "scratch is ahead" in transfer.choose("auto", hurts)[1]
    assert transfer.choose("auto", tie)[0] == "finetune"  # fired, but scratch is not ahead: keep the pretrained
    assert "compare_scratch = false" in transfer.choose("auto", None)[1]
    assert transfer.guard_warning(helps, "w", "finetune", "x") is None
    w = transfer.guard_warning(hurts, "demo_shuffled.pt", "scratch", "why")
    assert "WORSE than training from scratch" in w and "source domain" in w and "edge-tl rank" in w
    assert "--weights none" in w and "train.continue_with" in w and "Continuing with the from-scratch model" in w


def test_spec_flags_for_the_three_items():
    spec = BuildSpec.demo()
    assert spec.train.continue_with == "auto" and spec.data.kind == "digits" and spec.train.augment == "auto"
    with pytest.raises(EdgeTLError, match="train.continue_with"):
        load_spec(None, {"train.continue_with": "best"})
    with pytest.raises(EdgeTLError, match="train.augment"):
        load_spec(None, {"train.augment": "autoaugment"})
    with pytest.raises(EdgeTLError, match="lr_backbone"):  # auto fine-tunes too: the backbone rate stays lower
        load_spec(None, {"train.mode": "auto", "train.lr_backbone": 0.1})
    assert load_spec(None, {"train.mode": "auto"}).train.mode == "auto"


def test_augmentation_defaults_per_kind_and_the_policies_run():
    import torch

    from edge_tl.core.preprocess import PreprocessConfig
    from edge_tl.workstation.train.datasets import TrainDataset

    digits, photos = augment.resolve("auto", None, "digits"), augment.resolve("auto", None, "photos")
    assert digits["policy"] == "light" and digits["hflip"] is False  # a mirrored digit is another symbol
    assert augment.resolve("auto", None, "text")["hflip"] is False
    assert photos["policy"] == "crop-flip-color" and photos["hflip"] is True
    assert "RandomHorizontalFlip()" in photos["transforms"] and "RandomHorizontalFlip()" not in digits["transforms"]
    assert augment.resolve("trivialaugment", True, "digits")["hflip"] is True  # asked explicitly: kept
    # every policy runs on a real image and keeps the network's input shape
    from PIL import Image

    rng = np.random.default_rng(0)
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        paths = []
        for i in range(2):
            p = Path(td) / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
            paths.append(p)
        pre = PreprocessConfig(input_size=(32, 32), resize=36)
        for policy in augment.POLICIES:
            ds = TrainDataset(paths, np.array([0, 1]), pre, augment=policy, hflip=True)
            torch.manual_seed(0)
            x, y = ds[0]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and int(y) == 0
            changed = not torch.equal(ds[1][0], ds[1][0]) or policy == "none"
            assert changed or policy in ("trivialaugment", "randaugment")  # those may draw the identity op


def _fit(top1: float, loss: float) -> FitResult:
    return FitResult(best_val_top1=top1, best_epoch=1, epochs_run=1, stopped_early=False, seconds=0.1, device="cpu",
                     history=[{"epoch": 1, "val_loss": loss, "val_top1": top1, "train_top1": top1}])


def test_mode_auto_keeps_the_better_on_validation_under_the_same_budget():
    ph = modes.candidates(epochs=10, warmup_epochs=2, lr_head=1e-2, lr_backbone=1e-3, freeze_bn=True)
    assert sum(p.epochs for p in ph["feature-extract"]) == sum(p.epochs for p in ph["finetune"]) == 12
    assert ph["feature-extract"][0].lr_backbone is None and ph["finetune"][-1].lr_backbone == 1e-3
    assert modes.pick({"feature-extract": _fit(0.7, 0.9), "finetune": _fit(0.8, 1.0)})[0] == "finetune"
    assert modes.pick({"feature-extract": _fit(0.8, 0.5), "finetune": _fit(0.8, 0.6)})[0] == "feature-extract"
    best, why = modes.pick({"feature-extract": _fit(0.8, 0.5), "finetune": _fit(0.8, 0.5)})
    assert best == "feature-extract" and "fewer weights" in why


def _build(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGE_TL, "build", "--out", str(out), *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "COLUMNS": "400"})


# the demo (10 shots, seed 0), shortened: half the training epochs (the guard's verdicts stand at 30: the dead
# source stays at chance, scratch and the good source learn), no pruning and PTQ only (the guard is about the
# fine-tune and what goes on from it; pruning's recoveries, with their retries, cost 27 s a build here and
# quantize.mode = "auto" runs QAT unless PTQ is confidently within 0.5 point: the pipeline's own tests,
# tests/test_build_e2e.py, run those), no Grad-CAM
FAST = ["--epochs", "30", "--no-prune", "--golden-count", "2", "--calib-count", "32", "--quantize-mode", "ptq",
        "--no-explain"]


@pytest.mark.slow
def test_guard_fires_on_the_hurtful_checkpoint_and_not_on_the_good_one(tmp_path):
    run = tmp_path / "run"
    hurtful = tmp_path / HURTFUL.name  # made from models/demo_source.pt in a second, not stored
    subprocess.run([sys.executable, str(REPO / "models" / "make_dead_checkpoint.py"), "--out", str(hurtful)],
                   check=True, capture_output=True, timeout=120)
    # the hurtful source (every unit dead, models/make_dead_checkpoint.py): warned, recorded, scratch goes on (auto)
    bad = _build(run, "--weights", str(hurtful), *FAST)
    assert bad.returncode == 0, bad.stderr[-3000:]
    said = " ".join(bad.stderr.split())
    assert "WARNING: negative transfer: the pretrained start (weights demo_dead.pt@sha256:" in said
    assert "source domain" in said and "Continuing with the from-scratch model" in said
    m = Bundle.open(run / "bundle").manifest
    t = m.build["transfer"]
    assert t["negative_transfer"]["fired"] and t["continued_from"] == "scratch" and t["warning"]
    assert t["negative_transfer"]["scratch_val_top1"] > t["negative_transfer"]["pretrained_val_top1"]
    assert json.loads((run / "metrics.json").read_text())["transfer"] == t
    state = json.loads((run / "run.json").read_text())
    prune_dir = run / "stages" / f"prune-{state['stage_keys']['prune']}"
    assert prune_dir.is_dir() and m.build["stage_keys"] == state["stage_keys"]
    report = (run / "report.md").read_text()
    assert "## Negative-transfer guard" in report and "Pruned and shipped: the **from-scratch** model" in report
    # continue_with = finetuned: still warned, the fine-tuned model goes on (pruned, were pruning on); nothing is
    # retrained
    again = _build(run, "--weights", str(hurtful), *FAST, "--continue-with", "finetuned", "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "WARNING: negative transfer" in " ".join(again.stderr.split())
    state = json.loads((run / "run.json").read_text())
    assert {"data", "finetune", "scratch"} <= set(state["skipped"]) and "prune" in state["ran"]
    assert Bundle.open(run / "bundle").manifest.build["transfer"]["continued_from"] == "finetune"
    # the good source (digits 0-4, true labels): same data, same scratch stage (reused), no warning
    good = _build(run, *FAST, "--overwrite")
    assert good.returncode == 0, good.stderr[-3000:]
    assert "negative transfer" not in " ".join(good.stderr.split())
    assert "the pretrained start beats scratch on validation" in " ".join(good.stderr.split())
    t = Bundle.open(run / "bundle").manifest.build["transfer"]
    assert t["negative_transfer"]["verdict"] == "helps" and t["continued_from"] == "finetune" and not t["warning"]
    assert "scratch" in json.loads((run / "run.json").read_text())["skipped"]
