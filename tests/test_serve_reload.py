"""Hot reload under load (a deploy flips the `active` link) and graceful shutdown on SIGTERM (a subprocess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from bundle_factory import make_tiny_bundle

from edge_tl.core.bundle import Bundle
from edge_tl.core.layout import DeviceLayout
from edge_tl.device.serve.config import ServeConfig
from edge_tl.device.serve.server import ThreadedServer


def deploy(root: Path, seed: int) -> str:
    """A bundle placed as edge-tl deploy does: <root>/versions/<bundle_id>/bundle."""
    staging = make_tiny_bundle(root / f"staging-{seed}", seed=seed, tarball=False)
    version = Bundle.open(staging).manifest.bundle_id
    layout = DeviceLayout(root)
    layout.version_dir(version).mkdir(parents=True)
    staging.rename(layout.bundle_dir(version))
    return version


def activate(root: Path, version: str) -> None:
    """Atomic switch: a new link renamed over `active`."""
    tmp = root / ".active.tmp"
    os.symlink(f"versions/{version}", tmp)
    os.replace(tmp, root / "active")


def reference(root: Path, version: str):
    sess = ort.InferenceSession(str(DeviceLayout(root).bundle_dir(version) / "model.int8.onnx"),
                                providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["logits"], {"input": x})[0]


def body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


@pytest.mark.parametrize("max_batch", [1, 4])
def test_model_switch_under_load_drops_nothing(tmp_path, max_batch):
    root = tmp_path / "root"
    a, b = deploy(root, 0), deploy(root, 1)
    assert a != b
    activate(root, a)
    ref = {a: reference(root, a), b: reference(root, b)}
    x = np.random.default_rng(2).normal(size=(1, 3, 16, 16)).astype(np.float32)
    expected = {v: f(x) for v, f in ref.items()}
    assert not np.allclose(expected[a], expected[b])
    cfg = ServeConfig(root=root, port=0, poll_s=0.05, max_batch=max_batch, max_delay_ms=2)
    seen: list[list[tuple[int, str, bool]]] = [[] for _ in range(4)]
    stop = threading.Event()

    with ThreadedServer(cfg) as srv:
        def client(i: int) -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    r = c.post(srv.url + "/v2/models/tiny/infer", json=body(x))
                    version = r.json().get("model_version", "?") if r.status_code == 200 else "?"
                    out = np.array(r.json()["outputs"][0]["data"], np.float32) if r.status_code == 200 else None
                    ok = out is not None and version in expected and np.allclose(out, expected[version].ravel(),
                                                                                  atol=1e-5)
                    seen[i].append((r.status_code, version, ok))
                    if r.status_code == 200:
                        assert r.headers["x-model-version"] == version

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        # every client has been answered by A before the deploy (a wait on events, not on the clock: a slow or
        # loaded machine must not turn this into a test of its speed)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(len(s) for s in seen) < 2:
            time.sleep(0.02)
        activate(root, b)  # the deploy
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(v == b for s in seen for _, v, _ in s[-3:]) < 8:
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
        metrics = httpx.get(srv.url + "/metrics").text

    records = [r for s in seen for r in s]
    assert len(records) > 20
    assert all(code == 200 for code, _, _ in records), {code for code, _, _ in records}
    assert all(ok for _, _, ok in records)  # each answer came from the model it names
    for s in seen:  # per client: A ... A then B ... B, never back
        versions = [v for _, v, _ in s]
        assert versions[0] == a and versions[-1] == b
        switch = versions.index(b)
        assert set(versions[:switch]) == {a} and set(versions[switch:]) == {b}
    assert 'edge_tl_model_reloads_total{result="ok"} 1.0' in metrics
    assert f'version="{b}"' in metrics and f'version="{a}"' not in metrics


def test_bad_deploy_keeps_serving_old_model(tmp_path):
    root = tmp_path / "root"
    a = deploy(root, 0)
    activate(root, a)
    broken = DeviceLayout(root).bundle_dir("broken")
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{}")
    with ThreadedServer(ServeConfig(root=root, port=0, poll_s=0.05)) as srv:
        activate(root, "broken")
        deadline = time.monotonic() + 10
        while "edge_tl_model_reloads_total{result=\"failed\"} 1.0" not in httpx.get(srv.url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(srv.url + "/v2/models/tiny/infer", json=body(np.zeros((1, 3, 16, 16), np.float32)))
        assert r.status_code == 200 and r.json()["model_version"] == a


def test_nothing_active_yet_then_deployed(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with ThreadedServer(ServeConfig(root=root, port=0, poll_s=0.05)) as srv:
        assert httpx.get(srv.url + "/v2/health/live").status_code == 200
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 400
        r = httpx.post(srv.url + "/v2/models/tiny/infer", json=body(np.zeros((1, 3, 16, 16), np.float32)))
        assert r.status_code == 503 and "no model" in r.json()["error"]
        a = deploy(root, 0)
        activate(root, a)
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(srv.url + "/v2/models/tiny").json()["versions"] == [a]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_in_flight_request(tiny_bundle_src):
    port = free_port()
    # a 1.5 s batching delay keeps a lone request in flight long enough to send SIGTERM meanwhile
    cmd = [sys.executable, "-c", "from edge_tl.cli import main; main()", "serve", str(tiny_bundle_src),
           "--port", str(port), "--max-batch", "8", "--max-delay-ms", "1500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        result: dict = {}

        def request() -> None:
            r = httpx.post(url + "/v2/models/tiny/infer", json=body(np.zeros((1, 3, 16, 16), np.float32)),
                           timeout=30)
            result["status"], result["json"] = r.status_code, r.json()

        t = threading.Thread(target=request)
        start = time.monotonic()
        t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        rc = proc.wait(30)
        log = proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert result["status"] == 200 and result["json"]["outputs"][0]["shape"] == [1, 4]
    assert time.monotonic() - start >= 1.4  # it really waited in the batcher across the SIGTERM
    # uvicorn re-raises the signal once shut down, so the exit is "terminated by SIGTERM" (clean for systemd)
    assert rc in (0, -signal.SIGTERM), log
    assert "model" in log and "unloaded" in log  # the shutdown hook ran after the request finished
