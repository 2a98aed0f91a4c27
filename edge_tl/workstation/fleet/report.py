"""The fleet report: one row per host (version before/after, gate, engine build time, health, error), printed as a
rich table and written as JSON.

Rows come from each host's ``edge_tl_result`` fact (set by the role from the device commands' own JSON), or,
for hosts that never set it, from what Ansible said about them (unreachable, failed) or that they were never
reached because the rollout stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from edge_tl.core.bundle import utc_now
from edge_tl.core.fsutil import atomic_write_text

Outcome = Literal["deployed", "already-active", "rolled-back", "ok", "gate-failed", "unhealthy", "failed",
                  "stopped", "unreachable", "not-reached"]
GOOD: tuple[str, ...] = ("deployed", "already-active", "rolled-back", "ok")

# The device half's own words (edge_tl/device/deploy/gate.py, edge_tl/device/deploy/device.py) for its two checks.
GATE_FAILED = "the parity gate failed"
GATE_NOT_RUN = "the parity gate could not run"
UNHEALTHY = "did not become healthy"


class HostRow(BaseModel):
    host: str
    address: str | None = None
    root: str | None = None
    batch: int | None = Field(None, description="1-based serial batch the host ran in (None: not reached)")
    outcome: Outcome
    before: str | None = Field(None, description="active bundle id before")
    after: str | None = Field(None, description="active bundle id after")
    gate: Literal["passed", "failed", "error", "not run"] | None = None
    gate_detail: str | None = Field(None, description="precision on backend, or why it failed")
    gate_summary: str | None = Field(None, description="the parity gate's own summary line")
    engine: str | None = Field(None, description="engine path on the host, None when none was built")
    engine_build_seconds: float | None = None
    engine_via: str | None = None
    health: str | None = None
    previous: str | None = Field(None, description="what a rollback would switch to (status)")
    versions: list[str] = Field(default_factory=list, description="kept versions (status)")
    error: str | None = None
    device: dict[str, Any] | None = Field(None, description="the device command's JSON result")

    @property
    def ok(self) -> bool:
        return self.outcome in GOOD


class FleetReport(BaseModel):
    action: Literal["deploy", "rollback", "status"]
    inventory: str
    bundle: dict[str, Any] | None = None
    serial: list[int | str]
    max_fail_percentage: int
    started: str
    finished: str | None = None
    stopped: bool = Field(False, description="the rollout stopped before every host was reached")
    hosts: list[HostRow]

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.hosts:
            out[row.outcome] = out.get(row.outcome, 0) + 1
        return out

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.hosts)

    def to_json(self) -> str:
        data = self.model_dump(mode="json")
        data["counts"] = self.counts
        data["ok"] = self.ok
        return json.dumps(data, indent=2) + "\n"

    def write(self, path: Path) -> Path:
        atomic_write_text(path, self.to_json())
        return path


def _active(status: Any) -> str | None:
    return status.get("active") if isinstance(status, dict) else None


def _status_fields(row: HostRow, after: Any) -> None:
    """What ``status`` adds: the previous version, every version, the active one's gate and engine."""
    row.previous = after.get("previous") if isinstance(after, dict) else None
    row.versions = [v.get("bundle_id") for v in (after.get("versions") or []) if isinstance(v, dict)]
    active = next((v for v in after.get("versions") or [] if isinstance(v, dict) and v.get("active")), None)
    if active and active.get("parity"):
        p = active["parity"]
        row.gate = "passed" if p.get("passed") else "failed"
        row.gate_detail = f"{p.get('precision')} on {p.get('backend')}"
    if active and active.get("engine"):
        row.engine = active["engine"]


def _error_outcome(row: HostRow, error: str, action: Any) -> None:
    """The outcome (and gate) of a host whose run ended with ``error``."""
    if error.startswith("unreachable:"):
        row.outcome = "unreachable"
        row.before = row.after = None  # unknown
    elif GATE_FAILED in error:
        row.outcome, row.gate, row.gate_detail = "gate-failed", "failed", error
    elif UNHEALTHY in error:
        row.outcome, row.gate, row.health = "unhealthy", "passed", "unhealthy; switched back"
    else:
        row.outcome = "failed"
        if action == "deploy":
            row.gate = "error" if GATE_NOT_RUN in error else "not run"


