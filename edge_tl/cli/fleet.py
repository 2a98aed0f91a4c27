"""`edge-tl fleet deploy BUNDLE --inventory hosts.yml`, `fleet rollback`, `fleet status`: `edge-tl deploy`'s device
half on many devices through Ansible (deploy/ansible). Thin: the work is in edge_tl.workstation.fleet and the role."""

from __future__ import annotations

import getpass
import os
import socket
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from edge_tl.cli._common import Backend, Via

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

fleet_app = typer.Typer(no_args_is_help=True,
                        help="Deploy to, roll back or list a fleet of devices with Ansible: on each host the device "
                             "half of `edge-tl deploy` (verify, engine, parity gate, atomic switch, health, "
                             "rollback), canary batches first.")

INVENTORY = typer.Option(..., "--inventory", "-i", help="Ansible inventory (YAML or INI): ansible_host, ansible_port, "
                         "ansible_user, ansible_ssh_private_key_file; edge_tl_root per host (default /opt/edge-tl).")
LIMIT = typer.Option(None, "--limit", "-l", help="Only the hosts matching this Ansible pattern.")
SERIAL = typer.Option("1,10%,100%", "--serial", help="Batch sizes, hosts or % of the fleet: canary 1, then 10%, "
                      "then the rest.")
MAX_FAIL = typer.Option(0, "--max-fail", min=0, max=100, help="Stop the rollout when more than this percentage of "
                        "a batch fails (0: at the first failure). A batch that fails entirely always stops it.")
KNOWN = typer.Option(None, "--known-hosts", help="known_hosts file to check the host keys (default "
                     "~/.ssh/known_hosts).")
ACCEPT = typer.Option(False, "--accept-new-host-key", help="Trust unknown host keys and add them to known_hosts "
                      "(a changed key is still refused).")
REMOTE = typer.Option(None, "--remote-edge-tl", help="The devices' edge-tl (default: the edge_tl_bin host variable, "
                      "else edge-tl on PATH).")
REPORT = typer.Option(None, "--report", help="Write the per-host report as JSON here (default: "
                      "fleet-<action>.json in the current folder).")
JSON = typer.Option(False, "--json", help="Print the report as JSON instead of the table.")
FORKS = typer.Option(10, "--forks", min=1, help="Hosts worked on at once within a batch.")
ANSIBLE_DIR = typer.Option(None, "--ansible-dir", help="The folder with fleet.yml and roles/ (default: "
                           "deploy/ansible of this edge-tl's source tree).")
LOCK = typer.Option(None, "--lock-timeout", help="Seconds to wait for another deploy on a device (default 600).")
NO_RESTART = typer.Option(False, "--no-restart", help="Don't restart the field service after switching.")
RESTART = typer.Option(None, "--restart-cmd", help="How to restart the field service (default, when the "
                       "edge-tl-serve unit is active: systemctl restart edge-tl-serve).")
HEALTH = typer.Option(None, "--health-url", help="Readiness URL on each device (default "
                      "http://127.0.0.1:8000/v2/health/ready).")
HEALTH_T = typer.Option(None, "--health-timeout", help="Seconds the service has to become healthy (default 60).")


