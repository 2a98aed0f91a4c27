"""`edge-tl deploy` end to end against a real OpenSSH sshd on a loopback port (this machine is the "device").

One sshd per session, started by the tests themselves (throw-away host key, an authorized key, StrictModes no,
UsePAM no); the device half runs through this venv's edge-tl (``--remote-edge-tl``) and deploys into tmp roots.
Where sshd can't start, every test here is skipped with the reason.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_tiny_bundle, session_key
from sshd_helper import SshdServer, SshdUnavailable, start_sshd
from sshd_helper import free_port as _free_port

from edge_tl.core.bundle import MANIFEST, Bundle, write_bundle
from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.layout import DeviceLayout
from edge_tl.device.deploy import state
from edge_tl.device.deploy.service import ServiceOptions
from edge_tl.workstation.ship.client import RemoteDevice, prepare, push
from edge_tl.workstation.ship.transport import SSHSession, SSHTarget

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))
NO_RESTART = ServiceOptions(restart=False)


class Sshd(SshdServer):
    """The test sshd (tests/sshd_helper.py) with this module's ways in: paramiko sessions, the CLI."""

    def session(self, **kw) -> SSHSession:
        kw.setdefault("known_hosts", self.known_hosts)
        return SSHSession(SSHTarget.parse(self.to), identity=self.key, **kw)

    def device(self, root: Path, **kw) -> RemoteDevice:
        return RemoteDevice(self.session(**kw), str(root), EDGE_TL)

    def kill_connections(self) -> int:
        """SIGKILL every process under the sshd master (the sessions), leaving the master listening."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        todo, killed = list(children.get(self.proc.pid, [])), 0
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        return killed

    def cli(self, *args: str, root: Path) -> subprocess.CompletedProcess:
        common = ["--to", self.to, "--identity", str(self.key), "--known-hosts", str(self.known_hosts),
                  "--root", str(root), "--remote-edge-tl", EDGE_TL]
        return subprocess.run([EDGE_TL, "deploy", *args, *common], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "250"})


# rsync is optional for edge-tl (SFTP is the fallback) and for these tests: .ci/run installs it; a machine
# without it runs the SFTP paths and skips the rsync-only one, saying why.
HAVE_RSYNC = bool(shutil.which("rsync") and shutil.which("ssh"))
NEEDS_RSYNC = pytest.mark.skipif(not HAVE_RSYNC, reason="rsync or OpenSSH's ssh client is not installed "
                                                        "(apt-get install rsync openssh-client, or run .ci/run)")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    try:
        base = start_sshd(tmp_path_factory.mktemp("sshd"))
    except SshdUnavailable as exc:
        pytest.skip(str(exc))
    server = Sshd(**vars(base))
    proc, log = server.proc, server.log
    try:
        with server.session() as s:
            probe = s.run(["true"])
        if probe.rc != 0:
            pytest.skip(f"cannot run commands through the test sshd (exit {probe.rc})")
    except EdgeTLError as exc:
        proc.kill()
        pytest.skip(f"cannot log in to the test sshd ({exc}); sshd log: {log.read_text()[-300:]}")
    yield server
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, tiny_bundle_src) -> dict[str, Path]:
    """Bundles with distinct ids that pass the INT8 gate (seeds checked), a broken one, and a big one."""
    d = tmp_path_factory.mktemp("deploy-bundles")
    out = {"a": tiny_bundle_src}
    for key, seed in (("b", 2), ("c", 3), ("d", 4)):
        out[key] = make_tiny_bundle(d / key, name=f"tiny-{key}", seed=seed)
    out["broken"] = make_tiny_bundle(d / "broken", broken_int8=True)
    # the tiny bundle plus 1.5 MB of noise: big enough to cut a transfer in the middle
    staging = d / "big-staging"
    shutil.copytree(tiny_bundle_src, staging)
    manifest = Bundle.open(tiny_bundle_src).manifest.model_copy(update={"name": "big"})
    (staging / MANIFEST).unlink()
    (staging / "extra").mkdir()
    (staging / "extra" / "noise.bin").write_bytes(np.random.default_rng(0).bytes(1_500_000))
    out["big"] = write_bundle(staging, manifest, d / "big", sign_key=session_key())
    return out


@pytest.fixture(scope="session")
def deployed_a(sshd, bundles, tmp_path_factory) -> Path:
    """A device root where bundle "a" was deployed over SSH (copy it with ``root_with_a``)."""
    root = tmp_path_factory.mktemp("deployed-a") / "dev"
    dev = sshd.device(root)
    with dev.session:
        push(dev, bundles["a"], svc=NO_RESTART)
    return root


@pytest.fixture
def root_with_a(deployed_a, tmp_path) -> Path:
    """A private device root with "a" active (the layout is relative, so a copy is a real deploy state)."""
    root = tmp_path / "dev"
    shutil.copytree(deployed_a, root, symlinks=True)
    assert os.readlink(root / "active") == f"versions/{DeviceLayout(root).active_version()}"
    return root


def _id(bundle: Path) -> str:
    return Bundle.open(bundle).manifest.bundle_id


def _versions(root: Path) -> set[str]:
    return set(state.installed_versions(DeviceLayout(root)))


def _assert_clean(root: Path) -> None:
    """No staging, half-installed or moved-aside folders left."""
    left = [p.name for p in (root / "versions").iterdir() if p.name.startswith(".")] if (root / "versions").exists() \
        else []
    assert left == []


# -- the tests ------------------------------------------------------------------------------------------------
def test_deploy_status_second_rollback_and_keep(sshd, bundles, tmp_path):
    root = tmp_path / "dev"
    a, b, c = (_id(bundles[k]) for k in "abc")
    # 1. a clean deploy through the CLI (the bundle folder), then status
    proc = sshd.cli("push", str(bundles["a"]), "--no-restart", root=root)
    assert proc.returncode == 0, proc.stderr
    assert f"deployed {a}" in proc.stdout
    assert "ran on ort-cpu" in proc.stdout  # no TensorRT here: recorded, said
    key_body = sshd.key.read_text().splitlines()[1]
    assert key_body not in proc.stdout + proc.stderr and "PRIVATE KEY" not in proc.stdout + proc.stderr
    assert os.readlink(root / "active") == f"versions/{a}"
    st = sshd.cli("status", "--json", root=root)
    assert st.returncode == 0, st.stderr
    info = json.loads(st.stdout)
    assert info["active"] == a and info["previous"] is None
    (v,) = info["versions"]
    assert v["summary"]["backbone"] == "tiny-cnn" and v["summary"]["top1"]["quantize"] == 0.25
    assert v["parity"]["passed"] is True and v["parity"]["backend"] == "ort-cpu" and v["parity"]["golden"] == 6
    assert v["status"] == "active" and v["origin"].endswith(str(bundles["a"]))
    assert json.loads((root / "versions" / a / "parity.json").read_text())["passed"] is True
    table = sshd.cli("status", root=root)
    assert table.returncode == 0, table.stderr
    assert a in table.stdout and "tiny-cnn" in table.stdout and "int8 on ort-cpu" in table.stdout
    # the same bundle again: nothing sent, nothing changed
    dev = sshd.device(root)
    with dev.session:
        res = push(dev, bundles["a"], svc=NO_RESTART)
    assert res["status"] == "already-active" and res["upload"]["method"] == "none"
    # 2. a second deploy (the .tar.gz, library API, rsync here)
    with dev.session:
        res = push(dev, bundles["b"].with_name("b.tar.gz"), svc=NO_RESTART)
    assert res["status"] == "activated" and res["bundle_id"] == b and res["previous"] == a
    assert res["upload"]["method"] == ("rsync" if HAVE_RSYNC else "sftp")  # auto: rsync where both ends have it
    assert list((root / "uploads").iterdir()) == []
    # 3. rollback through the CLI: back to a; b stays on disk, and there is nothing further back
    rb = sshd.cli("rollback", "--no-restart", root=root)
    assert rb.returncode == 0, rb.stderr
    assert f"{b} -> {a}" in rb.stdout
    assert DeviceLayout(root).active_version() == a
    assert state.read_record(DeviceLayout(root), b)["status"] == "rolled-back"
    again = sshd.cli("rollback", "--no-restart", root=root)
    assert again.returncode == 2 and "no previous version" in again.stderr
    # 4. keep 2: c on top of a -> b (rolled back, neither active nor previous) goes
    with dev.session:
        res = push(dev, bundles["c"], svc=NO_RESTART, keep=2)
    assert res["previous"] == a and res["pruned"] == [b]
    assert _versions(root) == {a, c} and state.read_stack(DeviceLayout(root)) == [a, c]
    _assert_clean(root)


def test_first_deploy_to_a_keyless_device_trusts_the_key_on_request(sshd, bundles, tmp_path):
    """Issue 24: a device that trusts no key refuses every bundle (it cannot tell a genuine one from a re-hashed
    forgery); `deploy push --trust-key PUB` pins the workstation's key on that first deploy, and only there."""
    from edge_tl.core.signing import generate_key

    trust = tmp_path / "device-trust"  # this "device" trusts no key yet
    dev = Sshd(**vars(start_sshd(tmp_path / "sshd", client_key=sshd.key, env={"EDGE_TL_TRUSTED_KEYS": str(trust)})))
    try:
        root = tmp_path / "dev"
        r = dev.cli("push", str(bundles["a"]), "--no-restart", root=root)
        assert r.returncode == 3 and "trusts no key" in r.stderr and "--trust-key" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (root / "active").exists()
        pub = Path(os.environ["EDGE_TL_SIGNING_KEY"]).with_suffix(".pub")  # the tests' build key (conftest)
        r = dev.cli("push", str(bundles["a"]), "--no-restart", "--trust-key", str(pub), root=root)
        assert r.returncode == 0 and " trusted on " in r.stderr, r.stderr
        a = _id(bundles["a"])
        assert os.readlink(root / "active") == f"versions/{a}"
        assert state.read_record(DeviceLayout(root), a)["signature"]["state"] == "verified"
        assert [p.read_text() for p in trust.glob("*.pub")] == [pub.read_text()]
        # a deploy login cannot add a second key beside the one the device trusts: that is its admin's act
        _, other, _ = generate_key(tmp_path / "other.key")
        r = dev.cli("push", str(bundles["b"]), "--no-restart", "--trust-key", str(other), root=root)
        assert r.returncode == 3 and "already trusts" in r.stderr and "sudo edge-tl keys trust" in r.stderr, r.stderr
        assert len(list(trust.glob("*.pub"))) == 1 and DeviceLayout(root).active_version() == a
    finally:
        dev.proc.terminate()
        dev.proc.wait(timeout=10)


