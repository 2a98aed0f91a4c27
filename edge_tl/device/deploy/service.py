"""Restart the field service onto the new model and wait until it is healthy (runs on the device).

The service is `edge-tl serve` under systemd (``deploy/systemd/edge-tl-serve.service``). After a switch it is
restarted when the unit is active (or whenever ``--restart-cmd`` names how to restart it), then its KServe v2
readiness endpoint is polled; where the server reports model versions (``/v2/models/<name>``), the new
bundle_id must be among them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from edge_tl.core.errors import EdgeTLError

UNIT = "edge-tl-serve.service"
DEFAULT_RESTART_CMD = "systemctl restart edge-tl-serve"
DEFAULT_HEALTH_URL = "http://127.0.0.1:8000/v2/health/ready"
SERVE_ENV = "/etc/edge-tl/serve.env"


@dataclass
class ServiceOptions:
    restart: bool = True
    restart_cmd: str | None = None  # None: the systemd default, used only when the unit is active
    health_url: str = DEFAULT_HEALTH_URL
    health_timeout: float = 60.0
    poll_interval: float = 0.5

    def to_args(self) -> list[str]:
        """The device CLI's options for these settings."""
        if not self.restart:
            return ["--no-restart"]
        args = ["--health-url", self.health_url, "--health-timeout", f"{self.health_timeout:g}"]
        return args + (["--restart-cmd", self.restart_cmd] if self.restart_cmd else [])


def unit_active(unit: str = UNIT) -> bool:
    """True when systemd runs ``unit`` here (False without systemd)."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return False
    try:
        return subprocess.run([systemctl, "is-active", "--quiet", unit], timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def restart_command(opts: ServiceOptions) -> list[str] | None:
    """The command that restarts the service, or None when there is no service to restart.

    The default is ``systemctl restart edge-tl-serve``, through ``sudo -n`` when the deploy user isn't root
    (bootstrap.sh --with-service allows exactly that command without a password; -n never prompts)."""
    if not opts.restart:
        return None
    if opts.restart_cmd:
        return shlex.split(opts.restart_cmd)
    if not unit_active():
        return None
    return shlex.split(DEFAULT_RESTART_CMD if os.geteuid() == 0 else f"sudo -n {DEFAULT_RESTART_CMD}")


def run_restart(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EdgeTLError(f"restart command {shlex.join(cmd)} failed: {exc}", "check --restart-cmd") from exc
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise EdgeTLError(f"restart command {shlex.join(cmd)} failed: {why[0]}",
                          "check --restart-cmd (systemctl needs root: e.g. 'sudo systemctl restart edge-tl-serve')")


def _serve_token() -> str | None:
    """The serve token (for the model metadata; health is public): $EDGE_TL_TOKEN or /etc/edge-tl/serve.env."""
    if os.environ.get("EDGE_TL_TOKEN"):
        return os.environ["EDGE_TL_TOKEN"]
    try:
        for line in Path(SERVE_ENV).read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "EDGE_TL_TOKEN" and value.strip():
                return value.strip().strip("'\"")
    except OSError:
        pass
    return None


def _get(url: str, timeout: float = 3.0, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (a URL the user gave)
            return resp.status, resp.read(1 << 20).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return 0, str(getattr(exc, "reason", exc))


def _served_versions(health_url: str, model_name: str) -> list[str] | None:
    """The versions the server reports for ``model_name`` (None when it doesn't say)."""
    parts = urlsplit(health_url)
    status, body = _get(urlunsplit((parts.scheme, parts.netloc, f"/v2/models/{model_name}", "", "")),
                        token=_serve_token())
    if status != 200:
        return None
    try:
        meta: Any = json.loads(body)
    except ValueError:
        return None
    versions = meta.get("versions") if isinstance(meta, dict) else None
    return [str(v) for v in versions] if isinstance(versions, list) and versions else None


def wait_healthy(opts: ServiceOptions, bundle_id: str | None, model_name: str | None) -> dict[str, Any]:
    """Poll until ready (and serving ``bundle_id`` where versions are reported); never raises.

    Returns {"healthy": bool, "reason": str, "version_checked": bool, "seconds": float}.
    """
    start = time.monotonic()
    reason = "not polled"
    while True:
        status, body = _get(opts.health_url)
        if status == 200:
            versions = _served_versions(opts.health_url, model_name) if model_name else None
            if versions is None or bundle_id is None:
                return {"healthy": True, "reason": "ready (the server reports no model version)",
                        "version_checked": False, "seconds": round(time.monotonic() - start, 2)}
            if bundle_id in versions:
                return {"healthy": True, "reason": f"ready, serving {bundle_id}", "version_checked": True,
                        "seconds": round(time.monotonic() - start, 2)}
            reason = f"ready but serving version(s) {', '.join(versions)}, not {bundle_id}"
        else:
            reason = f"{opts.health_url} answered HTTP {status}" if status else f"{opts.health_url}: {body}"
        if time.monotonic() - start >= opts.health_timeout:
            return {"healthy": False, "reason": reason, "version_checked": False,
                    "seconds": round(time.monotonic() - start, 2)}
        time.sleep(opts.poll_interval)
