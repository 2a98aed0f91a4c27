"""Issue 22 item 4: a bundle whose training failed (the build's chance check: the model is no better than guessing)
is not deployed as if it had not. deploy/fleet refuse it unless forced, the device refuses it on its own, doctor
blocks on it, infer warns, serve logs it and says so in the model's metadata. A real bundle (the tiny factory's),
the real CLI, a real sshd."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import make_tiny_bundle
from PIL import Image

from edge_tl.core.bundle import Bundle, StageMetrics, refuse_failed_training
from edge_tl.core.errors import EdgeTLError

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))

#: as edge_tl.workstation.stats.chance_check records it
FAILED = {"passed": False, "val_top1": 0.2, "val_correct": 4, "val_images": 20, "chance": 0.25, "baseline": 0.25,
          "p_value": 0.81, "alpha": 0.05, "picked_from_epochs": 8, "level": 0.00625, "method": "binomial"}
PASSED = {**FAILED, "passed": True, "val_top1": 0.9, "p_value": 1e-9}


@pytest.fixture(scope="module")
def failed_bundle(tmp_path_factory) -> Path:
    stages = {"finetune": StageMetrics(top1=0.9, chance_check=PASSED),
              "prune": StageMetrics(top1=0.25, chance_check=FAILED), "quantize": StageMetrics(top1=0.25)}
    return make_tiny_bundle(tmp_path_factory.mktemp("failed") / "tiny-failed", name="tiny-failed", seed=5,
                            stages=stages)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EDGE_TL, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_the_manifest_says_which_stage_failed(failed_bundle, tiny_bundle_src):
    m = Bundle.open(failed_bundle).manifest
    assert m.training_problems() == ["prune: validation top-1 20.0% is no better than guessing (25.0%, p = 0.81)"]
    assert m.summary()["training_failed"] is True
    assert Bundle.open(tiny_bundle_src).manifest.training_problems() == []  # nothing recorded: nothing claimed
    with pytest.raises(EdgeTLError, match="training failed") as exc:
        refuse_failed_training(m, allow=False)
    assert "--allow-failed-training" in exc.value.fix
    assert refuse_failed_training(m, allow=True).startswith("WARNING:")
    # a pruned model that recovered ships even where the fine-tuned one failed: the shipped model decides
    ok = m.model_copy(update={"stages": {"finetune": StageMetrics(chance_check=FAILED),
                                         "prune": StageMetrics(chance_check=PASSED)}})
    assert ok.training_problems() == []


def test_doctor_blocks_and_infer_warns(failed_bundle, tmp_path):
    doctor = run("doctor", str(failed_bundle), "--json")
    assert doctor.returncode == 3, doctor.stderr
    rows = {r["item"]: r for r in json.loads(doctor.stdout)["checks"]}
    assert rows["training"]["status"] == "blocker" and "no better than guessing" in rows["training"]["value"]
    img = tmp_path / "red.png"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(img)
    infer = run("infer", str(img), "--bundle", str(failed_bundle), "--backend", "ort-cpu")
    assert infer.returncode == 0, infer.stderr
    assert "WARNING: this bundle's training failed" in infer.stderr and json.loads(infer.stdout)["top_k"]


def test_serve_logs_it_and_its_metadata_says_so(failed_bundle, caplog):
    from starlette.requests import Request

    from edge_tl.device.serve.app import ServeHandlers, start_manager
    from edge_tl.device.serve.config import ServeConfig
    from edge_tl.device.serve.metrics import Metrics

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def main():
        metrics = Metrics()
        handlers = ServeHandlers(ServeConfig(bundle=failed_bundle, token=None), metrics,
                                 start_manager(ServeConfig(bundle=failed_bundle, token=None), metrics))
        try:
            scope = {"type": "http", "method": "GET", "path": "/v2/models/tiny-failed", "query_string": b"",
                     "path_params": {"name": "tiny-failed"}, "headers": []}
            return json.loads((await handlers.model_metadata(Request(scope, receive))).body)
        finally:
            await handlers.manager.aclose()
            handlers.parse_pool.shutdown(wait=True)

    caplog.set_level("WARNING")
    meta = asyncio.run(main())
    assert meta["parameters"]["training_failed"] is True and "prune" in meta["parameters"]["training_problems"][0]
    assert any("training failed" in r.getMessage() for r in caplog.records)


@pytest.mark.ssh
def test_deploy_refuses_it_unless_forced_and_the_device_refuses_it_too(failed_bundle, tmp_path):
    from sshd_helper import SshdUnavailable, start_sshd

    from edge_tl.device.deploy.device import install, prepare

    try:
        server = start_sshd(tmp_path / "sshd")
    except SshdUnavailable as exc:
        pytest.skip(str(exc))
    common = ["--to", server.to, "--identity", str(server.key), "--known-hosts", str(server.known_hosts),
              "--remote-edge-tl", EDGE_TL, "--no-restart"]
    try:
        root = tmp_path / "dev"
        refused = run("deploy", "push", str(failed_bundle), "--root", str(root), *common)
        assert refused.returncode == 2 and "training failed" in refused.stderr, refused.stderr
        assert "--allow-failed-training" in refused.stderr and "Traceback" not in refused.stderr
        assert not (root / "active").exists() and not list(root.glob("uploads/*"))  # nothing was sent
        forced = run("deploy", "push", str(failed_bundle), "--root", str(root), *common, "--allow-failed-training")
        assert forced.returncode == 0, forced.stderr
        assert "WARNING" in forced.stderr and "deployed anyway" in forced.stdout + forced.stderr
    finally:
        server.stop()
    # the device half refuses on its own (deploy device install, as Ansible runs it), and leaves nothing behind
    other = tmp_path / "dev2"
    uploads = Path(prepare(other)["uploads"])
    upload = uploads / "x.tar.gz"
    upload.write_bytes(failed_bundle.with_name("tiny-failed.tar.gz").read_bytes())
    with pytest.raises(EdgeTLError, match="training failed"):
        install(other, upload)
    assert not (other / "active").exists() and not [p for p in (other / "versions").iterdir()]


def test_fleet_refuses_it_before_any_host_is_touched(failed_bundle, tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  hosts:\n    jetson-1:\n      ansible_host: 127.0.0.1\n      ansible_port: 9\n")
    proc = run("fleet", "deploy", str(failed_bundle), "--inventory", str(inventory))
    assert proc.returncode == 2 and "training failed" in proc.stderr and "--allow-failed-training" in proc.stderr
    assert "Traceback" not in proc.stderr and "jetson-1" not in proc.stdout