def test_connection_killed_mid_transfer_then_resumed(sshd, bundles, root_with_a):
    root = root_with_a
    before = DeviceLayout(root).active_version()
    killed = []

    def cut(done: int, total: int) -> None:
        """Past 400 kB sent, wait until the device holds 200 kB, then kill the sshd processes of this connection."""
        if done < 400_000 or killed:
            return
        deadline = time.monotonic() + 20
        while sum(p.stat().st_size for p in (root / "uploads").iterdir()) < 200_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        killed.append(sshd.kill_connections())

    dev = sshd.device(root)
    with dev.session, pytest.raises(EdgeTLError, match="dropped during"):
        push(dev, bundles["big"], svc=NO_RESTART, transfer="sftp", progress=cut)
    assert killed and killed[0] >= 1
    assert DeviceLayout(root).active_version() == before  # the active model untouched
    (partial,) = (root / "uploads").iterdir()
    total = bundles["big"].with_name("big.tar.gz").stat().st_size
    assert 0 < partial.stat().st_size < total
    dev = sshd.device(root)
    with dev.session:
        res = push(dev, bundles["big"], svc=NO_RESTART, transfer="sftp")
    assert res["status"] == "activated" and res["bundle_id"] == _id(bundles["big"])
    assert 0 < res["upload"]["resumed_from"] < total  # continued, not restarted
    assert (root / "versions" / res["bundle_id"] / "bundle" / "extra" / "noise.bin").stat().st_size == 1_500_000


