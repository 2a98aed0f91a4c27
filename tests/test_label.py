"""`edge-tl label DIR` (issue 25 item 5): the page driven by keyboard in a real browser (Debian's chromium through
Selenium and chromedriver), the class folders and labels.log.jsonl checked on disk, resume, undo, and the refusals
through the CLI's error boundary."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_tl.device.capture import CapturePolicy, Capturer
from edge_tl.workstation.label import LOG_NAME, LabelServer, LabelSession

CLASSES = ["circle", "square", "triangle", "cross"]  # the tiny bundle's (tests/bundle_factory.py)
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ODD = "odd name #1 ü'<b>&%20.png"


def _png(seed: int, size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]


@pytest.fixture
def captures(tmp_path) -> Path:
    """Two real captures (image + sidecar with top-k, edge_tl.device.capture), a truncated PNG, a plain picture
    with an odd name, the same picture again under another name, and a plain picture without a sidecar."""
    folder = tmp_path / "field"
    cap = Capturer(folder, CapturePolicy(random_rate=0.0, max_per_minute=100), "b" * 16, CLASSES)
    assert cap.consider(np.array([0.1, 0.5, 0.3, 0.1]), source="cam:0", data=_png(0)) == "low-score"  # square
    assert cap.consider(np.array([0.1, 0.2, 0.55, 0.15]), source="cam:1", data=_png(1)) == "low-score"  # triangle
    whole = _png(2)
    (folder / "broken.png").write_bytes(whole[: len(whole) // 2])
    (folder / ODD).write_bytes(_png(3))
    (folder / "same-again.png").write_bytes(_png(3))  # sorts after ODD: shown once, as ODD
    (folder / "zz-plain.png").write_bytes(_png(4))
    return folder


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary or not CHROMEDRIVER.is_file():
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):
        opts.add_argument(arg)
    # an explicit chromedriver: selenium-manager never looks for one on the network
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)


@pytest.fixture
def served(captures, tmp_path, bundle):
    """A label server on a free port over ``captures``, suggesting with the tiny bundle's model (through the
    device's classifier, as the CLI wires it) for the pictures without a sidecar."""
    from edge_tl.device.infer import Classifier

    clf = Classifier.load(bundle, "ort-cpu")
    session = LabelSession(captures, tmp_path / "labelled", bundle.labels,
                           suggest=lambda img: clf.classify([img], k=3)[0], bundle_id=bundle.manifest.bundle_id)
    server = LabelServer(session)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the label server did not start"
        time.sleep(0.02)
    yield session, server.url
    server.stop()
    thread.join(10)
    clf.close()


