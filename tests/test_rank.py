"""Backbone ranking before training (edge_tl.workstation.rank, `edge-tl rank`): LogME, the linear probe, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("torch", reason="the workstation extra (torch) is not installed")

from edge_tl.core.errors import EdgeTLError  # noqa: E402
from edge_tl.workstation.rank import linear_probe, logme, logme_evidence, wilson  # noqa: E402

EDGE_TL = [sys.executable, "-c", "from edge_tl.cli import main; main()"]


def _gaussian_log_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, I/beta + F F^T/alpha): the marginal likelihood LogME maximises, computed directly."""
    n = len(y)
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (n * math.log(2 * math.pi) + logdet + y @ np.linalg.solve(cov, y)))


def test_logme_evidence_is_the_maximised_marginal_likelihood():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(30, 4))
    y = f @ np.array([1.0, -0.5, 0.0, 2.0]) + 0.3 * rng.normal(size=30)
    ev, alpha, beta = logme_evidence(f, y, tol=1e-8, max_iter=1000)
    # the closed form the algorithm evaluates equals the Gaussian marginal likelihood at (alpha, beta) ...
    assert ev == pytest.approx(_gaussian_log_evidence(f, y, alpha, beta) / 30, rel=1e-9)
    # ... and (alpha, beta) is its maximum: moving either precision lowers it
    for da, db in ((1.2, 1), (1 / 1.2, 1), (1, 1.2), (1, 1 / 1.2)):
        assert _gaussian_log_evidence(f, y, alpha * da, beta * db) < ev * 30
    # the noise precision found is close to the true one (sigma 0.3 -> beta about 11)
    assert 5 < beta < 25


def test_logme_prefers_features_that_separate_the_classes():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 15)
    centres = rng.normal(size=(4, 32)) * 3
    good = centres[labels] + rng.normal(size=(60, 32))
    random = rng.normal(size=(60, 32))
    assert logme(good, labels) > logme(random, labels) + 0.1
    # more features than images (the few-shot case) works too
    wide = np.hstack([good, rng.normal(size=(60, 200))])
    assert np.isfinite(logme(wide, labels))
    with pytest.raises(EdgeTLError, match="N x D"):
        logme(good, labels[:-1])


def test_linear_probe_accuracy_band_and_folds():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 10)
    good = np.eye(3)[labels] * 5 + rng.normal(size=(30, 3)) * 0.2
    p = linear_probe(good, labels, folds=5)
    assert p.accuracy == 1.0 and p.folds == 5 and p.n == 30
    assert (p.low, p.high) == pytest.approx(wilson(30, 30))
    assert p.low < 1.0 < p.high + 1e-9
    noise = linear_probe(rng.normal(size=(30, 8)), labels, folds=5)
    assert noise.accuracy < 0.7 and noise.low < 1 / 3 < noise.high or noise.accuracy < 0.6
    few = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    assert linear_probe(rng.normal(size=(8, 2)), few, folds=5).folds == 3  # the smallest class has 3 images
    with pytest.raises(EdgeTLError, match="only 1 image"):
        linear_probe(rng.normal(size=(4, 2)), np.array([0, 0, 0, 1]))


def test_wilson_interval_known_values():
    lo, hi = wilson(40, 50)  # 80%: the textbook Wilson interval is [66.9%, 88.8%]
    assert lo == pytest.approx(0.6696, abs=1e-3) and hi == pytest.approx(0.8876, abs=1e-3)


