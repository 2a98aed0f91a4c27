"""`edge-tl infer`: folders with a corrupt image, a video written with OpenCV, reconnects, SOURCE parsing."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from edge_tl.cli import main
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.layout import DeviceLayout
from edge_tl.device.infer import Classifier, run_infer, softmax, top_k
from edge_tl.device.sources import VideoSource, open_source, parse_source


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code


def rand_image(seed: int, size=(30, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def test_folder_with_corrupt_image(tmp_path, tiny_bundle_src, bundle, reference):
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    images = {folder / "a.png": rand_image(1), folder / "sub" / "b.jpg": rand_image(2),
              folder / "c.bmp": rand_image(3)}
    for path, img in images.items():
        img.save(path)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "out.jsonl"
    code = run_cli(["infer", str(folder), "--bundle", str(tiny_bundle_src), "--backend", "ort-cpu",
                    "--top-k", "2", "--out", str(out)])
    assert code == 1  # the run goes on past the broken file, and its exit code says one picture failed
    recs = {Path(r["source"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(recs) == ["a.png", "b.jpg", "broken.jpg", "c.bmp"]
    bad = recs["broken.jpg"]
    assert "cannot decode image" in bad["error"] and "top_k" not in bad
    assert bad["model_version"] == bundle.manifest.bundle_id
    for path, _ in images.items():
        rec = recs[path.name]
        with Image.open(path) as img:  # what was written to disk (JPEG is lossy)
            logits = reference(bundle.preprocessor(img.convert("RGB"))[None])[0]
        probs = softmax(logits[None])[0]
        assert [p["index"] for p in rec["top_k"]] == list(np.argsort(-probs)[:2])
        assert rec["top_k"][0]["label"] == bundle.labels[int(np.argmax(probs))]
        assert rec["top_k"][0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert rec["frame"] is None and rec["latency_ms"] >= rec["infer_ms"] > 0
        assert rec["timestamp"].endswith("Z") and rec["model_version"] == bundle.manifest.bundle_id


def write_video(path: Path, frames: int = 10, size=(32, 24)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened()
    rng = np.random.default_rng(7)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()
    return path


def decoded_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def test_video_every_n(tmp_path, bundle, reference):
    video = write_video(tmp_path / "clip.avi")
    frames = decoded_frames(video)
    assert len(frames) == 10
    buf = io.StringIO()
    summary = run_infer(str(video), bundle=bundle.root, backend="ort-cpu", k=1, every=3, out=buf)
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert (summary.classified, summary.errors) == (4, 0)
    assert [r["frame"] for r in recs] == [0, 3, 6, 9]
    for rec in recs:
        logits = reference(bundle.preprocessor.from_bgr(frames[rec["frame"]])[None])[0]
        assert rec["top_k"][0]["index"] == int(np.argmax(logits)) and rec["source"] == str(video)


def test_lost_stream_reconnects_with_backoff_then_gives_up(tmp_path):
    """The "camera" is a video file read as a live source: each end of file is a lost stream. After the second
    drop the file disappears, so reopening fails with growing delays until the attempts run out."""
    video = write_video(tmp_path / "cam.avi", frames=4)
    delays: list[float] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 2:
            video.unlink()

    src = VideoSource(str(video), live=True, max_reconnects=3, backoff=0.25, sleep=sleep)
    items = []
    with pytest.raises(EdgeTLError, match="3 reconnect attempt"):
        for item in src.frames():
            items.append(item)
    frames = [i.frame for i in items if i.error is None]
    errors = [i.error for i in items if i.error is not None]
    assert frames == list(range(8))  # two connections of 4 frames; indices keep counting across reconnects
    assert delays == [0.25, 0.25, 0.5, 1.0]  # a good frame resets the back-off; failures in a row double it
    assert len(errors) == 4 and all("stream lost; reconnecting" in e for e in errors)
    assert "attempt 3/3" in errors[-1]


def test_unopenable_live_source_backs_off_exponentially(tmp_path):
    delays: list[float] = []
    src = VideoSource(str(tmp_path / "gone.avi"), live=True, max_reconnects=4, backoff=0.5, max_backoff=2.0,
                      sleep=delays.append)
    with pytest.raises(EdgeTLError, match="lost"):
        list(src.frames())
    assert delays == [0.5, 1.0, 2.0, 2.0]


def test_parse_source_kinds(tmp_path):
    rand_image(0).save(tmp_path / "x.png")
    rand_image(1).save(tmp_path / "y.png")
    assert parse_source("0").kind == "camera" and parse_source("0").target == 0
    assert parse_source("rtsp://10.0.0.5:554/stream").kind == "stream"
    pipe = "nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280 ! nvvidconv ! appsink"
    assert parse_source(pipe).kind == "gstreamer"
    globbed = parse_source(str(tmp_path / "*.png"))
    assert globbed.kind == "images" and [p.name for p in globbed.files] == ["x.png", "y.png"]
    assert parse_source(str(tmp_path / "x.png")).files == (tmp_path / "x.png",)
    for bad, needle in (("/dev/video99", "does not exist"), (str(tmp_path / "none.png"), "no file"),
                        (str(tmp_path / "*.jpg"), "matches no files"), ("", "empty")):
        with pytest.raises(EdgeTLError, match=needle):
            parse_source(bad)
    with pytest.raises(EdgeTLError, match="--every"):
        list(open_source(str(tmp_path / "x.png"), every=0))
    if "GStreamer:                   NO" in cv2.getBuildInformation():
        with pytest.raises(EdgeTLError, match="without GStreamer"):
            list(open_source(pipe))


def test_infer_from_deployed_root_and_cli_errors(tmp_path, tiny_bundle_src, bundle, capsys):
    root = tmp_path / "root"
    layout = DeviceLayout(root)
    layout.version_dir(bundle.manifest.bundle_id).mkdir(parents=True)
    os.symlink(tiny_bundle_src, layout.bundle_dir(bundle.manifest.bundle_id))
    os.symlink(f"versions/{bundle.manifest.bundle_id}", layout.active_link)
    rand_image(4).save(tmp_path / "one.png")
    assert run_cli(["infer", str(tmp_path / "one.png"), "--root", str(root), "--backend", "ort-cpu", "-k", "4"]) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["model_version"] == bundle.manifest.bundle_id and len(rec["top_k"]) == 4
    assert sum(p["score"] for p in rec["top_k"]) == pytest.approx(1.0, abs=1e-4)
    assert run_cli(["infer", str(tmp_path / "missing.png"), "--bundle", str(tiny_bundle_src)]) == 2
    assert "no file, folder" in capsys.readouterr().err
    assert run_cli(["infer", str(tmp_path / "one.png")]) == 2
    assert "exactly one of --bundle and --root" in capsys.readouterr().err


def test_topk_and_classifier_batch(bundle, reference):
    probs = softmax(np.array([[1.0, 3.0, 2.0, -1.0]]))[0]
    assert probs.sum() == pytest.approx(1.0) and [p["index"] for p in top_k(probs, bundle.labels, 3)] == [1, 2, 0]
    assert len(top_k(probs, bundle.labels, 99)) == 4
    clf = Classifier.load(bundle, "ort-cpu")
    try:
        imgs = [rand_image(s) for s in range(3)]
        got = clf.classify(imgs, k=1)
        want = reference(bundle.preprocessor.batch(imgs)).argmax(axis=1)
        assert [g[0]["index"] for g in got] == list(want)
    finally:
        clf.close()


def test_out_that_is_one_of_the_inputs_is_refused(tmp_path, tiny_bundle_src, capsys):
    """Issue 24: `infer pics/ --out pics/a.png` would overwrite a picture with JSON lines."""
    folder = tmp_path / "pics"
    folder.mkdir()
    rand_image(1).save(folder / "a.png")
    before = (folder / "a.png").read_bytes()
    code = run_cli(["infer", str(folder), "--bundle", str(tiny_bundle_src), "--backend", "ort-cpu",
                    "--out", str(folder / "a.png")])
    assert code == 2 and "is one of the images to classify" in capsys.readouterr().err
    assert (folder / "a.png").read_bytes() == before


# -- issue 24 item 4: sources that read like something else ------------------------------------------------------
def test_an_existing_file_named_like_a_camera_or_a_pipeline_is_that_file(tmp_path, monkeypatch, bundle):
    monkeypatch.chdir(tmp_path)
    for name in ("7", "wow!.png"):
        rand_image(3).save(tmp_path / name, format="PNG")
        spec = parse_source(name)
        assert spec.kind == "images" and spec.files == (Path(name),)
        buf = io.StringIO()
        summary = run_infer(name, bundle=bundle.root, backend="ort-cpu", k=1, out=buf)
        assert (summary.classified, summary.errors) == (1, 0) and json.loads(buf.getvalue())["source"] == name
    assert parse_source("8").kind == "camera"  # no such file: still a camera index


def test_a_video_without_frames_is_an_error(tmp_path, tiny_bundle_src, bundle, capsys):
    empty = write_video(tmp_path / "empty.avi", frames=0)  # a real container, header only
    buf = io.StringIO()
    summary = run_infer(str(empty), bundle=bundle.root, backend="ort-cpu", k=1, out=buf)
    assert (summary.classified, summary.errors) == (0, 1)
    rec = json.loads(buf.getvalue())
    assert "no frames" in rec["error"] or "cannot open" in rec["error"]
    code = run_cli(["infer", str(empty), "--bundle", str(tiny_bundle_src), "--backend", "ort-cpu"])
    assert code != 0


def test_an_http_url_serving_a_still_image_is_classified_once(tmp_path, bundle, reference):
    """Before, OpenCV read the picture as a live stream that ended and infer reopened it with back-off until its
    reconnect attempts ran out. A real HTTP server serves the PNG (and a page that is not an image)."""
    import http.server
    import threading

    png = io.BytesIO()
    img = rand_image(5)
    img.save(png, "PNG")
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            hits.append(self.path)
            body, kind = (png.getvalue(), "image/png") if self.path == "/snap.png" else (b"<html/>", "text/html")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/snap.png"
        buf = io.StringIO()
        summary = run_infer(url, bundle=bundle.root, backend="ort-cpu", k=1, out=buf)
        recs = [json.loads(line) for line in buf.getvalue().splitlines()]
        assert (summary.classified, summary.errors) == (1, 0) and len(recs) == 1 and hits == ["/snap.png"]
        logits = reference(bundle.preprocessor(img)[None])[0]
        assert recs[0]["source"] == url and recs[0]["top_k"][0]["index"] == int(np.argmax(logits))
    finally:
        srv.shutdown()
