"""Calibration (issue 14, item 7): temperature scaling fitted by the build, stored in the bundle's postprocess.json,
applied by `edge-tl infer` and `edge-tl serve` (real ONNX Runtime sessions, a real HTTP server)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundle_factory import make_tiny_bundle
from PIL import Image

from edge_tl.cli import main
from edge_tl.core.bundle import MANIFEST, POSTPROCESS, Bundle, _artifact_table, bundle_id_of, write_bundle
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.postprocess import PostprocessConfig, softmax
from edge_tl.core.signing import manifest_digest

T = 2.5


@pytest.fixture(scope="module")
def hot_bundle(tmp_path_factory) -> Path:
    """The tiny bundle with a calibrated temperature of 2.5 in its postprocess.json."""
    return make_tiny_bundle(tmp_path_factory.mktemp("hot") / "tiny", temperature=T, tarball=False)


def reseal(root: Path, **manifest_changes) -> None:
    """Re-hash a bundle folder after editing its files (what a tampered-then-resealed bundle looks like)."""
    data = json.loads((root / MANIFEST).read_text())
    arts = {k: v.model_dump() for k, v in _artifact_table(root).items()}
    data.update(artifacts=arts, bundle_id=bundle_id_of(_artifact_table(root)), **manifest_changes)
    if data["schema_version"] >= 4:  # the id covers the whole manifest
        data["bundle_id"] = manifest_digest(data)[:16]
    (root / MANIFEST).write_text(json.dumps(data))


def synthetic(n: int, classes: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / temperature): T is the true temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3.0, (n, classes))
    p = softmax(logits / temperature).astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_fit_recovers_a_known_temperature(true_t):
    from edge_tl.workstation.calibrate import calibrate, ece, fit_temperature, nll

    logits, labels = synthetic(6000, 10, true_t, seed=1)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.06)
    assert nll(logits, labels, t) <= nll(logits, labels, true_t) + 1e-9  # it is the minimum on these data
    # scaled by the fitted temperature the scores are calibrated: ECE at the sampling noise of 6000 draws
    assert ece(softmax(logits / t), labels) < 0.02
    held_out = synthetic(4000, 10, true_t, seed=2)
    cal = calibrate(logits, labels, *held_out)
    assert cal["temperature_fitted"] == pytest.approx(t) and cal["ece_bins"] == 15
    if true_t != 1.0:  # 6000 images: the gain of the fit is far beyond noise, so it ships
        assert cal["temperature"] == pytest.approx(t) and not cal["kept_t1"] and cal["cv_nll_gain"]["ci95"][0] > 0
    else:  # already calibrated: whatever the fit, the shipped T is within noise of 1
        assert cal["temperature"] == 1.0 or cal["temperature"] == pytest.approx(1.0, rel=0.06)
    assert cal["ece_after"] < 0.03
    for when in ("before", "after"):  # every ECE carries its 95% bootstrap interval
        lo, hi = cal[f"ece_{when}_ci95"]
        assert lo <= cal[f"ece_{when}"] <= hi
    if true_t != 1.0:  # the raw logits were over- or under-confident: temperature scaling helps on held-out data
        assert cal["ece_after"] < cal["ece_before"] and cal["nll_after"] < cal["nll_before"]


def test_a_fit_that_does_not_help_held_out_images_keeps_t_1():
    """Issue 23: T = 0.259 fitted on 24 validation images took the test NLL from 0.49 to 0.89. On a small validation
    split whose model is already calibrated the fit is noise: cross-validation says so and T = 1 ships. A fit at its
    search bound (separable logits) keeps T = 1 too (issue 24)."""
    from edge_tl.workstation.calibrate import calibrate, choose_temperature, summary_line

    kept = 0
    for seed in range(10):
        logits, labels = synthetic(24, 4, 1.0, seed=seed)
        t, why = choose_temperature(logits, labels)
        kept += why["kept_t1"]
        if why["kept_t1"]:
            assert t == 1.0 and "beyond noise" in why["decision"] and why["temperature_fitted"] != 1.0
    assert kept >= 8  # a 95% interval: at most a rare seed shows a gain
    separable = np.eye(4)[np.arange(40) % 4] * 20.0
    t, why = choose_temperature(separable, np.arange(40) % 4)
    assert t == 1.0 and why["kept_t1"] and "no usable temperature" in why["decision"]
    # every image right with modest margins (NLL 0.11 at T = 1, as on a 16-photo validation split): the NLL is 0 in
    # float64 well before the bound, where the fit stopped at T = 0.016 and cross-validation saw a "gain"
    modest = np.eye(4)[np.arange(16) % 4] * 2.5 + np.random.default_rng(0).normal(0, 0.3, (16, 4))
    assert (modest.argmax(1) == np.arange(16) % 4).all()
    t, why = choose_temperature(modest, np.arange(16) % 4)
    assert t == 1.0 and why["kept_t1"] and "every validation image is right" in why["decision"]
    wrong = np.eye(4)[(np.arange(40) + 1) % 4] * 20.0  # every answer wrong with a wide margin: T runs to its bound
    t, why = choose_temperature(wrong, np.arange(40) % 4)
    assert t == 1.0 and "search bound" in why["decision"] and why["temperature_fitted"] > 100
    cal = calibrate(separable, np.arange(40) % 4, separable, np.arange(40) % 4)
    assert cal["temperature"] == 1.0 and "temperature 1 kept" in summary_line(cal)
    assert "T = 1 kept" in cal["fitted_on"]


def test_ece_by_hand():
    from edge_tl.workstation.calibrate import reliability

    # 4 images, 2 classes, 2 bins: confidences 0.9, 0.8 (bin 2, one right) and 0.6, 0.7 (bin 2 too: > 0.5)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 0, 0, 1])  # right, wrong, right, right
    r = reliability(probs, labels, bins=2)
    assert r["count"] == [0, 4]
    assert r["ece"] == pytest.approx(abs(0.75 - (0.9 + 0.8 + 0.6 + 0.7) / 4))
    r = reliability(probs, labels, bins=10)  # bins (0.5,0.6], (0.6,0.7], (0.7,0.8], (0.8,0.9]: one image each
    assert r["ece"] == pytest.approx((abs(1 - 0.6) + abs(1 - 0.7) + abs(0 - 0.8) + abs(1 - 0.9)) / 4)


def test_infer_applies_the_bundles_temperature(hot_bundle, tmp_path, capsys):
    import onnxruntime as ort

    b = Bundle.open(hot_bundle)
    assert b.postprocess.temperature == T and b.postprocess.calibrated
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (30, 24, 3), dtype=np.uint8))
    img.save(tmp_path / "a.png")
    sess = ort.InferenceSession(str(b.model_path("int8")), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": b.preprocessor(img)[None]})[0]
    want = softmax(logits / T)[0]
    with pytest.raises(SystemExit) as code:
        main(["infer", str(tmp_path / "a.png"), "--bundle", str(hot_bundle), "--backend", "ort-cpu", "-k", "4"])
    assert code.value.code == 0
    captured = capsys.readouterr()
    rec = json.loads(captured.out.strip())
    assert [p["index"] for p in rec["top_k"]] == list(np.argsort(-want))
    np.testing.assert_allclose([p["score"] for p in rec["top_k"]], np.sort(want)[::-1], atol=2e-6)
    assert not np.allclose(np.sort(want)[::-1], np.sort(softmax(logits)[0])[::-1], atol=1e-3)  # T matters here
    assert "softmax(logits / 2.5)" in captured.err


def test_serve_classify_applies_the_bundles_temperature(hot_bundle):
    import onnxruntime as ort

    from edge_tl.device.serve.config import ServeConfig
    from edge_tl.device.serve.server import ThreadedServer

    b = Bundle.open(hot_bundle)
    img = Image.fromarray(np.random.default_rng(9).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    sess = ort.InferenceSession(str(b.model_path("int8")), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": b.preprocessor(img)[None]})[0]
    want = softmax(logits / T)[0]
    with ThreadedServer(ServeConfig(bundle=hot_bundle, port=0)) as srv:
        r = httpx.post(srv.url + "/classify?top_k=4", content=buf.getvalue(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        # the raw KServe v2 output stays the logits (what the parity gate and Triton clients compare)
        x = b.preprocessor(img)[None]
        raw = httpx.post(srv.url + "/v2/models/tiny/infer", json={"inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert [p["index"] for p in preds] == list(np.argsort(-want))
    np.testing.assert_allclose([p["score"] for p in preds], np.sort(want)[::-1], atol=2e-6)
    np.testing.assert_allclose(raw.json()["outputs"][0]["data"], logits.ravel(), atol=1e-5)


@pytest.mark.parametrize("bad, needle", [(0, "greater than 0"), (-1.5, "greater than 0"),
                                         ("NaN", "finite number"), ("Infinity", "finite number"),
                                         ("warm", "valid number")])
def test_bad_temperature_is_a_one_line_error(tiny_bundle, capsys, bad, needle):
    text = (tiny_bundle / POSTPROCESS).read_text()
    data = json.loads(text)
    data["temperature"] = bad
    raw = json.dumps(data)
    if bad in ("NaN", "Infinity"):  # JSON's non-standard literals, as Python's json writes float('nan')
        raw = raw.replace(f'"{bad}"', bad)
    (tiny_bundle / POSTPROCESS).write_text(raw)
    reseal(tiny_bundle)  # the hashes match: the temperature itself must be refused
    with pytest.raises(EdgeTLError, match=needle) as err:
        Bundle.open(tiny_bundle)
    assert "\n" not in str(err.value) and "postprocess.json" in str(err.value)
    with pytest.raises(SystemExit) as code:
        main(["infer", str(tiny_bundle / "golden" / "images" / "000.png"), "--bundle", str(tiny_bundle)])
    assert code.value.code == 2
    err_text = capsys.readouterr().err
    assert "temperature" in err_text and "Traceback" not in err_text


def test_write_bundle_refuses_a_bad_temperature(tiny_bundle, tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    for p in tiny_bundle.iterdir():
        if p.name != MANIFEST:
            (staging / p.name).symlink_to(p, target_is_directory=p.is_dir())
    (staging / POSTPROCESS).unlink()
    (staging / POSTPROCESS).write_text('{"temperature": -2}')
    manifest = Bundle.open(tiny_bundle).manifest
    with pytest.raises(EdgeTLError, match="temperature"):
        write_bundle(staging, manifest, tmp_path / "out", tarball=False)
    assert not (tmp_path / "out").exists()


def test_schema_1_bundle_without_postprocess_reads_temperature_1(tiny_bundle, tmp_path, capsys):
    (tiny_bundle / POSTPROCESS).unlink()
    reseal(tiny_bundle, schema_version=1)
    b = Bundle.open(tiny_bundle)
    assert b.manifest.schema_version == 1
    assert b.postprocess == PostprocessConfig() and b.postprocess.temperature == 1.0 and not b.postprocess.calibrated
    with pytest.raises(SystemExit) as code:
        main(["infer", str(tiny_bundle / "golden" / "images" / "000.png"), "--bundle", str(tiny_bundle),
              "--backend", "ort-cpu", "-k", "4"])
    assert code.value.code == 0
    captured = capsys.readouterr()
    assert "plain softmax" in captured.err
    assert sum(p["score"] for p in json.loads(captured.out)["top_k"]) == pytest.approx(1.0, abs=1e-4)
    # a schema 2 bundle must carry its postprocess.json: dropping it is caught like any missing artifact
    reseal(tiny_bundle, schema_version=2)
    with pytest.raises(EdgeTLError, match="does not list postprocess.json"):
        Bundle.open(tiny_bundle)
