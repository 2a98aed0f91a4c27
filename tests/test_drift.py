"""Drift on the device (issue 25 item 3): the PSI as defined, per-signal thresholds fitted on simulated streams
that an undrifted stream does not cross (also one that loops through a few pictures), a shifted stream that crosses
them within one window, schema 2's single threshold still read, and the served model's drift on /metrics (a real
server)."""

from __future__ import annotations

import numpy as np
import pytest
from bundle_factory import make_images, make_tiny_bundle

from edge_tl.core.drift import (
    DriftMonitor,
    DriftReference,
    bin_shares,
    decile_edges,
    input_signals,
    psi,
    stream_psis,
)
from edge_tl.workstation.calibrate import fit_drift_reference


def test_psi_is_the_textbook_formula():
    edges = decile_edges(np.arange(1000))
    assert np.allclose(bin_shares(edges, np.arange(1000)), 0.1)
    assert psi(edges, np.arange(1000)) == pytest.approx(0.0, abs=1e-12)
    values = np.concatenate([np.full(50, 10.0), np.full(50, 990.0)])  # half in the first bin, half in the last
    p = np.array([0.5] + [0.5 / 100] * 8 + [0.5])  # empty bins: half a count of 100
    assert psi(edges, values) == pytest.approx(float(np.sum((p - 0.1) * np.log(p / 0.1))))


def _stream(rng, n, shift=0.0):
    return {"confidence": np.clip(rng.beta(8, 2, n) - shift, 0, 1), "input_red": rng.normal(shift * 4, 1, n),
            "input_green": rng.normal(0, 1, n), "input_blue": rng.normal(-shift * 4, 1, n)}


def test_an_undrifted_stream_stays_quiet_and_a_shifted_one_is_flagged_within_a_window():
    """The issue's target, on synthetic signals: no flag over 2,000 undrifted requests, a flag within the first
    200 drifted ones (a colour cast moves the input mean, a new camera lowers the confidence)."""
    rng = np.random.default_rng(0)
    ref = fit_drift_reference(_stream(rng, 100), window=200, variety=100)
    assert ref.window == 200 and set(ref.edges) == {"confidence", "input_red", "input_green", "input_blue"}
    assert set(ref.thresholds) == set(ref.edges) and min(ref.thresholds.values()) > 0
    quiet = DriftMonitor(ref)
    stream = _stream(rng, 2000)
    for i in range(2000):
        quiet.observe(**{k: v[i] for k, v in stream.items()})
        if i >= 199:
            assert not any(s["drifted"] for s in quiet.status().values()), (i, quiet.status())
    moved = DriftMonitor(ref)
    drifted = _stream(rng, 200, shift=0.15)
    flagged = None
    for i in range(200):
        moved.observe(**{k: v[i] for k, v in drifted.items()})
        if flagged is None and any(s["drifted"] for s in moved.status().values()):
            flagged = i + 1
    assert flagged == 200  # the first full window already says so


def test_stream_psis_is_what_the_monitor_says_after_each_request():
    rng = np.random.default_rng(1)
    edges = decile_edges(rng.normal(size=300))
    stream = rng.normal(0.3, 1.2, 120)
    ref = DriftReference(window=50, thresholds={"confidence": 1.0}, edges={"confidence": edges}, fitted_on="tests")
    mon, said = DriftMonitor(ref), []
    for v in stream:
        mon.observe(confidence=v)
        said.append(mon.status()["confidence"]["psi"])
    assert said[:49] == [None] * 49
    assert np.allclose(said[49:], stream_psis(edges, stream, 50), rtol=0, atol=1e-12)


