"""`edge-tl collect` against a real OpenSSH server (issue 25 item 4): committed captures come over, verified by
their sidecar's sha256, stored once by content, with provenance; a truncated or tampered capture stays on the device
and is named; only what was verified here is removed there."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_tl.device.capture import CapturePolicy, Capturer

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))
pytestmark = pytest.mark.ssh


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_collect_verifies_dedupes_and_removes_only_what_it_copied(tmp_path):
    from sshd_helper import SshdUnavailable, start_sshd

    device = tmp_path / "device" / "capture"
    cap = Capturer(device, CapturePolicy(random_rate=0.0, max_per_minute=100), "e" * 16, ["a", "b"])
    for i in range(4):
        assert cap.consider(np.array([0.5, 0.5]), source=f"cam:{i}", data=_png(i)) == "low-score"
    # the same picture captured twice (another sidecar, the same content)
    meta0 = json.loads(sorted(device.glob("*.json"))[0].read_text())
    twin = {**meta0, "image": "twin.png", "source": "cam:again"}
    (device / "twin.png").write_bytes((device / meta0["image"]).read_bytes())
    (device / "twin.json").write_text(json.dumps(twin))
    # one truncated on the device after capture, one not committed yet (no sidecar), one junk sidecar
    victim = json.loads(sorted(device.glob("*.json"))[1].read_text())
    data = (device / victim["image"]).read_bytes()
    (device / victim["image"]).write_bytes(data[: len(data) // 2])
    (device / "inflight.png").write_bytes(_png(99))
    (device / "junk.json").write_text("{not json")
    try:
        server = start_sshd(tmp_path / "sshd")
    except SshdUnavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path / "field"
    try:
        r = subprocess.run([EDGE_TL, "collect", "--from", server.to, "--identity", str(server.key),
                            "--known-hosts", str(server.known_hosts), "--remote-dir", str(device), "--out", str(out),
                            "--json"], capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert r.returncode == 1, r.stderr  # something was left on the device: said in the exit code
    (res,) = json.loads(r.stdout)
    assert len(res["collected"]) == 3 and res["duplicates"] == 1 and res["removed_remote"] == 4
    problems = " | ".join(res["problems"])
    assert "truncated or tampered" in problems and victim["image"] in problems
    assert "junk.json: not a capture sidecar" in problems
    # on the workstation: each picture once, named by its content, byte for byte, with its provenance
    for path in map(Path, res["collected"]):
        meta = json.loads(path.with_suffix(path.suffix + ".json").read_text())
        assert path.read_bytes() == _png(int(meta["source"].split(":")[1]) if meta["source"] != "cam:again" else 0)
        assert meta["collected_from"] == server.to and meta["remote_path"].startswith(str(device))
    # on the device: the truncated capture, the uncommitted picture and the junk stay; the rest is gone
    left = sorted(p.name for p in device.iterdir())
    assert left == sorted([victim["image"], f"{Path(victim['image']).stem}.json", "inflight.png", "junk.json"])
