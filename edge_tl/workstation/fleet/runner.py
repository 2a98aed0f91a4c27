"""Run the fleet playbook (``deploy/ansible/fleet.yml``, role ``edge_tl_deploy``) with ansible-runner.

Connections are OpenSSH's (Ansible's ``ssh`` plugin) with host keys checked the way `edge-tl deploy` checks
them: ``StrictHostKeyChecking=yes`` against known_hosts (``--known-hosts``, default ``~/.ssh/known_hosts``);
``--accept-new-host-key`` turns that into ``accept-new`` (an unknown key is added, a changed key is still
refused). These options come first on ssh's command line, so they win over any later ``-o`` (ssh keeps the
first value of an option), including Ansible's own ``host_key_checking = False``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.importer import require
from edge_tl.workstation.fleet.inventory import FleetHost, ansible_tool
from edge_tl.workstation.fleet.report import FleetReport, HostRow, finish, row_from_result

ENV_ANSIBLE_DIR = "EDGE_TL_ANSIBLE_DIR"
PLAYBOOK = "fleet.yml"
ROLE = "edge_tl_deploy"
DEFAULT_SERIAL: list[int | str] = [1, "10%", "100%"]
Notify = Callable[[str], None]


def ansible_dir(given: Path | None = None) -> Path:
    """Where fleet.yml and roles/edge_tl_deploy are: ``given``, ``$EDGE_TL_ANSIBLE_DIR``, else the source tree's
    deploy/ansible (the workstation install is an editable one from the source tree)."""
    candidates = [given, os.environ.get(ENV_ANSIBLE_DIR), Path(__file__).resolve().parents[3] / "deploy" / "ansible"]
    for cand in candidates:
        if cand and (Path(cand) / PLAYBOOK).is_file() and (Path(cand) / "roles" / ROLE).is_dir():
            return Path(cand).resolve()
    raise EdgeTLError("the Ansible playbook and role of edge-tl fleet (deploy/ansible) were not found",
                      f"pass --ansible-dir path/to/edge-tl/deploy/ansible or set {ENV_ANSIBLE_DIR}")


def parse_serial(text: str) -> list[int | str]:
    """``1,10%,100%`` -> [1, "10%", "100%"] (Ansible's ``serial`` list)."""
    out: list[int | str] = []
    for part in (p.strip() for p in (text or "").split(",")):
        m = re.fullmatch(r"(\d+)(%?)", part)
        if not m or int(m.group(1)) == 0 or (m.group(2) and int(m.group(1)) > 100):
            raise EdgeTLError(f"--serial '{text}' is not a list of batch sizes",
                              "give host counts or percentages, e.g. --serial 1,10%,100%")
        out.append(part if m.group(2) else int(part))
    return out


def ssh_args(known_hosts: Path | None, accept_new: bool, control_dir: Path, connect_timeout: int) -> str:
    opts = ["-o", "BatchMode=yes", "-o", f"StrictHostKeyChecking={'accept-new' if accept_new else 'yes'}",
            "-o", f"ConnectTimeout={connect_timeout}", "-o", "ControlMaster=auto", "-o", "ControlPersist=60s"]
    if known_hosts is not None:
        opts += ["-o", f"UserKnownHostsFile={Path(known_hosts).expanduser().resolve()}"]
    return shlex.join(opts)


def _close_masters(control_dir: Path) -> None:
    """Stop the OpenSSH connection masters this run left (ControlPersist), so nothing outlives the command."""
    ssh = shutil.which("ssh")
    if not ssh or not control_dir.is_dir():
        return
    for sock in control_dir.iterdir():
        subprocess.run([ssh, "-S", str(sock), "-O", "exit", "edge-tl-fleet"], capture_output=True, timeout=15,
                       check=False)


@dataclass
class _Collector:
    """Turns ansible-runner's events into per-host facts: the role's edge_tl_result, else what Ansible said."""

    notify: Notify
    batch: int = 0
    batches: dict[str, int] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host")
        if kind == "playbook_on_play_start":
            self.batch += 1
        elif kind == "verbose" or kind == "error":
            text = event.get("stdout") or ""
            if "ERROR" in text:
                self.errors.append(text)
        if host and kind.startswith("runner_on_"):
            self.batches.setdefault(host, self.batch)
            res = data.get("res") or {}
            task = (data.get("task") or "").removeprefix("edge-tl | ")
            if kind == "runner_on_ok":
                fact = (res.get("ansible_facts") or {}).get("edge_tl_result")
                if isinstance(fact, dict):
                    self.results[host] = fact
                elif task.startswith(("install", "switch back", "upload")):
                    self.notify(f"[{host}] {task}: done")
            elif kind == "runner_on_unreachable":
                self.unreachable[host] = " ".join(str(res.get("msg") or "unreachable").split())
                self.notify(f"[{host}] unreachable: {self.unreachable[host]}")
            elif kind == "runner_on_failed" and not data.get("ignore_errors"):
                self.failed.setdefault(host, " ".join(str(res.get("msg") or "failed").split()))
                if not task.startswith("fail this host"):
                    self.notify(f"[{host}] {task}: failed")
        return False  # keep no event files


def run_fleet(action: str, hosts: list[FleetHost], inventory: Path, *, extravars: dict[str, Any],
              serial: list[int | str], max_fail: int, known_hosts: Path | None = None, accept_new: bool = False,
              limit: str | None = None, forks: int = 10, connect_timeout: int = 15, playbook_dir: Path | None = None,
              bundle: dict[str, Any] | None = None, notify: Notify | None = None) -> FleetReport:
    """Run ``action`` (deploy, rollback, status) on ``hosts`` and return the report (every host has a row)."""
    ansible_runner = require("ansible_runner", "edge-tl fleet")
    notify = notify or (lambda _msg: None)
    if not 0 <= max_fail <= 100:
        raise EdgeTLError(f"--max-fail {max_fail} is not a percentage", "give 0 (stop at the first failure) to 100")
    if known_hosts is not None and not Path(known_hosts).expanduser().is_file() and not accept_new:
        raise EdgeTLError(f"known_hosts file {known_hosts} does not exist",
                          "give the file that holds your devices' host keys (or --accept-new-host-key)")
    pdir = ansible_dir(playbook_dir)
    report = FleetReport(action=action, inventory=str(inventory), bundle=bundle, serial=serial,
                         max_fail_percentage=max_fail, started=_now(), hosts=[])
    collector = _Collector(notify)
    with tempfile.TemporaryDirectory(prefix="edge-tl-fleet-") as tmp:
        control, private = Path(tmp) / "cp", Path(tmp) / "runner"
        control.mkdir(mode=0o700)
        private.mkdir()
        env = {
            # ansible-runner runs the ansible-playbook it finds on this PATH: this environment's first
            "PATH": f"{Path(ansible_tool('ansible-playbook')).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "ANSIBLE_SSH_ARGS": ssh_args(known_hosts, accept_new, control, connect_timeout),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control),
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_TIMEOUT": str(connect_timeout),
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "ANSIBLE_LOCAL_TEMP": str(Path(tmp) / "local"),
            "ANSIBLE_PYTHON_INTERPRETER": os.environ.get("ANSIBLE_PYTHON_INTERPRETER", "auto_silent"),
        }
        extra = {**extravars, "edge_tl_action": action, "edge_tl_fleet_serial": serial,
                 "edge_tl_fleet_max_fail": max_fail}
        try:
            result = ansible_runner.run(
                private_data_dir=str(private), project_dir=str(pdir), playbook=str(pdir / PLAYBOOK),
                inventory=str(Path(inventory).resolve()), extravars=extra, envvars=env, limit=limit, forks=forks,
                quiet=True, event_handler=collector,
                settings={"suppress_ansible_output": True})
            stdout = result.stdout.read() if result.stdout else ""
        finally:
            _close_masters(control)
    seen = set(collector.batches) | set(collector.results)
    if not seen and result.rc != 0:
        errors = [ln.split("]:", 1)[-1].strip() for ln in stdout.splitlines() if "ERROR" in ln]
        raise EdgeTLError(f"the fleet playbook did not run (ansible-playbook exit {result.rc}: "
                          f"{errors[0] if errors else result.status})", "see the message; check the inventory and "
                          "the role's variables (deploy/ansible/roles/edge_tl_deploy/README.md)")
    for h in hosts:
        batch = collector.batches.get(h.name)
        if h.name in collector.results:
            row = row_from_result(h.name, h.address, h.root, batch, collector.results[h.name])
            if h.name in collector.unreachable and not row.error:
                row.outcome, row.error = "unreachable", collector.unreachable[h.name]
        elif h.name in collector.unreachable:
            row = HostRow(host=h.name, address=h.address, root=h.root, batch=batch, outcome="unreachable",
                          error=f"unreachable: {collector.unreachable[h.name]}; the host finishes (or undoes) what it "
                                "had started on its own: see edge-tl fleet status")
        elif h.name in collector.failed:
            row = HostRow(host=h.name, address=h.address, root=h.root, batch=batch, outcome="failed",
                          error=collector.failed[h.name])
        else:
            row = HostRow(host=h.name, address=h.address, root=h.root, outcome="not-reached",
                          error="not reached: the rollout stopped (more than --max-fail failed in a batch)"
                          if action != "status" else "not reached")
        report.hosts.append(row)
    return finish(report)


def _now() -> str:
    from edge_tl.core.bundle import utc_now

    return utc_now()