@pytest.mark.parametrize("method", ["sftp", pytest.param("rsync", marks=NEEDS_RSYNC)])
def test_resume_from_a_wrong_partial_file_starts_over(sshd, bundles, tmp_path, method):
    """A partial upload that isn't a prefix of the bundle is detected (SFTP: hash; rsync: --append-verify)."""
    root = tmp_path / "dev"
    tarball = bundles["b"].with_name("b.tar.gz")
    dev = sshd.device(root)
    with dev.session, prepare(tarball) as prep:
        uploads = Path(dev.prepare(1)["uploads"])
        (uploads / f"{prep.sha256[:16]}-{prep.manifest.bundle_id}.tar.gz").write_bytes(b"x" * 5000)
        remote, result = dev.upload(prep, method=method)
        assert result.method == method
        if method == "sftp":
            assert result.resumed_from == 0
        assert dev.call("file-info", "--path", remote) == {"path": remote, "size": tarball.stat().st_size,
                                                             "sha256": prep.sha256}


def test_tampered_artifact_is_refused(sshd, bundles, root_with_a, tmp_path):
    root = root_with_a
    tampered = tmp_path / "tampered"
    shutil.copytree(bundles["b"], tampered)
    with open(tampered / "labels.txt", "a") as f:
        f.write("dog\n")
    # the workstation checks first (exit 3, nothing sent) ...
    proc = sshd.cli("push", str(tampered), "--no-restart", root=root)
    assert proc.returncode == 3 and "labels.txt does not match its sha256" in proc.stderr
    # ... and the device refuses it on its own
    dev = sshd.device(root)
    with dev.session, pytest.raises(CheckFailed, match="labels.txt does not match its sha256"):
        push(dev, tampered, svc=NO_RESTART, verify_local=False)
    assert DeviceLayout(root).active_version() == _id(bundles["a"]) and _versions(root) == {_id(bundles["a"])}
    _assert_clean(root)