def _given(**options: Any) -> dict[str, Any]:
    """Only the options given on the command line become extra vars (extra vars beat host variables)."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        out[f"edge_tl_{name}"] = value.value if hasattr(value, "value") else value
    return out


def _run(action: str, inventory: Path, limit: str | None, serial: str, max_fail: int, known_hosts: Path | None,
         accept: bool, forks: int, ansible_dir: Path | None, report_path: Path | None, as_json: bool,
         extravars: dict[str, Any], bundle: dict[str, Any] | None = None) -> None:
    from edge_tl.workstation.fleet.inventory import load_inventory
    from edge_tl.workstation.fleet.report import render
    from edge_tl.workstation.fleet.runner import parse_serial, run_fleet

    batches = parse_serial(serial) if action != "status" else ["100%"]
    if known_hosts is not None and not known_hosts.expanduser().is_file() and not accept:
        from edge_tl.core.errors import EdgeTLError

        raise EdgeTLError(f"known_hosts file {known_hosts} does not exist",
                          "give the file that holds your devices' host keys (or --accept-new-host-key)")
    hosts = load_inventory(inventory, limit)
    err.print(f"[dim]{action} on {len(hosts)} host(s) of {inventory}, batches {batches}, stop when more than "
              f"{max_fail}% of a batch fails[/]" if action != "status" else
              f"[dim]status of {len(hosts)} host(s) of {inventory}[/]")
    report = run_fleet(action, hosts, inventory, extravars=extravars, serial=batches, max_fail=max_fail,
                       known_hosts=known_hosts, accept_new=accept, limit=limit, forks=forks,
                       playbook_dir=ansible_dir, bundle=bundle, notify=lambda msg: err.print(f"[dim]{escape(msg)}[/]"))
    path = report.write(report_path or Path(f"fleet-{action}.json"))
    if as_json:
        print(report.to_json(), end="")
    else:
        render(report, out)
        out.print(f"report: {path}")
    if not report.ok:
        raise typer.Exit(3)


@fleet_app.command("deploy")
def deploy_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder or .tar.gz (from edge-tl build)."),
    inventory: Path = INVENTORY, limit: str = LIMIT, serial: str = SERIAL, max_fail: int = MAX_FAIL,
    known_hosts: Path = KNOWN, accept_new_host_key: bool = ACCEPT, remote_edge_tl: str = REMOTE,
    precision: str = typer.Option(None, "--precision", help="int8, fp16 or fp32 (default: the bundle's "
                                  "default_precision, or the host's edge_tl_precision)."),
    backend: Backend = typer.Option(None, "--backend", help="Where the parity gate runs (default auto)."),
    build_via: Via = typer.Option(None, "--build-via", help="Build engines with TensorRT's Python API or trtexec."),
    keep: int = typer.Option(None, "--keep", min=1, help="Versions kept on each device (default 3)."),
    lock_timeout: float = LOCK, no_restart: bool = NO_RESTART, restart_cmd: str = RESTART, health_url: str = HEALTH,
    health_timeout: float = HEALTH_T, forks: int = FORKS, ansible_dir: Path = ANSIBLE_DIR, report: Path = REPORT,
    as_json: bool = JSON,
    allow_failed_training: bool = typer.Option(False, "--allow-failed-training", help="Deploy a bundle whose "
                                               "training failed (no better than guessing); refused without it."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Install a bundle that is unsigned, "
                                        "signed by a key the hosts do not trust, or on hosts that trust no key yet "
                                        "(each host records it)."),
    trust_key: Path = typer.Option(None, "--trust-key", help="First deploy: hosts that trust no key yet trust this "
                                   "public key (e.g. ~/.config/edge-tl/signing/edge-tl.pub) before installing; a "
                                   "host that trusts another key refuses it."),
) -> None:
    """Verify the bundle here, then on each host: upload, verify, build the engine, gate, switch, check health."""
    from edge_tl.core.bundle import refuse_failed_training
    from edge_tl.core.errors import EdgeTLError
    from edge_tl.workstation.ship.client import prepare, read_public_key

    key_line = read_public_key(trust_key) if trust_key is not None else None
    if precision is not None and precision not in ("int8", "fp16", "fp32"):
        raise EdgeTLError(f"--precision {precision} is not one of int8, fp16, fp32", "choose one of them")
    with prepare(bundle) as prep:  # verified against its manifest here first, packed when a folder
        m = prep.manifest
        warning = refuse_failed_training(m, allow_failed_training)  # refused before any host is touched
        if warning:
            err.print(f"[bold yellow]{escape(warning)}[/]")
        extravars = {"edge_tl_bundle": str(prep.tarball.resolve()), "edge_tl_bundle_sha256": prep.sha256,
                     "edge_tl_bundle_id": m.bundle_id,
                     "edge_tl_origin": f"{getpass.getuser()}@{socket.gethostname()}:{os.path.abspath(bundle)}",
                     **_given(bin=remote_edge_tl, precision=precision, backend=backend, build_via=build_via,
                              keep=keep, lock_timeout=lock_timeout, restart_cmd=restart_cmd, health_url=health_url,
                              health_timeout=health_timeout)}
        if no_restart:
            extravars["edge_tl_restart"] = False
        if allow_failed_training:
            extravars["edge_tl_allow_failed_training"] = True
        if allow_unsigned:
            extravars["edge_tl_allow_unsigned"] = True
        if key_line is not None:
            extravars["edge_tl_trust_key"] = key_line.strip()
        _run("deploy", inventory, limit, serial, max_fail, known_hosts, accept_new_host_key, forks, ansible_dir,
             report, as_json, extravars, bundle={"path": str(bundle), "bundle_id": m.bundle_id, "name": m.name,
                                                 "sha256": prep.sha256})


@fleet_app.command("rollback")
def rollback_cmd(
    inventory: Path = INVENTORY, limit: str = LIMIT, serial: str = SERIAL, max_fail: int = MAX_FAIL,
    known_hosts: Path = KNOWN, accept_new_host_key: bool = ACCEPT, remote_edge_tl: str = REMOTE,
    version: str = typer.Option(None, "--version", help="Switch to this kept version instead of the previous one."),
    lock_timeout: float = LOCK, no_restart: bool = NO_RESTART, restart_cmd: str = RESTART, health_url: str = HEALTH,
    health_timeout: float = HEALTH_T, forks: int = FORKS, ansible_dir: Path = ANSIBLE_DIR, report: Path = REPORT,
    as_json: bool = JSON,
) -> None:
    """Switch each host back to its previous version (atomically; the field service restarted and checked)."""
    from edge_tl.device.deploy.state import check_version_id

    extravars = _given(bin=remote_edge_tl, rollback_version=check_version_id(version) if version else None,
                       lock_timeout=lock_timeout, restart_cmd=restart_cmd, health_url=health_url,
                       health_timeout=health_timeout)
    if no_restart:
        extravars["edge_tl_restart"] = False
    _run("rollback", inventory, limit, serial, max_fail, known_hosts, accept_new_host_key, forks, ansible_dir, report,
         as_json, extravars)


@fleet_app.command("status")
def status_cmd(
    inventory: Path = INVENTORY, limit: str = LIMIT, known_hosts: Path = KNOWN, accept_new_host_key: bool = ACCEPT,
    remote_edge_tl: str = REMOTE, forks: int = FORKS, ansible_dir: Path = ANSIBLE_DIR, report: Path = REPORT,
    as_json: bool = JSON,
) -> None:
    """The active and previous version of every host, and how many are kept."""
    _run("status", inventory, limit, "100%", 100, known_hosts, accept_new_host_key, forks, ansible_dir, report,
         as_json, _given(bin=remote_edge_tl))


def register(app: typer.Typer) -> None:
    app.add_typer(fleet_app, name="fleet")
