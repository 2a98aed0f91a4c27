"""The build's run folder under concurrency and signals (issue 24 item 3): a second build on a folder a build is
writing to is refused at once and leaves the first's work alone (before, it read "running" as an interrupted
build, resumed it and deleted its outputs); SIGTERM ends a build like Ctrl-C, with run.json saying so (before,
Python's default action killed it on the spot and run.json still said "running")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_tl.core.errors import EdgeTLError
from edge_tl.workstation.pipeline.cache import LOCK_FILE, RunFolder

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))


def _state(run: Path) -> dict:
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def test_a_second_build_is_refused_and_sigterm_marks_the_first_interrupted(tmp_path):
    pytest.importorskip("torch", reason="the workstation extra (torch) is not installed")
    run = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200"}
    first = subprocess.Popen([EDGE_TL, "build", "--out", str(run), "--demo-shots", "10", "--no-scratch",
                              "--quantize-mode", "ptq", "--no-explain"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while _state(run).get("status") != "running":
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, "the first build never said it was running"
            time.sleep(0.2)
        second = subprocess.run([EDGE_TL, "build", "--out", str(run), "--overwrite"], capture_output=True,
                                text=True, timeout=300, env=env)
        assert second.returncode == 2, second.stderr
        assert f"another build (edge-tl build by pid {first.pid}" in second.stderr and "--out" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
        assert first.poll() is None and _state(run)["status"] == "running"  # the first goes on, untouched
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    state = _state(run)
    assert state["status"] == "interrupted" and "SIGTERM" in state["error"] and "resume" in state["error"]


def test_the_lock_is_released_and_a_foreign_folder_is_refused_even_with_overwrite(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.claim(overwrite=False) == "new"
    other = RunFolder(tmp_path / "run")
    with pytest.raises(EdgeTLError, match=r"another build \(edge-tl build by pid \d+"):
        other.claim(overwrite=True)
    run.release()
    assert other.claim(overwrite=False) == "new"  # the lock file alone does not make the folder foreign
    other.release()
    assert (tmp_path / "run" / LOCK_FILE).is_file()
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(EdgeTLError, match="not an edge-tl run folder"):
            RunFolder(foreign).claim(overwrite=overwrite)
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
