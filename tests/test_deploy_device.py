"""The device half of deploy on its own (no SSH): lock, atomic switch, pruning, leftovers, gate planning, the
service health check with a real HTTP server, and the TensorRT path through a fake `edge-tl` that follows the
engine CLI's contract (TensorRT can't run here)."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_tl.core.bundle import Bundle
from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.layout import DeviceLayout
from edge_tl.device.deploy import device, gate, service, state
from edge_tl.workstation.ship.transport import SSHTarget

IDS = [f"{i:016x}" for i in range(1, 6)]


def fake_version(layout: DeviceLayout, version: str, src: Path, installed_at: str, status: str = "installed") -> None:
    shutil.copytree(src, layout.bundle_dir(version))
    state.update_record(layout, version, bundle_id=version, name="tiny", installed_at=installed_at, status=status)


def test_ssh_target_parse():
    assert SSHTarget.parse("nvidia@orin.local") == SSHTarget("nvidia", "orin.local", 22)
    t = SSHTarget.parse("me@10.0.0.7:2222")
    assert (t.user, t.host, t.port, t.known_hosts_name, str(t)) == ("me", "10.0.0.7", 2222, "[10.0.0.7]:2222",
                                                                     "me@10.0.0.7:2222")
    assert SSHTarget.parse("u@[fe80::1]:2200").host == "fe80::1"
    for bad in ("", "a@b@c", "u@host:99999", "u@host:port"):
        with pytest.raises(EdgeTLError, match="is not an SSH target"):
            SSHTarget.parse(bad)


def test_switch_is_a_relative_symlink_replaced_by_rename(tmp_path, tiny_bundle_src):
    layout = DeviceLayout(tmp_path / "root")
    for v in IDS[:2]:
        fake_version(layout, v, tiny_bundle_src, "2026-01-01T00:00:00Z")
    state.switch(layout, IDS[0])
    assert os.readlink(layout.active_link) == f"versions/{IDS[0]}"
    inode = os.lstat(layout.active_link).st_ino
    state.switch(layout, IDS[1])
    assert os.readlink(layout.active_link) == f"versions/{IDS[1]}" and os.lstat(layout.active_link).st_ino != inode
    assert Bundle.open(layout.active_link / "bundle").manifest.name == "tiny"
    assert [p.name for p in layout.root.iterdir() if p.name.startswith(".active")] == []
    with pytest.raises(EdgeTLError, match="not installed"):
        state.switch(layout, IDS[4])
    state.switch(layout, None)
    assert layout.active_version() is None


def test_prune_keeps_newest_and_never_active_or_previous(tmp_path, tiny_bundle_src):
    layout = DeviceLayout(tmp_path / "root")
    for i, v in enumerate(IDS):
        fake_version(layout, v, tiny_bundle_src, f"2026-01-0{i + 1}T00:00:00Z")
    # activated in the order 4, 0, 1 (so 1 is active, 0 previous); 2 and 3 were installed but never activated
    for v in (IDS[4], IDS[0], IDS[1]):
        state.activate(layout, v)
    assert state.previous_version(layout) == IDS[0]
    removed = state.prune(layout, keep=1)
    assert set(state.installed_versions(layout)) == {IDS[1], IDS[0]}  # keep 1 still keeps active + previous
    assert set(removed) == {IDS[2], IDS[3], IDS[4]}
    assert state.read_stack(layout) == [IDS[0], IDS[1]]


def test_prune_order(tmp_path, tiny_bundle_src):
    layout = DeviceLayout(tmp_path / "root")
    for i, v in enumerate(IDS):
        fake_version(layout, v, tiny_bundle_src, f"2026-01-0{i + 1}T00:00:00Z")
        state.activate(layout, v)
    assert state.prune(layout, keep=3) == [IDS[1], IDS[0]]
    assert set(state.installed_versions(layout)) == set(IDS[2:])


def test_lock_waits_then_fails_naming_the_holder(tmp_path):
    layout = DeviceLayout(tmp_path / "root")
    seen = []
    with state.deploy_lock(layout, 1, "install"):
        start = time.monotonic()
        with pytest.raises(EdgeTLError, match=rf"another deploy holds .*install by pid {os.getpid()}.*--lock-timeout"):
            with state.deploy_lock(layout, 0.3, "rollback", notify=seen.append):
                pass
        assert time.monotonic() - start >= 0.3
    assert seen and "waiting up to 0.3 s" in seen[0]
    with state.deploy_lock(layout, 0, "rollback"):  # free again
        assert json.loads(layout.lock_file.read_text())["what"] == "rollback"


def test_clean_leftovers(tmp_path, tiny_bundle_src):
    layout = DeviceLayout(tmp_path / "root")
    fake_version(layout, IDS[0], tiny_bundle_src, "2026-01-01T00:00:00Z")
    state.activate(layout, IDS[0])
    fake_version(layout, IDS[1], tiny_bundle_src, "2026-01-02T00:00:00Z", status="installing")  # killed mid-install
    (layout.versions_dir / ".staging-abc").mkdir()
    aside = layout.versions_dir / f".old-{IDS[2]}-123"  # a kept version moved aside for a reinstall, then killed
    shutil.copytree(tiny_bundle_src, aside / "bundle")
    state.clean_leftovers(layout)
    assert sorted(p.name for p in layout.versions_dir.iterdir()) == [IDS[0], IDS[2]]
    assert layout.active_version() == IDS[0]


def test_plan_gate():
    plan = gate.plan_gate("auto", "int8", "api", ["ort-cpu"])
    assert (plan.backend, plan.build_engine) == ("ort-cpu", False) and "ran on ort-cpu" in plan.notes[0]
    plan = gate.plan_gate("auto", "int8", "api", ["tensorrt", "ort-cuda", "ort-cpu"])
    assert (plan.backend, plan.build_engine, plan.notes) == ("tensorrt", True, [])
    plan = gate.plan_gate("auto", "int8", "trtexec", ["ort-cuda", "ort-cpu"])  # JetPack 5: engine via trtexec
    assert (plan.backend, plan.build_engine) == ("ort-cuda", True)
    with pytest.raises(EdgeTLError, match="--precision fp16 needs TensorRT"):
        gate.plan_gate("auto", "fp16", "api", ["ort-cpu"])
    with pytest.raises(EdgeTLError, match="--backend tensorrt was asked for"):
        gate.plan_gate("tensorrt", "int8", "api", ["ort-cpu"])
    with pytest.raises(EdgeTLError, match="ort-cuda is not available"):
        gate.plan_gate("ort-cuda", "int8", "api", ["ort-cpu"])


def test_damaged_upload_is_refused_and_deleted(tmp_path, tiny_bundle_src):
    upload = Path(device.prepare(tmp_path / "root")["uploads"]) / "up.tar.gz"  # an upload edge-tl made
    shutil.copy(tiny_bundle_src.with_name("tiny.tar.gz"), upload)
    with pytest.raises(CheckFailed, match="does not match its sha256 .damaged in transit"):
        device.install(tmp_path / "root", upload, sha256="0" * 64, svc=service.ServiceOptions(restart=False))
    assert not upload.exists() and DeviceLayout(tmp_path / "root").active_version() is None


FAKE_EDGE_TL = """#!{python}
# A stand-in for the device's edge-tl with TensorRT: follows the engine CLI's contract, logs its argv.
import json, sys, pathlib
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
opt = lambda name: args[args.index(name) + 1]
if args[:2] == ["engine", "build"]:
    cache = pathlib.Path(opt("--cache-dir")); cache.mkdir(parents=True, exist_ok=True)
    engine = cache / "model.int8-int8-0123456789abcdef.engine"
    engine.write_bytes(b"plan")
    side = {{"key": {{"tensorrt": "10.3"}}, "key_digest": "0123456789abcdef"}}
    (cache / (engine.name + ".json")).write_text(json.dumps(side))
    print("building..."); print(engine)
