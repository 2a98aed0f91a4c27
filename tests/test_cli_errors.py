"""The CLI's one error boundary: user errors are one line with exit 2/3, internal bugs exit 70."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_wide_help_wraps_each_paragraph_to_the_terminal():
    """At 100 columns and more the help is rich's, which kept the docstring's source line breaks after the first
    paragraph ('... reused from the' / 'run folder'): every paragraph is one line that the terminal wraps."""
    import os

    from edge_tl.cli import _reflow

    assert _reflow("First line\n    of the summary.\n\n    A body that\n    goes on.\n\n    - one\n    - two\n") == (
        "First line of the summary.\n\nA body that goes on.\n\n- one\n- two")
    out = run("build", "--help", env={**os.environ, "COLUMNS": "160"}).stdout
    assert "Stages whose inputs and settings did not change are reused from the run folder; an interrupted" in out


def test_unknown_command_is_a_usage_error():
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "No such command" in proc.stderr


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    """The CLI's error boundary (edge_tl.cli.main), run in-process: an EdgeTLError is one line, exit 2."""
    from edge_tl.cli import main

    model = tmp_path / "nope.onnx"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(model)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"error: model {model} does not exist; give a bundle folder or .tar.gz, an .onnx or an .engine"]


def test_internal_bug_exits_70_without_traceback_unless_debug(tmp_path, capsys, monkeypatch):
    """Any other exception is an internal bug: exit 70, a request to report it, the traceback only with --debug."""
    import edge_tl.device.bench as bench
    from edge_tl.cli import main

    def broken_run_bench(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(bench, "run_bench", broken_run_bench)
    monkeypatch.setenv("EDGE_TL_DEBUG", "0")  # --debug below sets it to 1; monkeypatch restores it after
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 70
    err = capsys.readouterr().err
    assert "internal error" in err and "RuntimeError: a bug" in err and "please report it" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--debug", "bench", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 70
    assert "Traceback" in capsys.readouterr().err


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