def row_from_result(name: str, address: str | None, root: str | None, batch: int | None,
                    r: dict[str, Any]) -> HostRow:
    """A host's row from its ``edge_tl_result`` fact."""
    error = " ".join((r.get("error") or "").split()) or None
    if error and "Host key verification failed" in error:
        error += ("; check the host's key (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on it), then add it to "
                  "known_hosts or re-run with --accept-new-host-key")
    device = r.get("result") if isinstance(r.get("result"), dict) else None
    before, after = r.get("before") or {}, r.get("after") or {}
    row = HostRow(host=name, address=address, root=r.get("root") or root, batch=batch, outcome="ok",
                  before=_active(before), after=_active(after), error=error, device=device)
    action = r.get("action")
    if action == "status":
        _status_fields(row, after)
    # outcome and the gate
    if error:
        _error_outcome(row, error, action)
    elif action in ("deploy", "rollback") and device is None:
        # no error and no result: Ansible stopped this host half-way because other hosts of its batch failed
        row.outcome = "stopped"
        row.error = f"stopped before its {action} finished: more than --max-fail of its batch failed"
    elif action == "deploy":
        row.outcome = "already-active" if device.get("status") == "already-active" else "deployed"
    elif action == "rollback":
        row.outcome = "rolled-back"
    if device and isinstance(device.get("parity"), dict):
        p = device["parity"]
        row.gate = "passed" if p.get("passed") else "failed"
        row.gate_detail, row.gate_summary = f"{p.get('precision')} on {p.get('backend')}", p.get("summary")
    # the engine
    if device and isinstance(device.get("engine"), dict):
        row.engine = device["engine"].get("path")
        row.engine_via = device["engine"].get("via")
    build = r.get("engine_build") if isinstance(r.get("engine_build"), dict) else None
    if build:
        row.engine_build_seconds = build.get("build_seconds")
        row.engine_via = row.engine_via or build.get("via")
    # the field service
    svc = (device or {}).get("service")
    if isinstance(svc, dict):
        if svc.get("restarted"):
            row.health = ("healthy" if svc.get("healthy") else "unhealthy") + (
                f": {svc['reason']}" if svc.get("reason") else "")
        else:
            row.health = f"not checked ({svc.get('note') or 'not restarted'})"
    return row


def _short(version: str | None) -> str:
    return version or "-"


def render(report: FleetReport, console) -> None:  # type: ignore[no-untyped-def]
    """The per-host table, then one line of counts."""
    from rich.table import Table

    status = report.action == "status"
    title = f"edge-tl fleet {report.action}" + (
        f" {report.bundle.get('bundle_id')} ({report.bundle.get('name')})" if report.bundle else "")
    table = Table(title=title, title_justify="left")
    cols = ["host", "batch", "before", "after", "result", "gate", "engine build", "health", "error"]
    if status:
        cols = ["host", "active", "previous", "kept", "gate", "result", "error"]
    for col in cols:
        table.add_column(col, overflow="fold")
    styles = {"deployed": "green", "rolled-back": "green", "ok": "green", "already-active": "cyan",
              "not-reached": "dim"}
    for row in report.hosts:
        result = f"[{styles.get(row.outcome, 'bold red')}]{row.outcome}[/]"
        gate = row.gate or "-"
        if row.gate_detail and row.gate in ("passed", "failed") and row.outcome != "gate-failed":
            gate = f"{row.gate} ({row.gate_detail})"
        if status:
            table.add_row(row.host, _short(row.after), _short(row.previous), str(len(row.versions)), gate, result,
                          row.error or "")
            continue
        if row.engine_build_seconds is not None:
            engine = f"{row.engine_build_seconds:.1f} s" + (f" ({row.engine_via})" if row.engine_via else "")
        elif row.engine:
            engine = "cached"
        elif row.outcome == "deployed":
            engine = f"none ({row.gate_detail})" if row.gate_detail else "none"
        else:
            engine = "-"
        table.add_row(row.host, str(row.batch) if row.batch else "-", _short(row.before), _short(row.after), result,
                      gate, engine, row.health or "-", row.error or "")
    console.print(table)
    counts = ", ".join(f"{n} {k}" for k, n in sorted(report.counts.items()))
    tail = "; the rollout stopped before every host was reached" if report.stopped else ""
    console.print(f"{len(report.hosts)} hosts: {counts}{tail}")


def finish(report: FleetReport) -> FleetReport:
    report.finished = utc_now()
    report.stopped = any(row.outcome == "not-reached" for row in report.hosts)
    return report
