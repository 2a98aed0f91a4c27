"""Field capture (issue 25 item 2): the pictures the model is unsure of are kept, atomically, within caps, and a
full disk stops capture, never inference. Real files, a real (tmpfs) full disk where the test may mount one,
real infer and serve."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_tl.core.errors import EdgeTLError
from edge_tl.device.capture import TMP_PREFIX, CapturePolicy, Capturer, reason_for

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_the_policy_says_why():
    pol = CapturePolicy(max_score=0.6, min_margin=0.1, random_rate=0.05)
    assert reason_for(np.array([0.5, 0.3, 0.2]), pol, 0.9) == "low-score"
    assert reason_for(np.array([0.62, 0.38]), pol, 0.9) is None
    assert reason_for(np.array([0.62, 0.55, 0.0]), pol, 0.9) == "small-margin"
    assert reason_for(np.array([0.95, 0.05]), pol, 0.01) == "random"
    assert reason_for(np.array([0.95, 0.05]), pol, 0.5) is None
    with pytest.raises(EdgeTLError, match="outside"):
        CapturePolicy(max_score=1.5)


def test_kept_pictures_are_whole_with_their_sidecar_and_caps_hold(tmp_path):
    folder = tmp_path / "cap"
    folder.mkdir()
    (folder / f"{TMP_PREFIX}crashed.png").write_bytes(b"half")  # a crash's leftover: removed on start
    (folder / "notes.txt").write_text("the user's")  # not ours: never touched
    cap = Capturer(folder, CapturePolicy(max_per_minute=3, random_rate=0.0), "b" * 16, ["a", "b"])
    assert not list(folder.glob(TMP_PREFIX + "*")) and (folder / "notes.txt").read_text() == "the user's"
    kept = [cap.consider(np.array([0.55, 0.45]), source=f"img{i}.png", data=_png(i)) for i in range(5)]
    assert kept == ["low-score"] * 3 + [None, None] and cap.skipped_rate == 2  # 3 a minute
    sidecars = sorted(folder.glob("*.json"))
    assert len(sidecars) == 3
    for sc in sidecars:
        meta = json.loads(sc.read_text())
        blob = (folder / meta["image"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == meta["sha256"] and meta["bundle_id"] == "b" * 16
        assert meta["top_k"][0] == {"label": "a", "index": 0, "score": 0.55} and meta["reason"] == "low-score"
    assert cap.consider(np.array([0.99, 0.01]), source="sure.png", data=_png(9)) is None  # a sure answer
    # the byte quota: counted from what is in the folder, stops capture (with the reason), keeps the files
    small = Capturer(folder, CapturePolicy(max_bytes=cap.bytes + 10, random_rate=0.0), "b" * 16, ["a", "b"])
    assert small.consider(np.array([0.5, 0.5]), source="x", data=_png(11)) is None
    assert "quota" in small.stopped and len(list(folder.glob("*.json"))) == 3
    # a camera frame (BGR array) is saved as PNG in RGB order
    frame = np.zeros((8, 8, 3), np.uint8)
    frame[..., 2] = 255  # red in BGR
    cap2 = Capturer(tmp_path / "frames", CapturePolicy(random_rate=0.0), "c" * 16, ["a", "b"])
    assert cap2.consider(np.array([0.5, 0.5]), source="/dev/video0", image=frame, frame=7) == "low-score"
    meta = json.loads(next((tmp_path / "frames").glob("*.json")).read_text())
    with Image.open(tmp_path / "frames" / meta["image"]) as img:
        assert img.getpixel((0, 0)) == (255, 0, 0) and meta["frame"] == 7


def test_decide_holds_a_place_under_the_cap_and_a_failed_keep_gives_it_back(tmp_path):
    """serve decides on the request's path and writes on its capture thread (decide, then keep): a picture decided
    on counts against the per-minute cap at once, and one that cannot be written gives its place back."""
    cap = Capturer(tmp_path / "cap", CapturePolicy(max_per_minute=2, random_rate=0.0), "d" * 16, ["a", "b"])
    unsure = np.array([0.5, 0.5])
    first, second = cap.decide(unsure), cap.decide(unsure)
    assert (first, second) == ("low-score", "low-score")
    assert cap.decide(unsure) is None and cap.skipped_rate == 1  # two places taken before anything was written
    assert cap.keep(first, unsure, source="x", data=b"not a picture") is None  # cannot be read: not written
    assert not list((tmp_path / "cap").iterdir()) and cap.stopped is None  # nothing half-written, capture goes on
    third = cap.decide(unsure)  # the failed picture's place is free again
    assert third == "low-score" and cap.decide(unsure) is None
    assert cap.keep(second, unsure, source="y", data=_png(1)) == "low-score"
    assert cap.keep(third, unsure, source="z", data=_png(2)) == "low-score"
    assert cap.kept == {"low-score": 2} and len(list((tmp_path / "cap").glob("*.json"))) == 2
    assert cap.decide(np.array([0.99, 0.01])) is None  # a sure answer is not kept


def test_a_full_disk_stops_capture_not_inference(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("a tmpfs can't be mounted here (the full disk is a real one, not a stand-in)")
    try:
        cap = Capturer(mnt, CapturePolicy(random_rate=0.0, max_per_minute=1000), "d" * 16, ["a", "b"])
        big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)  # ~120 KB as PNG
        assert cap.consider(np.array([0.5, 0.5]), source="big", image=big) is None
        assert "failed" in cap.stopped and "No space left" in cap.stopped
        assert not list(mnt.iterdir())  # nothing half-written left
        assert cap.consider(np.array([0.5, 0.5]), source="next", data=_png(1)) is None  # stopped, quietly
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_infer_captures_the_unsure_pictures(tiny_bundle_src, tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(6):
        (pics / f"p{i}.png").write_bytes(_png(i))
    out, cap = tmp_path / "out.jsonl", tmp_path / "cap"
    r = subprocess.run([EDGE_TL, "infer", str(pics), "--bundle", str(tiny_bundle_src), "--backend", "ort-cpu",
                        "--out", str(out), "--capture", str(cap), "--capture-below", "1.0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(rec["captured"] == "low-score" for rec in recs)  # every score is below 1.0
    assert "captured 6 picture(s)" in r.stderr
    for rec in recs:  # the original file's bytes, not a re-encoding
        meta = next(json.loads(p.read_text()) for p in cap.glob("*.json")
                    if json.loads(p.read_text())["source"] == rec["source"])
        assert (cap / meta["image"]).read_bytes() == Path(rec["source"]).read_bytes()
        assert meta["top_k"][0]["label"] == rec["top_k"][0]["label"]


def test_serve_captures_off_the_request_path(tiny_bundle_src, tmp_path):
    httpx = pytest.importorskip("httpx")
    from edge_tl.device.serve.app import create_app
    from edge_tl.device.serve.config import ServeConfig

    cap = tmp_path / "cap"
    cfg = ServeConfig(bundle=tiny_bundle_src, backend="ort-cpu", capture=cap,
                      capture_policy=CapturePolicy(max_score=1.0, random_rate=0.0))
    app = create_app(cfg)

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                for i in range(3):
                    r = await client.post("/classify", content=_png(i))
                    assert r.status_code == 200  # answered before its picture is written (capture's own thread)
                for _ in range(100):
                    metrics = (await client.get("/metrics")).text
                    if 'edge_tl_captured_total{reason="low-score"} 3.0' in metrics:
                        break
                    await asyncio.sleep(0.05)
        return metrics

    metrics = asyncio.run(main())  # the lifespan's end waits for the capture thread
    assert len(list(cap.glob("*.json"))) == 3
    assert 'edge_tl_captured_total{reason="low-score"} 3.0' in metrics
