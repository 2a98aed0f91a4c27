"""deploy/systemd/edge-tl-serve.service must leave the Jetson's GPU reachable and raise the fd limit.

systemd.resource-control(5), DevicePolicy=: with the default ``auto``, all devices are allowed *unless* some
``DeviceAllow=`` exists; then only the listed ones (and the pseudo devices) are. systemd.exec(5): ``ProtectClock=yes``
adds ``DeviceAllow=char-rtc r`` and ``PrivateDevices=yes`` sets ``DevicePolicy=closed`` - both turn the policy into
an allow-list in which /dev/nvmap, /dev/nvhost-* and /dev/nvgpu/* are missing, so CUDA cannot start in the
service. The check below refuses every directive that implies such a list, and runs ``systemd-analyze verify``
where systemd is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "edge-tl-serve.service"
TRUE = {"1", "yes", "true", "on"}
# The nodes CUDA/TensorRT open on a Jetson (L4T R35/R36): nvmap for memory, nvhost-* for the engines, nvgpu.
JETSON_GPU_NODES = ("/dev/nvmap", "/dev/nvhost-", "/dev/nvgpu")


def service_directives(text: str) -> list[tuple[str, str]]:
    section, out = None, []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def device_allow_list_problems(text: str) -> list[str]:
    """Every directive in ``text``'s [Service] that would hide the GPU's device nodes."""
    problems = []
    allows = []
    for key, value in service_directives(text):
        low = value.lower()
        if key == "ProtectClock" and low in TRUE:
            problems.append("ProtectClock=yes implies DeviceAllow=char-rtc r (a device allow-list)")
        elif key == "PrivateDevices" and low in TRUE:
            problems.append("PrivateDevices=yes implies DevicePolicy=closed")
        elif key == "DevicePolicy" and low in ("strict", "closed"):
            problems.append(f"DevicePolicy={value} allows only listed devices")
        elif key == "DeviceAllow" and value:
            allows.append(value.split()[0])
    if allows:
        missing = [n for n in JETSON_GPU_NODES if not any(a.startswith(n) for a in allows)]
        if missing:
            problems.append(f"DeviceAllow= ({', '.join(allows)}) makes an allow-list without {', '.join(missing)}")
    return problems


def test_the_unit_leaves_the_gpu_reachable():
    assert device_allow_list_problems(UNIT.read_text()) == []


def test_the_check_catches_each_allow_list_directive():
    base = UNIT.read_text()
    for extra, word in (("ProtectClock=yes", "ProtectClock"), ("PrivateDevices=true", "PrivateDevices"),
                        ("DevicePolicy=closed", "DevicePolicy"), ("DeviceAllow=/dev/nvmap rw", "/dev/nvhost-")):
        bad = base.replace("[Service]\n", f"[Service]\n{extra}\n")
        problems = device_allow_list_problems(bad)
        assert len(problems) == 1 and word in problems[0], (extra, problems)
    ok = base.replace("[Service]\n", "[Service]\nDeviceAllow=/dev/nvmap rw\nDeviceAllow=/dev/nvhost-ctrl rw\n"
                      "DeviceAllow=/dev/nvgpu/igpu0/ctrl rw\n")
    assert device_allow_list_problems(ok) == []


def test_the_unit_raises_the_file_limit_above_the_servers_connection_cap():
    limits = [int(v) for k, v in service_directives(UNIT.read_text()) if k == "LimitNOFILE"]
    assert limits and limits[0] >= 8192  # serve's default --max-connections (1024) plus its own files fit easily


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (apt-get install systemd)")
    # The unit's ExecStart points into the device's venv; verify the rest with an executable that exists here.
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={shutil.which('true') or '/bin/true'}", UNIT.read_text(),
                  flags=re.M)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    proc = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60,
                          check=False)
    # verify exits 0 on unknown keys and unparsable values and only prints "<unit>:<line>: ..." for them;
    # lines that don't name the unit are about the host (no systemd running in a container, say).
    complaints = [ln for ln in (proc.stdout + proc.stderr).splitlines() if f"{unit}:" in ln or f"{UNIT.name}:" in ln]
    assert complaints == [], complaints
