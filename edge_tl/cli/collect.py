"""`edge-tl collect`: the pictures devices captured (serve/infer --capture), verified, de-duplicated and stored on
the workstation. Thin: the work is in edge_tl.workstation.ship.collect."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edge_tl.cli.deploy import ACCEPT, IDENTITY, KNOWN


def collect_cmd(
    hosts: list[str] = typer.Option(..., "--from", help="A device, user@host[:port]; repeat for several."),
    remote_dir: str = typer.Option("/var/lib/edge-tl/capture", "--remote-dir", help="The --capture folder on the "
                                   "devices."),
    out: Path = typer.Option(..., "--out", "-o", help="Where the pictures go (created; nothing in it is overwritten)."),
    identity: Path = IDENTITY, known_hosts: Path = KNOWN, accept_new_host_key: bool = ACCEPT,
    keep_remote: bool = typer.Option(False, "--keep-remote", help="Leave the collected pictures on the devices."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Copy the devices' captured pictures here, verified and de-duplicated; remove on a device only what was copied.

    Every committed capture (image + sidecar) is checked against its sidecar's sha256, stored once under OUT by
    content hash with its provenance, and only then removed from the device."""
    from rich.console import Console
    from rich.markup import escape

    from edge_tl.core.importer import require_workstation

    ship = require_workstation("edge_tl.workstation.ship.collect", "edge-tl collect")
    from edge_tl.workstation.ship.transport import SSHSession, SSHTarget

    err = Console(stderr=True, highlight=False)
    results = []
    for host in hosts:
        session = SSHSession(SSHTarget.parse(host), identity=identity, known_hosts=known_hosts,
                             accept_new_host_key=accept_new_host_key,
                             notify=lambda msg: err.print(f"[yellow]{escape(msg)}[/]"))
        with session.connect():
            res = ship.collect(session, remote_dir, out, keep_remote=keep_remote)
        results.append(res)
        if not as_json:
            err.print(escape(f"{host}: {len(res.collected)} collected, {res.duplicates} duplicate(s), "
                             f"{res.removed_remote} removed from the device, {len(res.problems)} left there"))
            for line in res.problems:
                err.print(f"  [yellow]{escape(line)}[/]")
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    if any(r.problems for r in results):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("collect")(collect_cmd)