def _tiny_folder(root, n=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            arr = np.clip(np.array(rgb) + rng.normal(0, 15, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def test_rank_cli_on_a_tiny_image_folder(tmp_path):
    data = _tiny_folder(tmp_path / "data")
    out = tmp_path / "rank.json"
    proc = subprocess.run([*EDGE_TL, "rank", "--data", str(data), "--weights", "none",
                           "--backbone", "squeezenet1_1", "--backbone", "mobilenet_v3_small", "--input-size", "32",
                           "--folds", "2", "--latency-iters", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    assert [c["weights"] for c in d["candidates"]] == ["none"] * 2
    assert {c["backbone"] for c in d["candidates"]} == {"mobilenet_v3_small", "squeezenet1_1"}
    logmes = [c["logme"] for c in d["candidates"]]
    assert logmes == sorted(logmes, reverse=True)  # best first
    assert all(c["macs"] > 0 and c["latency_ms"] > 0 and 0 <= c["probe"]["low"] <= c["probe"]["high"] <= 1
               for c in d["candidates"])
    from edge_tl.workstation.data import scan

    split = scan(data)  # the build's split (same seed): ranking sees train + val, never test
    assert d["images"] == len(split.items["train"]) + len(split.items["val"]) == 18 - len(split.items["test"]) < 18
    assert d["best"]["backbone"] == d["candidates"][0]["backbone"]
    assert "LogME" in proc.stdout and "recommendation: backbone" in proc.stdout
    assert d["candidates"][0]["recommendation"] == "best estimate"


def test_rank_cli_refuses_a_missing_folder_in_one_line(tmp_path):
    proc = subprocess.run([*EDGE_TL, "rank", "--data", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "does not exist" in lines[0]


def test_rank_without_torch_names_the_workstation_extra(tmp_path):
    from test_no_torch import run_blocked

    proc = run_blocked(textwrap.dedent(f"""
        from edge_tl.cli import main
        main(["rank", "--data", {str(tmp_path)!r}])
    """))
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: edge-tl rank needs the workstation's training stack")


def test_backbone_auto_is_a_valid_spec_value():
    from edge_tl.workstation.spec import load_spec

    spec = load_spec(None, {"model.backbone": "auto"})
    assert spec.model.backbone == "auto"
    with pytest.raises(EdgeTLError, match="or auto"):
        load_spec(None, {"model.backbone": "resnet"})


def test_backbone_auto_picks_the_best_ranked_and_keeps_the_weights(tmp_path):
    from edge_tl.workstation.rank import markdown, pick_backbone
    from edge_tl.workstation.spec import load_spec

    data = _tiny_folder(tmp_path / "data")
    spec = load_spec(None, {"data.root": str(data), "model.backbone": "auto", "model.weights": "none",
                            "model.input_size": 32})
    picked, ranking = pick_backbone(spec, data, "tiny", backbones=("squeezenet1_1", "mobilenet_v3_small"))
    assert picked.model.backbone == ranking["best"]["backbone"] == ranking["candidates"][0]["backbone"]
    assert picked.model.weights == "none" and ranking["best"]["weights"] == "none"
    assert spec.model.backbone == "auto"  # the caller's spec is not changed
    text = markdown(ranking)
    assert text.count("| none |") == 2 and "LogME (You et al., ICML 2021)" in text


def test_a_missing_weights_file_is_an_error_not_a_skipped_row(tmp_path):
    from edge_tl.core.preprocess import PreprocessConfig
    from edge_tl.workstation.rank import rank_backbones

    x = np.zeros((4, 3, 16, 16), dtype=np.float32)
    with pytest.raises(EdgeTLError, match="does not exist"):
        rank_backbones(x, np.array([0, 0, 1, 1]), ["a", "b"], PreprocessConfig(input_size=(16, 16), resize=16),
                       weights=["none", str(tmp_path / "missing.pt")], latency_iters=0)


def test_untrained_pairs_never_rank_above_pretrained_ones():
    from edge_tl.workstation.rank import Candidate, order_candidates

    cands = [Candidate("mobilenet_v3_small", "none", logme=1.2), Candidate("mobilenet_v2", "demo", logme=0.4),
             Candidate("squeezenet1_1", "none", logme=0.9), Candidate("mobilenet_v3_large", "demo", logme=0.6)]
    ordered, notes = order_candidates(cands)
    assert [(c.backbone, c.weights) for c in ordered] == [
        ("mobilenet_v3_large", "demo"), ("mobilenet_v2", "demo"), ("mobilenet_v3_small", "none"),
        ("squeezenet1_1", "none")]
    assert notes and "listed after the pretrained ones" in notes[0]
    only_none, notes = order_candidates([c for c in cands if c.weights == "none"])  # weights = none asked: by score
    assert [c.backbone for c in only_none] == ["mobilenet_v3_small", "squeezenet1_1"] and notes == []


def test_a_checkpoint_of_another_architecture_is_skipped_without_building_it():
    """_misfit agrees with create_model, which refuses the same pairs (backbones.load_backbone_weights)."""
    from edge_tl.workstation.demo import demo_checkpoint
    from edge_tl.workstation.rank import _misfit
    from edge_tl.workstation.train import create_model

    ckpt = str(demo_checkpoint())  # mobilenet_v2 with a 5-class head
    assert not _misfit("mobilenet_v2", ckpt) and not _misfit("squeezenet1_1", "none")
    create_model("mobilenet_v2", 3, ckpt)  # another head size still fits
    for other in ("mobilenet_v3_small", "squeezenet1_1"):
        assert _misfit(other, ckpt)
        with pytest.raises(EdgeTLError, match="do not fit"):
            create_model(other, 3, ckpt)


def test_the_demo_checkpoint_is_a_candidate_for_digits_only_and_imagenet_is_always_a_row():
    """Issue 23: rank recommended the digits checkpoint for photos and listed no ImageNet row without saying why."""
    from edge_tl.workstation.rank import default_weights

    assert "demo" not in default_weights(kind="photos") and "imagenet" in default_weights(kind="photos")
    assert default_weights(["my.pt"], kind="photos") == ["none", "imagenet", "my.pt"]
    assert "demo" in default_weights(kind="digits")


def test_the_cli_table_never_cuts_a_backbone_name_in_80_columns():
    """Issue 23: `edge-tl rank` printed 'mobilene…' in an 80-column terminal."""
    import io

    from rich.console import Console

    from edge_tl.cli.rank import rank_table

    cand = {"backbone": "efficientnet_lite0", "weights": "imagenet", "skipped": None, "logme": 1.234,
            "probe": {"accuracy": 0.9, "low": 0.8, "high": 0.95}, "macs": 385e6, "latency_ms": 12.3,
            "recommendation": "best LogME and probe; the fastest within the interval of the best"}
    d = {"candidates": [cand, {**cand, "backbone": "mobilenet_v3_small", "weights": "none"},
                        {**cand, "backbone": "mobilenet_v3_large", "skipped": "ImageNet weights not cached"}]}
    buf = io.StringIO()
    Console(file=buf, width=80, highlight=False).print(rank_table(d, "rank"))
    text = buf.getvalue()
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    for name in ("efficientnet_lite0", "mobilenet_v3_small", "mobilenet_v3_large"):
        assert name in text


def test_build_help_cuts_nothing_in_80_columns():
    """Issue 23: `build --help` cut backbone names ('mobilenet_v3_sma…') in an 80-column terminal; below 100
    columns the help is plain text that wraps words."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).with_name("edge-tl"))
    out = subprocess.run([exe, "build", "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "80"}).stdout
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert "mobilenet_v3_small" in out and "efficientnet_lite0" in out
