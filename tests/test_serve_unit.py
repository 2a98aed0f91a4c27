"""The systemd unit of `edge-tl serve`: the settings the service relies on, and systemd's own check."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "edge-tl-serve.service"


def settings() -> dict[str, str]:
    out = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_unit_runs_serve_as_a_hardened_service():
    s = settings()
    assert s["ExecStart"].endswith("edge-tl serve --root /opt/edge-tl --host 127.0.0.1 --port 8000")
    assert (s["Restart"], s["KillSignal"], s["User"]) == ("on-failure", "SIGTERM", "edge-tl")
    assert int(s["TimeoutStopSec"]) > 30  # longer than serve's default --graceful-timeout
    assert s["StandardOutput"] == s["StandardError"] == "journal"
    assert "video" in s["SupplementaryGroups"].split()
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"
    for breaks_gpu in ("PrivateDevices", "DevicePolicy", "MemoryDenyWriteExecute"):
        assert breaks_gpu not in s


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    # point ExecStart at an executable that exists here; everything else is checked as written
    unit = tmp_path / UNIT.name
    text = UNIT.read_text().replace("/opt/edge-tl/venv/bin/edge-tl", str(Path(sys.executable).parent / "edge-tl"))
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines() if UNIT.name in ln]
    assert problems == [], problems
