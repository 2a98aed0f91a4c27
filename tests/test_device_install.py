"""The device install for real: a virtual environment with the core and the device extras only
(`pip install -e '.[cpu,serve]'`, what a Jetson gets; `make test` builds it as .venv-device), where torch and the
rest of the training stack are not installed at all, not merely blocked (tests/test_no_torch.py blocks them in
this environment). The device commands run there end to end on a real bundle: doctor, engine check (the parity
gate on ONNX Runtime), bench, infer, serve; `edge-tl build` says in one line which extra it needs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

VENV = os.environ.get("EDGE_TL_DEVICE_VENV")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not VENV or not (ROOT / VENV / "bin" / "edge-tl").exists() and not (Path(VENV) / "bin" / "edge-tl").exists(),
    reason="no device environment: run `make test` (it builds .venv-device: the core and the cpu,serve extras, "
           "no torch) or set EDGE_TL_DEVICE_VENV to such a venv")


def _bin(name: str) -> str:
    venv = Path(VENV) if Path(VENV).is_absolute() else ROOT / VENV
    return str(venv / "bin" / name)


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["COLUMNS"] = "250"
    return subprocess.run([_bin("edge-tl"), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_the_training_stack_is_not_installed_there():
    code = ("import importlib.util as u, json, sys; "
            "print(json.dumps({m: u.find_spec(m) is not None for m in "
            "['torch', 'torchvision', 'torch_pruning', 'onnxslim', 'sklearn', 'onnxruntime', 'fastapi']})); "
            "print(sys.version_info[0] * 100 + sys.version_info[1])")
    proc = subprocess.run([_bin("python"), "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found_line, version = proc.stdout.strip().splitlines()
    assert int(version) >= 310  # the Jetson's Python on JetPack 6 is 3.10 (make test uses it where it exists)
    found = json.loads(found_line)
    assert found == {"torch": False, "torchvision": False, "torch_pruning": False, "onnxslim": False,
                     "sklearn": False, "onnxruntime": True, "fastapi": True}


def test_device_commands_run_without_torch(tmp_path, tiny_bundle_src):
    bundle = tiny_bundle_src.with_name(tiny_bundle_src.name + ".tar.gz")
    assert bundle.is_file()

    doctor = _run("doctor", str(bundle), "--json")
    assert doctor.returncode in (0, 3), doctor.stderr  # 3: blockers for TensorRT on a machine without a GPU
    assert "Traceback" not in doctor.stderr

    check_json = tmp_path / "parity.json"
    check = _run("engine", "check", str(bundle), "--backend", "ort-cpu", "--precision", "int8",
                 "--json", str(check_json))
    assert check.returncode == 0, check.stderr
    assert json.loads(check_json.read_text())["passed"] is True

    bench = _run("bench", "run", str(bundle), "--backend", "ort-cpu", "--iterations", "20", "--warmup", "2",
                 "--batch", "1", "--power", "none", "--idle-seconds", "0", "--no-plots", "--out", str(tmp_path / "b"))
    assert bench.returncode == 0, bench.stderr
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["results"][0]["iterations"] == 20 and result["results"][0]["latency_ms"]["median"] > 0

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(images / f"{i}.png")
    infer = _run("infer", str(images), "--bundle", str(bundle), "--backend", "ort-cpu")
    assert infer.returncode == 0, infer.stderr
    records = [json.loads(line) for line in infer.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 3 and all(r["top_k"][0]["label"] for r in records)

    build = _run("build", "--out", str(tmp_path / "run"))
    assert build.returncode == 2
    lines = [line for line in build.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "workstation" in lines[0], build.stderr
    assert not (tmp_path / "run").exists()


def test_serve_answers_without_torch(tiny_bundle_src):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.Popen([_bin("edge-tl"), "serve", str(tiny_bundle_src), "--port", str(port),
                             "--backend", "ort-cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                break
            time.sleep(0.2)
        assert ready, proc.stdout.read().decode() if proc.poll() is not None else "not ready in 120 s"
        x = np.zeros((1, 3, 16, 16), np.float32)
        r = httpx.post(url + "/v2/models/tiny/infer", timeout=30, json={"inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        assert np.isfinite(np.array(r.json()["outputs"][0]["data"], np.float32)).all()
    finally:
        proc.terminate()
        proc.wait(30)
