"""A full or read-only disk is the environment, not a bug (issue 24 item 4): one line that says so, exit 2, no
traceback, no "internal error" (exit 70), and nothing half-written where the output would have gone. Real file
systems: small tmpfs mounts (skipped where the test may not mount one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))


@pytest.fixture()
def mounts(tmp_path):
    made = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode:
            pytest.skip("a tmpfs can't be mounted here (the full disk is a real one, not a stand-in)")
        made.append(where)
        return where

    yield mount
    for where in made:
        subprocess.run(["umount", str(where)], check=False)


def _one_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_a_full_disk_is_one_line(mounts, tiny_bundle_src):
    full = mounts("full", "size=16k")  # smaller than the model: the copy runs out of space
    proc = subprocess.run([EDGE_TL, "export", "triton", str(tiny_bundle_src), "--out", str(full / "repo")],
                          capture_output=True, text=True, timeout=120)
    _one_line(proc, "the disk is full")
    assert not (full / "repo" / "tiny").exists()  # no half-written model entry


def test_a_read_only_disk_is_one_line(mounts):
    pytest.importorskip("torch", reason="the workstation extra (torch) is not installed")
    ro = mounts("ro", "ro,size=64k")
    proc = subprocess.run([EDGE_TL, "build", "--out", str(ro / "run"), "--demo-shots", "10"], capture_output=True,
                          text=True, timeout=300)
    _one_line(proc, f"the file system is read-only ({ro / 'run'})")
