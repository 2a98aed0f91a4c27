"""The out-of-distribution rule (issue 25 item 1): scores computed as their papers define them, a threshold that
keeps the share of validation images it says, the rule carried by postprocess.json (hashed with the bundle), and
"unknown" answers from infer and /classify, which a real server returns and counts. How well each score separates
pictures of no class is a benchmark (benchmarks/bench_ood.py, RESULTS.md "ood"), not a test."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from bundle_factory import make_images, make_tiny_bundle
from scipy.special import logsumexp, softmax

from edge_tl.core.bundle import Bundle
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.postprocess import OODRule, PostprocessConfig, ood_scores
from edge_tl.device.infer import run_infer
from edge_tl.workstation.calibrate import fit_ood_rule

LOGITS = np.array([[4.0, 0.0, -1.0], [0.3, 0.2, 0.1], [-2.0, 9.0, 1.0]])


def test_the_scores_are_the_papers():
    assert np.allclose(ood_scores(LOGITS, "energy"), logsumexp(LOGITS, axis=1))  # -E(x), Liu et al. 2020
    assert np.allclose(ood_scores(LOGITS, "max_logit"), LOGITS.max(axis=1))
    assert np.allclose(ood_scores(LOGITS, "msp", temperature=2.0), softmax(LOGITS / 2.0, axis=1).max(axis=1))
    with pytest.raises(EdgeTLError, match="unknown OOD score 'mahalanobis'"):
        ood_scores(LOGITS, "mahalanobis")


@pytest.mark.parametrize("keep", [0.5, 0.8, 0.95, 1.0])
def test_the_threshold_keeps_what_it_says(keep):
    val = np.random.default_rng(0).normal(size=(200, 5)) * 3
    rule = fit_ood_rule(val, "energy", keep)
    kept = np.mean(ood_scores(val, "energy") >= rule.threshold)
    assert kept >= keep and kept - keep < 1.5 / 200 + 1e-9  # ties aside, the share asked for (never less)
    assert rule.in_distribution_kept == pytest.approx(kept, abs=1e-4) and "200 validation images" in rule.fitted_on


def test_the_rule_travels_in_postprocess_json(tmp_path):
    rule = OODRule(score="max_logit", threshold=1.0, in_distribution_kept=0.95, fitted_on="tests")
    cfg = PostprocessConfig(temperature=1.5, fitted_on="tests", ood=rule)
    cfg.save(tmp_path / "postprocess.json")
    back = PostprocessConfig.load(tmp_path / "postprocess.json")
    assert back == cfg and back.unknown(LOGITS).tolist() == [False, True, False]
    assert back.ood_fields(LOGITS[1]) == {"ood_score": 0.3, "unknown": True}
    assert PostprocessConfig().ood_fields(LOGITS[1]) == {}  # no rule (a bundle before schema 2): nothing added
    data = json.loads((tmp_path / "postprocess.json").read_text())
    data["ood"]["score"] = "entropy"
    (tmp_path / "postprocess.json").write_text(json.dumps(data))
    with pytest.raises(EdgeTLError, match="not a valid postprocess.json: 'ood.score'"):
        PostprocessConfig.load(tmp_path / "postprocess.json")


@pytest.fixture(scope="module")
def ood_bundle(tmp_path_factory):
    """The tiny bundle with an energy rule whose threshold is the median energy of some pictures: half unknown."""
    plain = Bundle.open(make_tiny_bundle(tmp_path_factory.mktemp("plain") / "tiny", tarball=False))
    images = make_images(8, seed=42)
    folder = tmp_path_factory.mktemp("pics")
    for i, img in enumerate(images):
        img.save(folder / f"{i}.png")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(plain.model_path("int8")), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": plain.preprocessor.batch(images)})[0]
    threshold = float(np.median(ood_scores(logits, "energy")))
    rule = OODRule(score="energy", threshold=threshold, in_distribution_kept=0.5, fitted_on="tests")
    path = make_tiny_bundle(tmp_path_factory.mktemp("ood") / "tiny", tarball=False, ood=rule)
    expected = {f"{i}.png": bool(s < threshold) for i, s in enumerate(ood_scores(logits, "energy"))}
    return path, folder, expected


def test_infer_and_classify_answer_unknown(ood_bundle):
    from edge_tl.device.serve.config import ServeConfig
    from edge_tl.device.serve.server import ThreadedServer

    path, folder, expected = ood_bundle
    assert 0 < sum(expected.values()) < len(expected)
    buf = io.StringIO()
    run_infer(str(folder), bundle=path, backend="ort-cpu", k=2, out=buf)
    recs = {json.loads(line)["source"].rsplit("/", 1)[-1]: json.loads(line) for line in buf.getvalue().splitlines()}
    assert {name: rec["unknown"] for name, rec in recs.items()} == expected
    assert all(len(rec["top_k"]) == 2 and isinstance(rec["ood_score"], float) for rec in recs.values())
    cfg = ServeConfig(bundle=path, port=0, backend="ort-cpu", precision="int8")
    with ThreadedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        for name, unknown in expected.items():
            r = client.post("/v2/models/tiny/classify", content=(folder / name).read_bytes())
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["unknown"] is unknown and body["ood_score"] == pytest.approx(recs[name]["ood_score"], abs=1e-4)
        metrics = client.get("/metrics").text
    n_unknown = sum(expected.values())
    assert f'edge_tl_classify_answers_total{{unknown="true"}} {float(n_unknown)}' in metrics
    assert f'edge_tl_classify_answers_total{{unknown="false"}} {float(len(expected) - n_unknown)}' in metrics


def test_capture_keeps_unknown_pictures_first(tmp_path):
    from edge_tl.device.capture import CapturePolicy, Capturer, reason_for

    policy = CapturePolicy(random_rate=0.0)
    sure = np.array([0.98, 0.01, 0.01])
    assert reason_for(sure, policy, 0.5) is None and reason_for(sure, policy, 0.5, unknown=True) == "unknown"
    cap = Capturer(tmp_path / "cap", policy, "0" * 16, ["a", "b", "c"])
    png = io.BytesIO()
    make_images(1)[0].save(png, "PNG")
    why = cap.consider(sure, source="x.png", data=png.getvalue(), ood={"ood_score": -1.5, "unknown": True})
    assert why == "unknown"
    sidecar = json.loads(next((tmp_path / "cap").glob("*.json")).read_text())
    assert sidecar["reason"] == "unknown" and sidecar["ood_score"] == -1.5 and sidecar["unknown"] is True
