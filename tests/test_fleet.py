"""`edge-tl fleet` end to end: Ansible (ansible-core through ansible-runner) against three real OpenSSH servers on
loopback ports, each host with its own device root (tests/sshd_helper.py starts them; one client key, one host
key each, all in one known_hosts file). The device half runs through this venv's edge-tl (``edge_tl_bin``).

What each host ends up with is checked on its device root itself (the active link, the kept versions, the
deploy records), not only in the report. Where sshd or Ansible is missing, everything here is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from bundle_factory import make_tiny_bundle
from sshd_helper import SshdServer, SshdUnavailable, free_port, keygen, start_sshd

from edge_tl.core.bundle import Bundle
from edge_tl.core.layout import DeviceLayout
from edge_tl.device.deploy import state

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent
EDGE_TL = str(BIN / "edge-tl")
FAKE_TRTEXEC = Path(__file__).parent / "data" / "fake_bin" / "trtexec"  # replays a recorded TensorRT 8.5 build


@dataclass
class Fleet:
    servers: list[SshdServer]
    key: Path
    known_hosts: Path
    dir: Path

    def inventory(self, path: Path, roots: list[Path], extra: dict[int, dict] | None = None,
                  more: dict[str, dict] | None = None) -> Path:
        """A YAML inventory h0..h2 -> the three servers with ``roots``; ``extra`` host vars by index; ``more``
        hosts come first (the canary)."""
        hosts = dict(more or {})
        for i, (server, root) in enumerate(zip(self.servers, roots, strict=True)):
            hosts[f"h{i}"] = {"ansible_host": "127.0.0.1", "ansible_port": server.port, "ansible_user": server.user,
                              "ansible_ssh_private_key_file": str(self.key), "edge_tl_root": str(root),
                              "edge_tl_bin": EDGE_TL, **(extra or {}).get(i, {})}
        if path.suffix == ".ini":  # Ansible's INI format: one host per line, values as Python literals
            lines = [" ".join([name] + [f"{k}={v}" for k, v in hv.items()]) for name, hv in hosts.items()]
            path.write_text("\n".join([*lines, "", "[all:vars]", f"ansible_python_interpreter={sys.executable}"]))
            return path
        path.write_text(json.dumps({"all": {"vars": {"ansible_python_interpreter": sys.executable},
                                            "hosts": hosts}}, indent=1))  # JSON is YAML
        return path

    def cli(self, *args: str, known_hosts: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([EDGE_TL, "fleet", *args, "--known-hosts", str(known_hosts or self.known_hosts)],
                              capture_output=True, text=True, timeout=280, env={**os.environ, "COLUMNS": "250"})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    pytest.importorskip("ansible_runner", reason="the fleet extra (ansible-core, ansible-runner) is not installed")
    if not (BIN / "ansible-playbook").is_file() and not shutil.which("ansible-playbook"):
        pytest.skip("ansible-playbook is not installed")
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH's ssh client is not installed (Ansible connects with it)")
    d = tmp_path_factory.mktemp("fleet")
    servers: list[SshdServer] = []
    try:
        key = keygen(d / "client_key")
        for i in range(3):
            servers.append(start_sshd(d / f"h{i}", client_key=key))
    except SshdUnavailable as exc:
        for s in servers:
            s.stop()
        pytest.skip(str(exc))
    known = d / "known_hosts"
    known.write_text("".join(s.known_hosts_line for s in servers))
    probe = subprocess.run(["ssh", "-p", str(servers[0].port), "-i", str(key), "-o", "BatchMode=yes",
                            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
                            f"{servers[0].user}@127.0.0.1", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        for s in servers:
            s.stop()
        pytest.skip(f"cannot log in to the test sshd with ssh: {probe.stderr.strip()[-300:]}")
    yield Fleet(servers, key, known, d)
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_bundle_src) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fleet-bundles")
    return {"a": tiny_bundle_src, "b": make_tiny_bundle(d / "b", name="tiny-b", seed=2),
            "broken": make_tiny_bundle(d / "broken", broken_int8=True)}  # fails the INT8 gate, passes fp32


def _id(bundle: Path) -> str:
    return Bundle.open(bundle).manifest.bundle_id


@pytest.fixture(scope="module")
def root_ab(bundles, tmp_path_factory) -> Path:
    """A device root where a, then b were installed by the device half itself (b active, a previous)."""
    from edge_tl.device.deploy.device import install
    from edge_tl.device.deploy.service import ServiceOptions

    d = tmp_path_factory.mktemp("root-ab")
    for key in ("a", "b"):
        upload = d / f"{key}.tar.gz"
        shutil.copy(bundles[key].with_name(bundles[key].name + ".tar.gz"), upload)
        install(d / "dev", upload, svc=ServiceOptions(restart=False))
    return d / "dev"


def _copies(root: Path, tmp_path: Path, n: int = 3) -> list[Path]:
    """Private copies of a device root (its links are relative, so each copy is a real deploy state)."""
    out = []
    for i in range(n):
        shutil.copytree(root, tmp_path / f"root{i}", symlinks=True)
        out.append(tmp_path / f"root{i}")
    return out


def _report(path: Path) -> tuple[dict, dict[str, dict]]:
    data = json.loads(path.read_text())
    return data, {h["host"]: h for h in data["hosts"]}


def _active(root: Path) -> str | None:
    return DeviceLayout(root).active_version()


def _clean(root: Path) -> bool:
    """No staging, half-installed or moved-aside folders; no uploads left behind."""
    versions = root / "versions"
    hidden = [p for p in versions.iterdir() if p.name.startswith(".")] if versions.exists() else []
    uploads = list((root / "uploads").iterdir()) if (root / "uploads").exists() else []
    return not hidden and not uploads


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*")) if not p.is_symlink() and p.name != ".deploy.lock"} | {
        "active": os.readlink(root / "active").encode()}


# -- rollouts ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_clean_canary_rollout(fleet, bundles, tmp_path):
    """Three fresh hosts, batches 1 / 10 % / rest: all deployed, one batch each; h0 builds its engine through
    trtexec (the recorded stand-in), so its build time is in the report."""
    a = _id(bundles["a"])
    roots = [tmp_path / f"dev{i}" for i in range(3)]
    h0 = {"edge_tl_build_via": "trtexec", "edge_tl_environment": {"EDGE_TL_TRTEXEC": str(FAKE_TRTEXEC)}}
    inv = fleet.inventory(tmp_path / "hosts.yml", roots, {0: h0})
    report = tmp_path / "report.json"
    proc = fleet.cli("deploy", str(bundles["a"]), "-i", str(inv), "--no-restart", "--report", str(report))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    data, rows = _report(report)
    assert data["ok"] is True and data["stopped"] is False and data["counts"] == {"deployed": 3}
    assert data["serial"] == [1, "10%", "100%"] and data["max_fail_percentage"] == 0
    assert data["bundle"]["bundle_id"] == a
    assert [rows[h]["batch"] for h in ("h0", "h1", "h2")] == [1, 2, 3]  # canary first, one host per batch
    for i, h in enumerate(("h0", "h1", "h2")):
        row = rows[h]
        assert (row["outcome"], row["before"], row["after"]) == ("deployed", None, a)
        assert row["gate"] == "passed" and row["gate_detail"] == "int8 on ort-cpu"
        assert row["health"] == "not checked (restart off)" and row["error"] is None
        assert _active(roots[i]) == a and _clean(roots[i])
        record = state.read_record(DeviceLayout(roots[i]), a)
        assert record["status"] == "active" and record["parity"]["passed"] is True
        assert record["ssh_client"] == "127.0.0.1"  # installed over SSH, by the device's own edge-tl
    engine = rows["h0"]
    assert engine["engine_via"] == "trtexec" and engine["engine"].startswith(str(roots[0]))
    sidecar = json.loads(Path(engine["engine"] + ".json").read_text())
    assert engine["engine_build_seconds"] == sidecar["build_seconds"] and sidecar["build_seconds"] >= 0
    assert rows["h1"]["engine"] is None and rows["h1"]["engine_build_seconds"] is None
    # the table says the same
    for h in ("h0", "h1", "h2"):
        line = next(ln for ln in proc.stdout.splitlines() if f" {h} " in ln)
        assert "deployed" in line and a in line and "passed (int8 on ort-cpu)" in line
    assert "trtexec" in next(ln for ln in proc.stdout.splitlines() if " h0 " in ln)
    assert "3 hosts: 3 deployed" in proc.stdout and f"report: {report}" in proc.stdout
    # the same bundle again: nothing to do anywhere
    again = fleet.cli("deploy", str(bundles["a"]), "-i", str(inv), "--no-restart", "--limit", "h1",
                      "--report", str(report), "--json")
    assert again.returncode == 0, again.stderr
    (row,) = json.loads(again.stdout)["hosts"]
    assert (row["host"], row["outcome"], row["before"], row["after"]) == ("h1", "already-active", a, a)


@pytest.mark.slow
def test_failed_gate_stops_the_rollout(fleet, bundles, root_ab, tmp_path):
    """The broken bundle passes the gate in fp32 (h0) and fails it in int8 (h1): h1 keeps b, the rollout stops
    (--max-fail 0), h2 is never touched."""
    b, broken = _id(bundles["b"]), _id(bundles["broken"])
    roots = _copies(root_ab, tmp_path)
    untouched = _snapshot(roots[2])
    inv = fleet.inventory(tmp_path / "hosts.yml", roots, {0: {"edge_tl_precision": "fp32"},
                                                          2: {"edge_tl_precision": "fp32"}})
    report = tmp_path / "report.json"
    proc = fleet.cli("deploy", str(bundles["broken"]), "-i", str(inv), "--no-restart", "--report", str(report))
    assert proc.returncode == 3, proc.stderr
    data, rows = _report(report)
    assert data["ok"] is False and data["stopped"] is True
    assert data["counts"] == {"deployed": 1, "gate-failed": 1, "not-reached": 1}
    assert (rows["h0"]["outcome"], rows["h0"]["before"], rows["h0"]["after"]) == ("deployed", b, broken)
    assert rows["h0"]["gate_detail"] == "fp32 on ort-cpu"
    h1 = rows["h1"]
    assert (h1["outcome"], h1["gate"], h1["before"], h1["after"], h1["batch"]) == ("gate-failed", "failed", b, b, 2)
    assert "parity gate failed" in h1["error"] and "top-1 changed on 6/6 judged" in h1["error"]
    assert (rows["h2"]["outcome"], rows["h2"]["batch"]) == ("not-reached", None)
    # on the devices
    assert _active(roots[0]) == broken
    assert _active(roots[1]) == b and set(state.installed_versions(DeviceLayout(roots[1]))) == {_id(bundles["a"]), b}
    assert _clean(roots[1])
    assert _snapshot(roots[2]) == untouched
    line = next(ln for ln in proc.stdout.splitlines() if " h1 " in ln)
    assert "gate-failed" in line and "the parity gate failed" in line
    assert "the rollout stopped before every host was reached" in proc.stdout


@pytest.mark.slow
def test_rollout_continues_within_max_fail_and_health_rolls_back(fleet, bundles, root_ab, tmp_path):
    """Batches of 2 then 1 with --max-fail 50: h1's failed gate (1 of 2) does not stop the rollout; h2 switches,
    its service never gets healthy, and the host switches itself back to b."""
    b, broken = _id(bundles["b"]), _id(bundles["broken"])
    roots = _copies(root_ab, tmp_path)
    closed = f"http://127.0.0.1:{free_port()}/v2/health/ready"
    inv = fleet.inventory(tmp_path / "hosts.ini", roots, {
        0: {"edge_tl_precision": "fp32", "edge_tl_restart": False},
        2: {"edge_tl_precision": "fp32", "edge_tl_restart_cmd": "true", "edge_tl_health_url": closed,
            "edge_tl_health_timeout": 1}})
    report = tmp_path / "report.json"
    proc = fleet.cli("deploy", str(bundles["broken"]), "-i", str(inv), "--serial", "2,1", "--max-fail", "50",
                     "--report", str(report))
    assert proc.returncode == 3, proc.stderr
    data, rows = _report(report)
    assert data["stopped"] is False and data["counts"] == {"deployed": 1, "gate-failed": 1, "unhealthy": 1}
    assert [rows[h]["batch"] for h in ("h0", "h1", "h2")] == [1, 1, 2]
    assert rows["h0"]["after"] == broken and rows["h1"]["after"] == b
    h2 = rows["h2"]
    assert (h2["outcome"], h2["before"], h2["after"], h2["health"]) == ("unhealthy", b, b, "unhealthy; switched back")
    assert f"did not become healthy on {broken}" in h2["error"] and f"rolled back to {b}" in h2["error"]
    assert _active(roots[2]) == b and state.read_record(DeviceLayout(roots[2]), broken)["status"] == "rolled-back"
    assert _active(roots[1]) == b and _clean(roots[1]) and _clean(roots[2])


def test_rollback(fleet, bundles, root_ab, tmp_path):
    """Two hosts switch back to a; the third has nothing to go back to and says so (and keeps its version)."""
    a, b = _id(bundles["a"]), _id(bundles["b"])
    roots = _copies(root_ab, tmp_path, 2)
    lone = tmp_path / "root2"
    shutil.copytree(root_ab, lone, symlinks=True)
    state.write_stack(DeviceLayout(lone), [b])  # b active, no history before it
    inv = fleet.inventory(tmp_path / "hosts.yml", [*roots, lone])
    report = tmp_path / "report.json"
    proc = fleet.cli("rollback", "-i", str(inv), "--no-restart", "--serial", "100%", "--max-fail", "100",
                     "--report", str(report))
    assert proc.returncode == 3, proc.stderr
    data, rows = _report(report)
    assert data["action"] == "rollback" and data["counts"] == {"rolled-back": 2, "failed": 1}
    for h, root in (("h0", roots[0]), ("h1", roots[1])):
        assert (rows[h]["outcome"], rows[h]["before"], rows[h]["after"]) == ("rolled-back", b, a)
        assert _active(root) == a and state.read_record(DeviceLayout(root), b)["status"] == "rolled-back"
    assert (rows["h2"]["outcome"], rows["h2"]["before"], rows["h2"]["after"]) == ("failed", b, b)
    assert rows["h2"]["error"].startswith("there is no previous version to roll back to")
    assert _active(lone) == b
    assert "2 rolled-back" in proc.stdout


# -- bad hosts, bad input -----------------------------------------------------------------------------------------
def test_unreachable_missing_edge_tl_and_unknown_host_key_are_per_host_failures(fleet, bundles, root_ab, tmp_path):
    roots = _copies(root_ab, tmp_path)
    down = {"ansible_host": "127.0.0.1", "ansible_port": free_port(), "ansible_user": fleet.servers[0].user,
            "ansible_ssh_private_key_file": str(fleet.key), "edge_tl_root": str(tmp_path / "down")}
    inv = fleet.inventory(tmp_path / "hosts.yml", roots, {1: {"edge_tl_bin": "/nonexistent/edge-tl"}},
                          more={"down": down})
    known = tmp_path / "known_hosts"  # h2's key left out
    known.write_text("".join(s.known_hosts_line for s in fleet.servers[:2]))
    report = tmp_path / "status.json"
    proc = fleet.cli("status", "-i", str(inv), "--report", str(report), known_hosts=known)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr + proc.stdout
    data, rows = _report(report)
    assert rows["h0"]["outcome"] == "ok" and rows["h0"]["after"] == _id(root_ab / "versions" / _active(root_ab)
                                                                       / "bundle")
    assert rows["h0"]["previous"] is not None and len(rows["h0"]["versions"]) == 2
    assert rows["h1"]["outcome"] == "failed" and "edge-tl was not found or could not run on h1" in rows["h1"]["error"]
    assert rows["h2"]["outcome"] == "unreachable" and "Host key verification failed" in rows["h2"]["error"]
    assert "--accept-new-host-key" in rows["h2"]["error"]
    assert rows["down"]["outcome"] == "unreachable" and "Connection refused" in rows["down"]["error"]
    assert all("\n" not in (row["error"] or "") for row in data["hosts"])
    # a deploy whose canary is unreachable stops at once: nothing anywhere is touched
    before = [_snapshot(r) for r in roots]
    inv2 = fleet.inventory(tmp_path / "hosts2.yml", roots, more={"down": down})
    dep = fleet.cli("deploy", str(bundles["a"]), "-i", str(inv2), "--report", str(report), "--json")
    assert dep.returncode == 3 and "Traceback" not in dep.stderr
    outcomes = {h["host"]: h["outcome"] for h in json.loads(dep.stdout)["hosts"]}
    assert outcomes == {"down": "unreachable", "h0": "not-reached", "h1": "not-reached", "h2": "not-reached"}
    assert [_snapshot(r) for r in roots] == before


@pytest.mark.slow
def test_first_rollout_trusts_the_key_only_where_no_key_is_trusted(fleet, bundles, tmp_path):
    """Issue 24: `fleet deploy --trust-key PUB` on a fresh fleet: h0 trusts no key (it refuses every bundle without
    the option) and pins PUB; h1 already trusts another key and refuses to add this one (its admin's act), so it
    fails, keeping what it had; h2 trusts PUB already and just deploys."""
    from edge_tl.core.signing import generate_key

    a = _id(bundles["a"])
    pub = Path(os.environ["EDGE_TL_SIGNING_KEY"]).with_suffix(".pub")  # the tests' build key (conftest)
    _, other, other_id = generate_key(tmp_path / "other.key")
    (tmp_path / "t1").mkdir()
    shutil.copy(other, tmp_path / "t1" / f"{other_id}.pub")
    trust = {0: tmp_path / "t0", 1: tmp_path / "t1"}
    roots = [tmp_path / f"dev{i}" for i in range(3)]
    inv = fleet.inventory(tmp_path / "hosts.yml", roots,
                          {i: {"edge_tl_environment": {"EDGE_TL_TRUSTED_KEYS": str(d)}} for i, d in trust.items()})
    report = tmp_path / "report.json"
    args = ("deploy", str(bundles["a"]), "-i", str(inv), "--no-restart", "--serial", "3", "--max-fail", "100",
            "--report", str(report))
    proc = fleet.cli(*args, "--limit", "h0")
    assert proc.returncode == 3 and "trusts no key" in _report(report)[1]["h0"]["error"], proc.stdout
    assert _active(roots[0]) is None
    proc = fleet.cli(*args, "--trust-key", str(pub))
    assert proc.returncode == 3, proc.stderr + proc.stdout
    _, rows = _report(report)
    assert rows["h0"]["outcome"] == "deployed" and _active(roots[0]) == a
    assert [p.read_text() for p in trust[0].glob("*.pub")] == [pub.read_text()]
    assert rows["h1"]["outcome"] == "failed" and "already trusts" in rows["h1"]["error"], rows["h1"]
    assert _active(roots[1]) is None and [p.name for p in trust[1].iterdir()] == [f"{other_id}.pub"]
    assert rows["h2"]["outcome"] == "deployed" and _active(roots[2]) == a


def test_accept_new_host_key(fleet, tmp_path):
    inv = fleet.inventory(tmp_path / "hosts.yml", [tmp_path / f"r{i}" for i in range(3)])
    known = tmp_path / "known_hosts"
    known.write_text("")
    proc = fleet.cli("status", "-i", str(inv), "--accept-new-host-key", "--report", str(tmp_path / "r.json"),
                     known_hosts=known)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    learnt = known.read_text().splitlines()  # (hashed host names where ssh_config says HashKnownHosts)
    assert len(learnt) == 3 and all(any(ln.endswith(s.host_pub) for ln in learnt) for s in fleet.servers)
    # a changed key is refused even then
    other = keygen(tmp_path / "other")
    known.write_text("".join(f"[127.0.0.1]:{s.port} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n"
                             for s in fleet.servers))
    proc = fleet.cli("status", "-i", str(inv), "--accept-new-host-key", "--limit", "h0",
                     "--report", str(tmp_path / "r.json"), known_hosts=known)
    assert proc.returncode == 3
    (row,) = json.loads((tmp_path / "r.json").read_text())["hosts"]
    assert row["outcome"] == "unreachable" and "Host key verification failed" in row["error"]


def test_the_role_in_a_users_own_playbook(fleet, root_ab, tmp_path):
    """The role alone (ansible-playbook, no edge-tl fleet): status of one host, read from edge_tl_result."""
    roots = _copies(root_ab, tmp_path, 3)
    inv = fleet.inventory(tmp_path / "hosts.yml", roots)
    play = tmp_path / "site.yml"
    play.write_text("- hosts: h1\n  gather_facts: false\n  roles:\n    - role: edge_tl_deploy\n"
                    "      vars: {edge_tl_action: status}\n  post_tasks:\n"
                    "    - ansible.builtin.debug: {msg: 'ACTIVE={{ edge_tl_result.after.active }}'}\n")
    ansible_dir = Path(__file__).resolve().parents[1] / "deploy" / "ansible"
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ansible_dir / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_SSH_ARGS": f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={fleet.known_hosts}",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inv), str(play)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert f"ACTIVE={_active(roots[1])}" in proc.stdout


@pytest.mark.parametrize(("content", "suffix", "expect"), [
    ("all:\n  hosts:\n    h0: {ansible_host: 1.2.3.4\n   bad\n", ".yml", "does not parse: YAML parsing failed"),
    ("[cams]\nc1 ansible_host=1.2.3.4 edge_tl_root=relative/x\n", ".ini", "edge_tl_root 'relative/x' is not an "
                                                                          "absolute path"),
    ("[cams]\nc1 ansible_port=twenty-two\n", ".ini", "ansible_port 'twenty-two' is not a port number"),
    ("[cams]\nc1 ansible_host=1.2.3.4 edge_tl_root=/etc\n", ".ini", "edge_tl_root '/etc' is a system folder"),
    ("[cams]\nc1 ansible_host=1.2.3.4 edge_tl_root=/\n", ".ini", "edge_tl_root '/' is a system folder"),
    ("all:\n  children:\n    cams: {}\n", ".yml", "has no hosts"),
])
def test_bad_inventory_is_one_line(content, suffix, expect, tmp_path):
    pytest.importorskip("ansible_runner")
    inv = tmp_path / f"hosts{suffix}"
    inv.write_text(content)
    proc = subprocess.run([EDGE_TL, "fleet", "status", "-i", str(inv)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and expect in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("fleet-*.json"))  # nothing ran, nothing written


def test_bad_options_are_one_line(tmp_path, tiny_bundle_src):
    pytest.importorskip("ansible_runner")
    inv = tmp_path / "hosts.ini"
    inv.write_text("c1 ansible_host=127.0.0.1\n")
    for args, expect in ((["deploy", str(tiny_bundle_src), "--serial", "0,abc"], "--serial '0,abc' is not"),
                         (["deploy", str(tmp_path / "nothing")], "does not exist"),
                         (["rollback", "--version", "latest"], "'latest' is not a bundle id"),
                         (["status", "--known-hosts", str(tmp_path / "none")], "known_hosts file")):
        proc = subprocess.run([EDGE_TL, "fleet", *args, "-i", str(inv)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and expect in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_a_host_python_that_prints_something_else_is_named_with_its_fix(fleet, root_ab, tmp_path):
    """Issue 24: a pyenv shim that printed its own message instead of running the module gave only Ansible's
    "Module result deserialization failed: No start of json char found"; the row now names the host variable."""
    shim = tmp_path / "python3"
    shim.write_text("#!/bin/sh\necho \"pyenv: python3: command not found in this version\"\nexit 0\n")
    shim.chmod(0o755)
    roots = _copies(root_ab, tmp_path)
    inv = fleet.inventory(tmp_path / "hosts.yml", roots, {0: {"ansible_python_interpreter": str(shim)}})
    report = tmp_path / "status.json"
    proc = fleet.cli("status", "-i", str(inv), "--report", str(report))
    assert proc.returncode == 3 and "Traceback" not in proc.stderr + proc.stdout
    _, rows = _report(report)
    assert rows["h0"]["outcome"] == "failed", rows["h0"]  # was "ok" with nothing known: a silent failure
    assert "ansible_python_interpreter" in rows["h0"]["error"] and "\n" not in rows["h0"]["error"]
    assert rows["h1"]["outcome"] == "ok" and rows["h2"]["outcome"] == "ok"
