"""docs/serve.md's shell commands run as written (issue 23: its example posted to `/v2/models/demo/infer` with a
224-px shape while the demo serves `digits-demo` at 32 px). A bundle with the demo's name and input size is served
by a real `edge-tl serve`; every ``curl``/``python3`` line of the page's shell blocks runs in a shell, with only
the port changed, and must succeed with a JSON answer from the model the page names."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from bundle_factory import make_tiny_bundle
from PIL import Image

DOC = Path(__file__).resolve().parents[1] / "docs" / "serve.md"
EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))


def shell_lines() -> list[str]:
    """The commands of the page's unlabelled code blocks that talk to the server or prepare a request."""
    out, fence = [], None
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence == "" and line.startswith(("curl ", "python3 -c")):
            out.append(line)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    bundle = make_tiny_bundle(tmp_path_factory.mktemp("demo-like") / "b", name="digits-demo", size=32, tarball=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([EDGE_TL, "serve", str(bundle), "--port", str(port), "--backend", "ort-cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("edge-tl serve did not become ready")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_pages_commands_run_against_the_demo_model(served, tmp_path):
    lines = shell_lines()
    assert any("/v2/models/digits-demo/infer" in line for line in lines) and any("/classify" in line for line in lines)
    Image.new("RGB", (8, 8), (40, 40, 40)).save(tmp_path / "digit.png")
    for line in lines:
        cmd = line.replace("localhost:8000", f"localhost:{served}")
        proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        assert proc.returncode == 0, (line, proc.stderr)
        if line.startswith("curl "):
            answer = json.loads(proc.stdout)
            assert answer.get("model_name") == "digits-demo", (line, proc.stdout[:300])
            assert "outputs" in answer or "predictions" in answer, (line, proc.stdout[:300])