def test_label_in_a_browser_by_keyboard(served, captures, bundle):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    session, url = served
    out = session.out
    before = _snapshot(captures)
    side = sorted(captures.glob("*.json"))
    cap0, cap1 = (captures / json.loads(p.read_text())["image"] for p in side)
    assert url.startswith("http://127.0.0.1:")
    driver = _chrome()
    try:
        driver.get(url)
        body = driver.find_element(By.TAG_NAME, "body")
        wait = WebDriverWait(driver, 10)

        def showing(name: str) -> None:
            wait.until(lambda d: d.find_element(By.ID, "file").text == name)

        def decided(n: int) -> None:
            wait.until(lambda d: body.get_attribute("data-decided") == str(n))

        showing(cap0.name)
        assert driver.find_element(By.ID, "progress").text == "0 / 5 decided, 5 left"
        assert "suggestion: square (50.0%) from the sidecar (bundle bbbbbbbbbbbbbbbb)" in \
            driver.find_element(By.ID, "suggestion").text
        wait.until(lambda d: d.execute_script("return document.getElementById('img').naturalWidth") > 0)
        body.send_keys(Keys.ENTER)  # accept: square
        decided(1)
        showing(cap1.name)
        assert "suggestion: triangle" in driver.find_element(By.ID, "suggestion").text
        body.send_keys("2")  # correct: the second class, square
        decided(2)
        assert (out / "square" / f"{_sha(cap1.read_bytes())[:16]}.png").is_file()
        body.send_keys("u")  # undo: its copy goes, it is shown again
        decided(1)
        showing(cap1.name)
        assert not (out / "square" / f"{_sha(cap1.read_bytes())[:16]}.png").exists()
        body.send_keys("3")  # correct: triangle (the suggestion, picked by number)
        decided(2)
        showing("broken.png")
        assert "cannot decode image" in driver.find_element(By.ID, "error").text
        assert driver.find_element(By.ID, "accept").get_attribute("disabled") is not None
        body.send_keys(Keys.ENTER)  # nothing to accept: ignored
        body.send_keys("1")  # nor can it be corrected
        body.send_keys("s")  # skip
        decided(3)
        showing(ODD)  # the odd name is text, not markup
        model_top = session.state()["current"]
        assert model_top["suggested_by"] == f"model (bundle {bundle.manifest.bundle_id})"
        body.send_keys("a")  # accept the model's suggestion
        decided(4)
        showing("zz-plain.png")  # same-again.png has ODD's bytes: not shown twice
        driver.find_element(By.CSS_SELECTOR, "#classes button[data-cls='cross']").click()  # the buttons work too
        decided(5)
        wait.until(lambda d: d.find_element(By.ID, "done").is_displayed())
        counts = {c: int(c in ("square", "triangle", "cross")) + int(c == model_top["suggestion"]) for c in CLASSES}
        summary = ", ".join(f"{c}: {n}" for c, n in counts.items()) + ", skipped: 1"
        assert summary in driver.find_element(By.ID, "done").text
        assert driver.find_element(By.ID, "progress").text == "5 / 5 decided, 0 left"
    finally:
        driver.quit()

    assert _snapshot(captures) == before  # DIR is only read
    rows = _log(out)
    assert [(r["file"], r["decision"], r["label"]) for r in rows] == [
        (cap0.name, "accept", "square"), (cap1.name, "correct", "square"), (cap1.name, "undo", "square"),
        (cap1.name, "correct", "triangle"), ("broken.png", "skip", None), (ODD, "accept", model_top["suggestion"]),
        ("zz-plain.png", "correct", "cross")]
    assert rows[0]["suggestion"] == "square" and rows[0]["score"] == 0.5 and rows[0]["bundle_id"] == "b" * 16
    assert rows[3]["suggestion"] == "triangle" and rows[3]["score"] == 0.55
    assert rows[5]["suggestion"] == model_top["suggestion"] and rows[5]["bundle_id"] == bundle.manifest.bundle_id
    assert rows[5]["score"] == pytest.approx(model_top["score"])
    assert rows[6]["suggestion"] is not None and rows[6]["bundle_id"] == bundle.manifest.bundle_id
    sources = {cap0.name: cap0, cap1.name: cap1, "broken.png": captures / "broken.png", ODD: captures / ODD,
               "zz-plain.png": captures / "zz-plain.png"}
    copies = {}
    for r in rows:
        assert r["sha256"] == _sha(sources[r["file"]].read_bytes())
        assert r["time"].endswith("Z")
    for r in (rows[0], rows[3], rows[5], rows[6]):
        copy = out / r["copy"]
        assert copy == out / r["label"] / f"{r['sha256'][:16]}.png"
        assert copy.read_bytes() == sources[r["file"]].read_bytes()  # a copy of the bytes, never re-encoded
        copies[str(copy.relative_to(out))] = r
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(copies) | {LOG_NAME}  # nothing else: no temporary files, the undone copy gone


def test_resume_and_undo_across_runs(captures, tmp_path, capsys):
    out = tmp_path / "labelled"
    first = LabelSession(captures, out, CLASSES)
    assert len(first.order) == 5 and first.state()["current"]["suggestion"] == "square"
    sha0 = first.current()
    first.decide(sha0, "accept")
    sha1 = first.current()
    first.decide(sha1, "correct", "cross")
    copy1 = out / "cross" / f"{sha1[:16]}.png"
    assert copy1.is_file()
    # a crash cut the last line short: that line is left out, the rest counts
    with open(out / LOG_NAME, "a") as f:
        f.write('{"file": "x", "sha2')

    second = LabelSession(captures, out, CLASSES)
    assert second.pending == first.order[2:] and second.current() == first.order[2]
    st = second.undo()  # the first run's last decision
    assert st["current"]["sha256"] == sha1 and not copy1.exists() and st["decided"] == 1
    for sha in list(second.pending):
        second.decide(sha, "skip")
    assert second.state()["current"] is None and second.state()["remaining"] == 0

    from edge_tl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["label", str(captures), "--out", str(out), "--classes", ",".join(CLASSES), "--no-open"])
    assert exit_info.value.code == 0
    assert "nothing left to label: the 5 picture(s)" in capsys.readouterr().err