def test_failed_parity_gate_switches_nothing(sshd, bundles, root_with_a):
    root = root_with_a
    proc = sshd.cli("push", str(bundles["broken"]), "--no-restart", root=root)
    assert proc.returncode == 3
    assert "parity gate failed" in proc.stderr and "top-1 changed on 6/6 judged" in proc.stderr
    assert DeviceLayout(root).active_version() == _id(bundles["a"]) and _versions(root) == {_id(bundles["a"])}
    _assert_clean(root)


def test_path_traversal_bundle_is_refused(sshd, bundles, root_with_a, tmp_path):
    root = root_with_a
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(bundles["b"] / MANIFEST, arcname=f"tiny/{MANIFEST}")
        tar.add(bundles["b"] / "labels.txt", arcname="tiny/../evil")
    with pytest.raises(EdgeTLError, match=r"escapes the bundle with '\.\.'"):  # refused here ...
        with prepare(evil):
            pass
    dev = sshd.device(root)
    with dev.session, pytest.raises(EdgeTLError, match=rf"on {sshd.user}@127.0.0.1.*escapes the bundle"):
        push(dev, evil, svc=NO_RESTART, verify_local=False)  # ... and there
    assert not list(tmp_path.rglob("evil"))
    assert DeviceLayout(root).active_version() == _id(bundles["a"]) and _versions(root) == {_id(bundles["a"])}
    _assert_clean(root)


