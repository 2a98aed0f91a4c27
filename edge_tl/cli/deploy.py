"""`edge-tl deploy [push] BUNDLE --to user@host`, `deploy status`, `deploy rollback`, and the hidden device half
(`deploy device ...`) that the workstation runs over SSH. Thin: the work is in edge_tl.device.deploy."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_tl.cli._common import Backend, DeployPrecision, Via, _v, default_command_group

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

deploy_app = typer.Typer(cls=default_command_group("push"), no_args_is_help=True,
                         help="Ship a bundle to a Jetson over SSH: verify, build the engine and gate it there, then "
                              "switch atomically (`edge-tl deploy BUNDLE --to user@host`); status; rollback.")
device_app = typer.Typer(no_args_is_help=True, help="The device half (run over SSH by the workstation).")


class Transfer(str, Enum):
    auto = "auto"
    rsync = "rsync"
    sftp = "sftp"


# -- options shared by the workstation commands -----------------------------------------------------------------
TO = typer.Option(..., "--to", help="The device: user@host[:port].")
IDENTITY = typer.Option(None, "--identity", "-i", help="SSH private key (default: ssh-agent and ~/.ssh/id_*).")
ROOT = typer.Option("/opt/edge-tl", "--root", help="Deploy root on the device.")
REMOTE = typer.Option("edge-tl", "--remote-edge-tl", help="The device's edge-tl (default: found on its PATH).")
KNOWN = typer.Option(None, "--known-hosts", help="known_hosts file to check the host key (default ~/.ssh/known_hosts).")
ACCEPT = typer.Option(False, "--accept-new-host-key", help="Trust an unknown host key and add it to known_hosts.")
LOCK = typer.Option(600.0, "--lock-timeout", help="Seconds to wait for another deploy on the device.")
NO_RESTART = typer.Option(False, "--no-restart", help="Don't restart the field service after switching.")
RESTART = typer.Option(None, "--restart-cmd", help="How to restart the field service (default, when the "
                       "edge-tl-serve unit is active: systemctl restart edge-tl-serve).")
HEALTH = typer.Option("http://127.0.0.1:8000/v2/health/ready", "--health-url", help="Readiness URL on the device.")
HEALTH_T = typer.Option(60.0, "--health-timeout", help="Seconds the service has to become healthy.")
JSON = typer.Option(False, "--json", help="Print the result as JSON.")


def _svc(no_restart: bool, restart_cmd: str | None, health_url: str, health_timeout: float):
    from edge_tl.device.deploy.service import ServiceOptions

    return ServiceOptions(restart=not no_restart, restart_cmd=restart_cmd, health_url=health_url,
                          health_timeout=health_timeout)


def _device(to: str, identity: Path | None, root: str, remote: str, known: Path | None, accept: bool):
    from edge_tl.workstation.ship.client import RemoteDevice
    from edge_tl.workstation.ship.transport import SSHSession, SSHTarget

    session = SSHSession(SSHTarget.parse(to), identity=identity, known_hosts=known, accept_new_host_key=accept,
                         notify=lambda msg: err.print(f"[yellow]{escape(msg)}[/]"))
    return RemoteDevice(session, root, remote, notify=lambda msg: err.print(f"[dim]{escape(msg)}[/]"))


ALLOW_FAILED = typer.Option(False, "--allow-failed-training", help="Deploy a bundle whose training failed (the build "
                            "found its model no better than guessing); refused without it.")
ALLOW_UNSIGNED = typer.Option(False, "--allow-unsigned", help="Install a bundle that is unsigned, signed by a key "
                              "the device does not trust, or on a device that trusts no key yet (recorded). A "
                              "signature that does not verify is always refused.")


@deploy_app.command("push")
def push_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder or .tar.gz (from edge-tl build)."),
    to: str = TO, identity: Path = IDENTITY, root: str = ROOT,
    keep: int = typer.Option(3, "--keep", min=1, help="Versions kept on the device (never the active or previous)."),
    remote_edge_tl: str = REMOTE, known_hosts: Path = KNOWN, accept_new_host_key: bool = ACCEPT,
    precision: DeployPrecision = typer.Option(None, "--precision", help="Default: the bundle's default_precision."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="Where the parity gate runs (auto: TensorRT "
                                    "when installed on the device, else ONNX Runtime, recorded)."),
    build_via: Via = typer.Option(Via.api, "--build-via", help="Build the engine with TensorRT's Python API or "
                                  "trtexec (JetPack 5)."),
    transfer: Transfer = typer.Option(Transfer.auto, "--transfer", help="rsync where both ends have it, else SFTP."),
    lock_timeout: float = LOCK, no_restart: bool = NO_RESTART, restart_cmd: str = RESTART, health_url: str = HEALTH,
    health_timeout: float = HEALTH_T, as_json: bool = JSON, allow_failed_training: bool = ALLOW_FAILED,
    allow_unsigned: bool = ALLOW_UNSIGNED,
    trust_key: Path = typer.Option(None, "--trust-key", help="First deploy: make the device trust this public key "
                                   "(e.g. ~/.config/edge-tl/signing/edge-tl.pub, made by your first build) before "
                                   "installing; only where it trusts no key yet and the login may write its trust "
                                   "folder (else: sudo edge-tl keys trust on the device)."),
) -> None:
    """Upload, verify, build the engine, gate, then switch atomically; the running model stays on any failure."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from edge_tl.workstation.ship.client import push, read_public_key

    key_line = read_public_key(trust_key) if trust_key is not None else None
    device = _device(to, identity, root, remote_edge_tl, known_hosts, accept_new_host_key)
    with device.session, Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), console=err, transient=True) as progress:
        if key_line is not None:
            res = device.trust(key_line)
            err.print(escape(f"key {res['key_id']} {res['status'].replace('-', ' ')} on {to} ({res['path']})"))
        task = progress.add_task(f"upload to {escape(device.session.target.host)}", total=None)
        result = push(device, bundle, precision=_v(precision), backend=_v(backend), build_via=_v(build_via),
                      keep=keep, lock_timeout=lock_timeout, transfer=_v(transfer),
                      allow_failed_training=allow_failed_training, allow_unsigned=allow_unsigned,
                      on_warning=lambda msg: err.print(f"[bold yellow]{escape(msg)}[/]"),
                      svc=_svc(no_restart, restart_cmd, health_url, health_timeout),
                      progress=lambda done, total: progress.update(task, completed=done, total=total),
                      on_uploaded=lambda _result: progress.stop())
    if as_json:
        out.print(escape(json.dumps(result, indent=2)))
        return
    if result["status"] == "already-active":
        out.print(escape(f"{result['bundle_id']} is already active on {to}; nothing changed"))
        return
    out.print("[bold green]deployed[/] " + escape(f"{result['bundle_id']} to {to}:{result['root']} "
                                                  f"(previous: {result.get('previous') or 'none'})"))
    parity = result.get("parity") or {}
    out.print(escape(f"  parity: {parity.get('summary')}"))
    engine = result.get("engine")
    out.print(escape(f"  engine: {engine['path']} (key {engine.get('key_digest')})" if engine
                     else "  engine: none built"))
    for note in result.get("notes") or []:
        out.print(f"  [yellow]note:[/] {escape(str(note))}")
    service = result.get("service") or {}
    out.print(escape(f"  service: {service.get('reason') or service.get('note')}"))
    if result.get("pruned"):
        out.print(escape(f"  removed old versions: {', '.join(result['pruned'])}"))