elif args[:2] == ["engine", "check"]:
    out = pathlib.Path(opt("--json"))
    out.write_text(json.dumps({{"passed": True, "precision": opt("--precision"), "backend": opt("--backend"),
                               "outputs": {{"logits": {{"count": 6, "top1_agreement": 1.0, "cosine_min": 0.999,
                                                       "max_rel_diff": 0.01}}}}}}))
    print("parity int8 on tensorrt passed")
"""


def test_tensorrt_path_builds_the_engine_then_gates_on_it(tmp_path, tiny_bundle_src, monkeypatch):
    log = tmp_path / "argv.log"
    fake = tmp_path / "edge-tl"
    fake.write_text(FAKE_EDGE_TL.format(python=sys.executable, log=str(log)))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(gate, "edge_tl_command", lambda: [str(fake)])
    monkeypatch.setattr(device, "available_backends", lambda: ["tensorrt", "ort-cpu"])
    upload = tmp_path / "up.tar.gz"
    shutil.copy(tiny_bundle_src.with_name("tiny.tar.gz"), upload)
    root = tmp_path / "root"
    res = device.install(root, upload, svc=service.ServiceOptions(restart=False))
    vid = res["bundle_id"]
    vdir = root / "versions" / vid
    build, check = [json.loads(line) for line in log.read_text().splitlines()]
    assert build == ["engine", "build", str(vdir / "bundle"), "--precision", "int8",
                     "--cache-dir", str(vdir / "engine")]
    assert check == ["engine", "check", str(vdir / "bundle"), "--backend", "tensorrt", "--precision", "int8",
                     "--json", str(vdir / "parity.json"), "--cache-dir", str(vdir / "engine"), "--no-build"]
    assert res["engine"]["key_digest"] == "0123456789abcdef"
    assert res["notes"] == []  # signed with the tests' key, which this "device" trusts (conftest)
    st = device.status(root)
    assert st["versions"][0]["engine_key"] == "0123456789abcdef"
    assert st["versions"][0]["gate_backend"] == "tensorrt"


class _Server(http.server.BaseHTTPRequestHandler):
    ready = 200
    versions: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/v2/health/ready":
            code, body = type(self).ready, b""
        elif self.path.startswith("/v2/models/") and type(self).versions:
            code, body = 200, json.dumps({"name": "tiny", "versions": type(self).versions}).encode()
        else:
            code, body = 404, b""
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Server.ready, _Server.versions = 200, []
    yield f"http://127.0.0.1:{server.server_port}/v2/health/ready"
    server.shutdown()


def test_wait_healthy(health_server):
    opts = service.ServiceOptions(health_url=health_server, health_timeout=0.3, poll_interval=0.05)
    assert service.wait_healthy(opts, "abc", "tiny")["reason"] == "ready (the server reports no model version)"
    _Server.versions = ["abc"]
    assert service.wait_healthy(opts, "abc", "tiny")["version_checked"] is True
    _Server.versions = ["old"]
    res = service.wait_healthy(opts, "abc", "tiny")
    assert not res["healthy"] and "serving version(s) old, not abc" in res["reason"]
    _Server.ready = 503
    assert "answered HTTP 503" in service.wait_healthy(opts, "abc", "tiny")["reason"]


def test_rollback_restarts_and_undoes_itself_when_unhealthy(tmp_path, tiny_bundle_src, health_server):
    layout = DeviceLayout(tmp_path / "root")
    for i, v in enumerate(IDS[:2]):
        fake_version(layout, v, tiny_bundle_src, f"2026-01-0{i + 1}T00:00:00Z")
        state.activate(layout, v)
    marker = tmp_path / "restarts"
    svc = service.ServiceOptions(restart_cmd=f"sh -c 'echo x >> {marker}'", health_url=health_server,
                                 health_timeout=0.3, poll_interval=0.05)
    _Server.ready = 503  # the previous version doesn't come up either: the rollback is undone
    with pytest.raises(CheckFailed, match=rf"did not become healthy on {IDS[0]}.*rolled back to {IDS[1]}"):
        device.rollback(layout.root, svc=svc)
    assert layout.active_version() == IDS[1] and marker.read_text() == "x\nx\n"
    assert state.read_stack(layout) == IDS[:2] and state.previous_version(layout) == IDS[0]
    _Server.ready, _Server.versions = 200, [IDS[0]]
    res = device.rollback(layout.root, svc=svc)
    assert (res["bundle_id"], res["previous"], res["service"]["version_checked"]) == (IDS[0], IDS[1], True)
    assert layout.active_version() == IDS[0] and state.read_record(layout, IDS[1])["status"] == "rolled-back"
    with pytest.raises(EdgeTLError, match="no previous version"):
        device.rollback(layout.root, svc=service.ServiceOptions(restart=False))
    res = device.rollback(layout.root, version=IDS[1], svc=service.ServiceOptions(restart=False))
    assert layout.active_version() == IDS[1] and res["service"]["note"] == "restart off"


BOOTSTRAP = Path(__file__).resolve().parents[1] / "deploy" / "bootstrap.sh"


@pytest.mark.parametrize("release, expect, refuse", [
    ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64",
     ["JetPack 6", "jp6/cu126", "venv --system-site-packages", "python3-libnvinfer", "[jetson,serve]"], []),
    ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64",
     ["jp6/cu122", "build-essential python3-dev"], ["cu126"]),
    ("# R36 (release), REVISION: 2.0, GCID: 35084178, BOARD: generic, EABI: aarch64",  # JetPack 6.0 DP, CUDA 12.2
     ["jp6/cu122"], ["cu126"]),
    ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64",
     ["JetPack 5", "python3.10 -m venv /opt/edge-tl/venv", "Jetson_Zoo", "install onnxruntime",
      "build-essential python3-dev python3.10-dev"],
     ["--system-site-packages", "python3-libnvinfer "]),
])
def test_bootstrap_dry_run_by_jetpack(tmp_path, release, expect, refuse):
    rel = tmp_path / "nv_tegra_release"
    rel.write_text(release + "\n")
    proc = subprocess.run(["bash", str(BOOTSTRAP), "--dry-run", "--nv-tegra-release", str(rel)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for text in expect:
        assert text in proc.stdout
    for text in refuse:
        assert text not in proc.stdout


def test_bootstrap_trusts_the_workstation_key(tmp_path):
    """--trust-key: the key goes to root's trust folder through edge-tl keys trust; a file that is no edge-tl key is
    refused before anything is installed; without it the script says that every bundle will be refused."""
    from edge_tl.core.signing import generate_key

    rel = tmp_path / "nv_tegra_release"
    rel.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    _, pub, _ = generate_key(tmp_path / "ws.key")
    run = [str(BOOTSTRAP), "--dry-run", "--nv-tegra-release", str(rel)]
    proc = subprocess.run(["bash", *run, "--trust-key", str(pub)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"keys trust {pub} --dir /etc/edge-tl/trusted-keys" in proc.stdout
    proc = subprocess.run(["bash", *run], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "every bundle is refused until one is" in proc.stdout
    (tmp_path / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3Nz me@host\n")
    proc = subprocess.run(["bash", *run, "--trust-key", str(tmp_path / "id_ed25519.pub")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "is not an edge-tl public key" in proc.stderr and proc.stdout == ""


def test_bootstrap_refuses_other_releases(tmp_path):
    rel = tmp_path / "nv_tegra_release"
    rel.write_text("# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref, EABI: aarch64\n")
    proc = subprocess.run(["bash", str(BOOTSTRAP), "--dry-run", "--nv-tegra-release", str(rel)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "L4T R32 is not supported" in proc.stderr
    proc = subprocess.run(["bash", str(BOOTSTRAP), "--dry-run", "--nv-tegra-release", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a Jetson" in proc.stderr


def test_device_half_runs_without_torch_and_paramiko(tmp_path, tiny_bundle_src):
    """The device half (CLI included) with torch, paramiko and TensorRT made unimportable, as on a Jetson."""
    upload = tmp_path / "up.tar.gz"
    shutil.copy(tiny_bundle_src.with_name("tiny.tar.gz"), upload)
    code = f"""