def test_host_keys(sshd, tmp_path):
    root = tmp_path / "dev"
    unknown = tmp_path / "known_hosts"
    unknown.write_text("")
    with pytest.raises(EdgeTLError, match="is not in .*--accept-new-host-key"):
        sshd.device(root, known_hosts=unknown).session.connect()
    proc = subprocess.run([EDGE_TL, "deploy", "status", "--to", sshd.to, "--identity", str(sshd.key),
                           "--known-hosts", str(unknown), "--root", str(root), "--remote-edge-tl", EDGE_TL],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "host key" in proc.stderr
    with sshd.session(known_hosts=unknown, accept_new_host_key=True) as s:
        assert s.run(["true"]).rc == 0
    assert unknown.read_text() == f"[127.0.0.1]:{sshd.port} {sshd.host_pub}\n"
    with sshd.session(known_hosts=unknown) as s:  # now known
        assert s.run(["echo", "hi there"]).stdout == "hi there\n"
    # a changed key is refused even with the flag
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    changed = tmp_path / "changed_hosts"
    changed.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    with pytest.raises(EdgeTLError, match="host key changed"):
        sshd.session(known_hosts=changed, accept_new_host_key=True).connect()


def test_concurrent_deploys_never_interleave(sshd, bundles, tmp_path):
    root = tmp_path / "dev"
    results, errors = {}, {}

    def deploy(key: str) -> None:
        dev = sshd.device(root)
        try:
            with dev.session:
                results[key] = push(dev, bundles[key], svc=NO_RESTART, lock_timeout=120)
        except Exception as exc:  # reported below
            errors[key] = exc

    threads = [threading.Thread(target=deploy, args=(k,)) for k in ("b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=110)
    assert errors == {} and set(results) == {"b", "c"}
    layout = DeviceLayout(root)
    first, second = sorted(results.values(), key=lambda r: r["previous"] is not None)
    assert first["previous"] is None and second["previous"] == first["bundle_id"]  # one after the other
    assert layout.active_version() == second["bundle_id"]
    assert state.read_stack(layout) == [first["bundle_id"], second["bundle_id"]]
    assert state.read_record(layout, first["bundle_id"])["status"] == "installed"
    assert state.read_record(layout, second["bundle_id"])["status"] == "active"
    for r in (first, second):
        assert json.loads((root / "versions" / r["bundle_id"] / "parity.json").read_text())["passed"] is True
    _assert_clean(root)
    # while one deploy holds the lock, another gives up after --lock-timeout with a clear message
    with state.deploy_lock(layout, 5, "test"):
        dev = sshd.device(root)
        with dev.session, pytest.raises(EdgeTLError, match=r"another deploy holds .*\.deploy\.lock.*--lock-timeout"):
            push(dev, bundles["d"], svc=NO_RESTART, lock_timeout=0.5)
    assert layout.active_version() == second["bundle_id"]


class _Health(http.server.BaseHTTPRequestHandler):
    version = "none"

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/v2/health/ready":
            body = b"{}"
        elif self.path.startswith("/v2/models/"):
            body = json.dumps({"name": self.path.rsplit("/", 1)[1], "versions": [type(self).version]}).encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_service_health_gates_the_switch(sshd, bundles, root_with_a):
    """End to end: a service that never gets healthy after the restart is rolled back by itself; one that
    serves the new version keeps it (the health logic in detail: test_deploy_device.py)."""
    root = root_with_a
    a, b = _id(bundles["a"]), _id(bundles["b"])
    closed = f"http://127.0.0.1:{_free_port()}/v2/health/ready"
    proc = sshd.cli("push", str(bundles["b"]), "--restart-cmd", "true", "--health-url", closed,
                    "--health-timeout", "1", root=root)
    assert proc.returncode == 3
    assert f"did not become healthy on {b}" in proc.stderr and f"rolled back to {a}" in proc.stderr
    layout = DeviceLayout(root)
    assert layout.active_version() == a and state.read_record(layout, b)["status"] == "rolled-back"
    assert state.read_stack(layout) == [a]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _Health.version = b
        svc = ServiceOptions(restart_cmd="true", health_url=f"http://127.0.0.1:{server.server_port}/v2/health/ready",
                             health_timeout=5)
        dev = sshd.device(root)
        with dev.session:
            res = push(dev, bundles["b"], svc=svc)
        assert res["service"]["healthy"] is True and res["service"]["version_checked"] is True
        assert layout.active_version() == b
    finally:
        server.shutdown()