@deploy_app.command("status")
def status_cmd(to: str = TO, identity: Path = IDENTITY, root: str = ROOT, remote_edge_tl: str = REMOTE,
               known_hosts: Path = KNOWN, accept_new_host_key: bool = ACCEPT, as_json: bool = JSON) -> None:
    """The active version (backbone, accuracy per stage, created, engine key) and the kept ones."""
    device = _device(to, identity, root, remote_edge_tl, known_hosts, accept_new_host_key)
    with device.session:
        info = device.status()
    if as_json:
        out.print(escape(json.dumps(info, indent=2)))
        return
    title = f"{to}:{info['root']}  active: {info['active'] or 'none'}  previous: {info['previous'] or 'none'}"
    table = Table(title=escape(title))
    for col in ("", "bundle_id", "name", "backbone", "top-1 per stage", "created", "installed", "gate", "engine key"):
        table.add_column(col, overflow="fold")
    for v in info["versions"]:
        summary = v.get("summary") or {}
        top1 = ", ".join(f"{k} {t:.3f}" for k, t in (summary.get("top1") or {}).items() if t is not None)
        parity = v.get("parity") or {}
        mark = "*" if v["active"] else ("prev" if v["bundle_id"] == info["previous"] else "")
        table.add_row(*(escape(str(c)) for c in (
            mark, v["bundle_id"], v.get("name") or "", summary.get("backbone", ""), top1,
            summary.get("created", ""), v.get("installed_at") or "",
            f"{parity.get('precision')} on {parity.get('backend')}" if parity else "", v.get("engine_key") or "-")))
    out.print(table)