def test_a_wrong_decision_is_refused_and_leaves_no_trace(captures, tmp_path):
    from edge_tl.core.errors import EdgeTLError

    out = tmp_path / "labelled"
    s = LabelSession(captures, out, ["cat", "dog"])  # the sidecars' classes are not these: nothing to accept
    cur = s.current()
    with pytest.raises(EdgeTLError, match="no suggestion among the classes"):
        s.decide(cur, "accept")
    with pytest.raises(EdgeTLError, match="not one of the classes"):
        s.decide(cur, "correct", "square")
    with pytest.raises(EdgeTLError, match="not the one to label now"):
        s.decide(s.order[-1], "skip")
    with pytest.raises(EdgeTLError, match="nothing to undo"):
        s.undo()
    assert list(out.iterdir()) == []


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    from edge_tl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["label", *argv, "--no-open"])
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("case, expected", [
    ("inside", "error: --out {dir}/labelled is inside {dir}; write the labelled copies outside"),
    ("foreign", "error: --out {tmp}/other is not empty and was not made by edge-tl label (it has no labels.log.jsonl)"),
    ("no-classes", "error: no classes to label with; give --bundle B (its classes), --run RUN or --classes a,b,c"),
    ("bad-class", "error: the class 'a/b' can't be a folder of LABELLED"),
    ("twice", "error: a class is named twice (a, b, a)"),
    ("empty", "error: {tmp}/empty holds no images (.jpg, .jpeg, .png"),
    ("missing", "error: {tmp}/nope is not a folder"),
])
def test_refusals_are_one_line(case, expected, captures, tmp_path, capsys):
    before = _snapshot(captures)
    src, out, classes = captures, tmp_path / "labelled", ["--classes", "a,b"]
    if case == "inside":
        out = captures / "labelled"
    elif case == "foreign":
        out = tmp_path / "other"
        out.mkdir()
        (out / "keep.txt").write_text("someone's")
    elif case == "no-classes":
        classes = []
    elif case == "bad-class":
        classes = ["--classes", "a/b,c"]
    elif case == "twice":
        classes = ["--classes", "a,b,a"]
    elif case == "empty":
        src = tmp_path / "empty"
        (src / "sub").mkdir(parents=True)
        (src / "notes.txt").write_text("no pictures")
    elif case == "missing":
        src = tmp_path / "nope"
    code, lines = _cli(capsys, str(src), "--out", str(out), *classes)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(expected.format(dir=captures, tmp=tmp_path)), lines
    assert _snapshot(captures) == before
    if case == "foreign":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_serves_with_the_bundles_suggestions(captures, tmp_path, tiny_bundle_src):
    """The real command: --bundle gives the classes and the model's suggestions; it prints the address it listens
    on (port 0: a free one), answers there, and stops on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    for p in captures.glob("*.json"):  # no sidecars: every suggestion is the model's
        p.unlink()
    exe = str(Path(sys.executable).with_name("edge-tl"))
    proc = subprocess.Popen([exe, "label", str(captures), "--out", str(tmp_path / "labelled"), "--bundle",
                             str(tiny_bundle_src), "--backend", "ort-cpu", "--no-open"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "250"})
    try:
        line = proc.stderr.readline()
        assert line.startswith("labelling 5 of 5 picture(s) at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "api/state", timeout=10) as r:
            st = json.loads(r.read())
        assert st["classes"] == CLASSES and st["current"]["suggested_by"].startswith("model (bundle ")
        assert st["current"]["suggestion"] in CLASSES
        with urllib.request.urlopen(url, timeout=10) as r:
            assert b"edge-tl label" in r.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=20)
    assert proc.returncode == 143, rest
    assert "Traceback" not in rest


def test_an_explanation_map_is_drawn_over_the_picture(captures, tmp_path):
    """The page's Grad-CAM slot: a map for the suggested class, drawn over the preview (the CLI has no --run yet;
    the library takes any ``explain(image, class_index)``)."""
    from edge_tl.workstation.label import PREVIEW_PX

    asked = []

    def explain(image, index):
        asked.append((image.size, index))
        return np.outer(np.linspace(0, 1, 5), np.ones(5))

    s = LabelSession(captures, tmp_path / "labelled", CLASSES, explain=explain)
    cur = s.state()["current"]
    assert cur["cam"] is True and asked == [((20, 20), CLASSES.index("square"))]
    with Image.open(io.BytesIO(s.cam(cur["sha256"]))) as img:
        assert img.size == (PREVIEW_PX, PREVIEW_PX)
        top, bottom = np.asarray(img.convert("RGB"))[[0, -1]].mean(axis=1)
    assert bottom[0] > top[0] and top[2] > bottom[2]  # hot (red) where the map is 1, cold (blue) where it is 0
    with Image.open(io.BytesIO(s.preview(cur["sha256"]))) as img:
        assert img.size == (PREVIEW_PX, PREVIEW_PX)
