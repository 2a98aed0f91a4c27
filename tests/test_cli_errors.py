"""The CLI's one error boundary: user errors are one line with exit 2/3, internal bugs exit 70."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EDGE_TL, *args], capture_output=True, text=True, timeout=120, env=env)


def test_version_and_help():
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip().startswith("edge-tl 0.")
    proc = run("--help")
    assert proc.returncode == 0
    assert "Usage" in proc.stdout


def test_unknown_command_is_a_usage_error():
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "No such command" in proc.stderr


def test_user_error_is_one_line_without_traceback(tmp_path):
    from edge_tl.cli import app
    from edge_tl.core.errors import EdgeTLError

    assert app.registered_commands or app.registered_groups  # stages registered their commands
    err = EdgeTLError("bundle /x does not exist.", "give the folder that edge-tl build wrote.")
    assert err.one_line() == "bundle /x does not exist; give the folder that edge-tl build wrote"
    assert err.exit_code == 2


def test_missing_bundle_is_one_line_exit_2(tmp_path):
    proc = run("engine", "check", str(tmp_path / "nope"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: bundle {tmp_path / 'nope'} does not exist; give the folder or .tar.gz that "
                     "edge-tl build wrote"]
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = run("--debug", "engine", "check", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