@deploy_app.command("rollback")
def rollback_cmd(to: str = TO, identity: Path = IDENTITY, root: str = ROOT, remote_edge_tl: str = REMOTE,
                 known_hosts: Path = KNOWN, accept_new_host_key: bool = ACCEPT,
                 version: str = typer.Option(None, "--version", help="Switch to this kept version instead."),
                 lock_timeout: float = LOCK, no_restart: bool = NO_RESTART, restart_cmd: str = RESTART,
                 health_url: str = HEALTH, health_timeout: float = HEALTH_T, as_json: bool = JSON) -> None:
    """Switch back to the previous version atomically (and restart the field service onto it)."""
    device = _device(to, identity, root, remote_edge_tl, known_hosts, accept_new_host_key)
    with device.session:
        result = device.rollback(version=version, lock_timeout=lock_timeout,
                                 svc=_svc(no_restart, restart_cmd, health_url, health_timeout))
    if as_json:
        out.print(escape(json.dumps(result, indent=2)))
    else:
        out.print("[bold green]rolled back[/] " + escape(f"{to}: {result['previous']} -> {result['bundle_id']}"))


# -- the device half ------------------------------------------------------------------------------------------
DROOT = typer.Option(..., "--root", help="Deploy root.")


def _emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, default=str), flush=True)


@device_app.command("prepare")
def device_prepare(root: Path = DROOT, need_bytes: int = typer.Option(0, "--need-bytes")) -> None:
    """Create the upload folder; check free space; report this edge-tl's version."""
    from edge_tl.device.deploy.device import prepare

    _emit(prepare(root, need_bytes))


@device_app.command("file-info")
def device_file_info(root: Path = DROOT, path: Path = typer.Option(..., "--path")) -> None:
    """Size and sha256 of a file in the upload folder (to resume an upload)."""
    from edge_tl.device.deploy.device import upload_file_info

    _emit(upload_file_info(root, path))


@device_app.command("install")
def device_install(
    root: Path = DROOT, upload: Path = typer.Option(..., "--upload"), sha256: str = typer.Option(None, "--sha256"),
    bundle_id: str = typer.Option(None, "--bundle-id"), precision: DeployPrecision = typer.Option(None, "--precision"),
    backend: Backend = typer.Option(Backend.auto, "--backend"), build_via: Via = typer.Option(Via.api, "--build-via"),
    keep: int = typer.Option(3, "--keep", min=1), lock_timeout: float = LOCK,
    origin: str = typer.Option(None, "--origin"), no_restart: bool = NO_RESTART, restart_cmd: str = RESTART,
    health_url: str = HEALTH, health_timeout: float = HEALTH_T, allow_failed_training: bool = ALLOW_FAILED,
    allow_unsigned: bool = ALLOW_UNSIGNED,
) -> None:
    """Verify, gate and activate an uploaded bundle (prints the result as JSON)."""
    from edge_tl.device.deploy.device import install

    _emit(install(root, upload, sha256=sha256, bundle_id=bundle_id, precision=_v(precision), backend=_v(backend),
                  build_via=_v(build_via), keep=keep, lock_timeout=lock_timeout, origin=origin,
                  allow_failed_training=allow_failed_training, allow_unsigned=allow_unsigned,
                  svc=_svc(no_restart, restart_cmd, health_url, health_timeout)))


@device_app.command("trust")
def device_trust(root: Path = DROOT, key: str = typer.Option(..., "--key", help="The .pub line to trust.")) -> None:
    """Trust a signing key where this device trusts none yet (deploy push --trust-key; JSON)."""
    from edge_tl.core.signing import trust_key

    _emit(trust_key(key, "--trust-key", first_only=True))


@device_app.command("status")
def device_status(root: Path = DROOT) -> None:
    """Active, previous and kept versions (JSON)."""
    from edge_tl.device.deploy.device import status

    _emit(status(root))


@device_app.command("rollback")
def device_rollback(root: Path = DROOT, version: str = typer.Option(None, "--version"), lock_timeout: float = LOCK,
                    no_restart: bool = NO_RESTART, restart_cmd: str = RESTART, health_url: str = HEALTH,
                    health_timeout: float = HEALTH_T) -> None:
    """Switch to the previous (or given) version (JSON)."""
    from edge_tl.device.deploy.device import rollback

    _emit(rollback(root, version=version, lock_timeout=lock_timeout,
                   svc=_svc(no_restart, restart_cmd, health_url, health_timeout)))


deploy_app.add_typer(device_app, name="device", hidden=True)


def register(app: typer.Typer) -> None:
    app.add_typer(deploy_app, name="deploy")