import importlib.abc, json, sys
BLOCKED = ("torch", "torchvision", "torch_pruning", "onnxslim", "sklearn", "paramiko", "tensorrt", "pycuda")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, Block())
from edge_tl.cli import main
for argv in (["install", "--upload", {str(upload)!r}, "--no-restart"], ["status"]):
    sys.argv = ["edge-tl", "deploy", "device", *argv, "--root", {str(tmp_path / "root")!r}]
    try:
        main()
    except SystemExit as exc:
        assert exc.code == 0, exc.code
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0])["status"] == "activated"
    assert json.loads(lines[1])["active"] == Bundle.open(tiny_bundle_src).manifest.bundle_id
    assert json.loads(lines[2]) == []


def test_an_upload_from_outside_the_root_is_never_deleted(tiny_bundle_src, tmp_path):
    """Issue 24: a failed local `deploy device install --upload runs/demo/bundle.tar.gz` deleted the build's own
    archive. Only uploads edge-tl made (in the root's upload folder) are consumed."""
    archive = tmp_path / "run" / "bundle.tar.gz"
    archive.parent.mkdir()
    shutil.copy(tiny_bundle_src.with_name("tiny.tar.gz"), archive)
    before = archive.read_bytes()
    with pytest.raises(CheckFailed, match="sha256"):  # a failed install (here: a wrong checksum given)
        device.install(tmp_path / "root", archive, sha256="0" * 64, svc=service.ServiceOptions(restart=False))
    assert archive.read_bytes() == before
    device.install(tmp_path / "root", archive, backend="ort-cpu", svc=service.ServiceOptions(restart=False))
    assert archive.read_bytes() == before  # and a successful one leaves it too


def test_a_root_edge_tl_did_not_make_is_refused(tiny_bundle_src, tmp_path):
    """Issue 24: deploy writes versions and links into --root and deletes old versions there; a folder with the
    user's files, or a system folder (a fleet's edge_tl_root of / or /etc), is refused before anything is written."""
    archive = tiny_bundle_src.with_name("tiny.tar.gz")
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    for root, why in ((home, "holds files that are not edge-tl's (thesis.tex)"), (Path("/etc"), "system folder"),
                      (Path("/"), "system folder"), (home / "thesis.tex", "is a file")):
        for call in (lambda r: device.prepare(r), lambda r: device.install(r, archive, backend="ort-cpu"),
                     lambda r: device.rollback(r)):
            with pytest.raises(EdgeTLError, match=f"--root {re.escape(str(root))} .*{re.escape(why)}"):
                call(root)
    assert sorted(p.name for p in home.iterdir()) == ["thesis.tex"]
    empty = tmp_path / "empty"
    empty.mkdir()
    device.install(empty, archive, backend="ort-cpu", svc=service.ServiceOptions(restart=False))  # empty: fine
    device.install(empty, archive, backend="ort-cpu", svc=service.ServiceOptions(restart=False))  # now ours