def test_a_field_that_loops_through_a_few_pictures_is_not_drift():
    """A camera's undrifted stream repeats what it sees: 2,000 requests from 40 pictures, none of them in the
    reference (40 others of the same scene), cross no threshold; the input signals, whose reference also holds
    200 training pictures, get finer edges and lower thresholds than the confidence (validation only)."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        ref_values = _stream(rng, 240)
        signals = {k: (v[:40] if k == "confidence" else v) for k, v in ref_values.items()}
        ref = fit_drift_reference(signals, window=200, variety=40, seed=seed)
        assert max(ref.thresholds[c] for c in ("input_red", "input_green", "input_blue")) < ref.thresholds["confidence"]
        field = _stream(rng, 40)
        order = rng.integers(0, 40, 2000)
        for name, values in field.items():
            assert stream_psis(ref.edges[name], values[order], 200).max() <= ref.thresholds[name], (seed, name)


def test_schema_2s_single_threshold_is_read_per_signal():
    edges = {"confidence": decile_edges(np.linspace(0, 1, 50)), "input_red": decile_edges(np.linspace(-1, 1, 50))}
    ref = DriftReference.model_validate({"window": 20, "threshold": 0.7, "edges": edges, "fitted_on": "schema 2"})
    assert ref.thresholds == {"confidence": 0.7, "input_red": 0.7}
    with pytest.raises(ValueError, match="one threshold"):
        DriftReference(window=20, thresholds={"confidence": 0.7}, edges=edges, fitted_on="a signal without one")


def test_the_input_signals_see_a_colour_cast_and_a_blur_and_grey_pictures_leave_warmth_out():
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(2)
    photos = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(30)]

    def batch(images):
        return np.stack([np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1 for im in images])

    sig = input_signals(batch(photos))
    assert set(sig) == {"input_red", "input_green", "input_blue", "input_warmth", "input_sharpness"}
    warm = input_signals(batch([Image.merge("RGB", (im.getchannel(0).point(lambda v: min(255, int(v * 1.25))),
                                                    im.getchannel(1), im.getchannel(2).point(lambda v: int(v * 0.75))))
                                for im in photos]))
    blurred = input_signals(batch([im.filter(ImageFilter.GaussianBlur(1.5)) for im in photos]))
    assert np.all(warm["input_warmth"] > sig["input_warmth"])
    assert np.all(blurred["input_sharpness"] < 0.5 * sig["input_sharpness"])
    assert np.allclose(blurred["input_red"], sig["input_red"], atol=0.02)  # a blur keeps the channel means
    grey = input_signals(batch([im.convert("L").convert("RGB") for im in photos]))
    assert np.all(grey["input_warmth"] == 0)
    ref = fit_drift_reference({"confidence": rng.beta(8, 2, 30), **grey}, window=50, variety=30)
    assert "input_warmth" not in ref.edges and "input_sharpness" in ref.thresholds
    assert "left out, fewer than 10 distinct values: input_warmth" in ref.fitted_on


def test_the_reference_refuses_too_few_images():
    with pytest.raises(ValueError, match="too few"):
        fit_drift_reference(_stream(np.random.default_rng(0), 10), window=50, variety=10)


def test_serve_reports_drift_on_metrics(tmp_path):
    import io

    import httpx

    from edge_tl.device.serve.config import ServeConfig
    from edge_tl.device.serve.server import ThreadedServer

    edges = {"confidence": decile_edges(np.linspace(0.3, 0.9, 50)),
             **{c: decile_edges(np.linspace(-1, 1, 50)) for c in ("input_red", "input_green", "input_blue")}}
    ref = DriftReference(window=20, thresholds=dict.fromkeys(edges, 0.5), edges=edges, fitted_on="tests")
    path = make_tiny_bundle(tmp_path / "tiny", tarball=False, drift=ref)
    cfg = ServeConfig(bundle=path, port=0, backend="ort-cpu", precision="fp32")
    with ThreadedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        before = client.get("/metrics").text
        assert 'edge_tl_drift_psi{signal="confidence"} NaN' in before  # the window is not full yet
        for img in make_images(20, seed=3):
            png = io.BytesIO()
            img.save(png, "PNG")
            assert client.post("/v2/models/tiny/classify", content=png.getvalue()).status_code == 200
        after = client.get("/metrics").text
    lines = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in after.splitlines() if ln.startswith("edge_tl_drift")}
    for signal in ("confidence", "input_red", "input_green", "input_blue"):
        value = lines[f'edge_tl_drift_psi{{signal="{signal}"}}']
        assert np.isfinite(value) and lines[f'edge_tl_drift{{signal="{signal}"}}'] == float(value > 0.5)
        assert lines[f'edge_tl_drift_threshold{{signal="{signal}"}}'] == 0.5
