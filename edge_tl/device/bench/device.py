"""Device state recorded with every result, and ``--lock-clocks`` with a guaranteed restore.

Every file is read under a ``root`` (tests point it at a built tree) and every tool (``nvpmodel``,
``jetson_clocks``) is looked up on PATH (tests put small executables there that print recorded output).
"""

from __future__ import annotations

import contextlib
import json
import platform
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from edge_tl import __version__
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.importer import has_module, require
from edge_tl.device.bench.schema import DeviceState
from edge_tl.device.facts import board as devicefacts

_POWER_MODE_RE = re.compile(r"NV Power Mode:\s*(\S.*?)\s*$", re.M)
_FREQ_RE = re.compile(r"^(cpu\d+|GPU)\b.*?MinFreq=(\d+)\s+MaxFreq=(\d+)(?:\s+CurrentFreq=(\d+))?", re.M)


def _run(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def read_temperatures(root: str | Path = "/") -> dict[str, float]:
    """Thermal zones from ``sys/devices/virtual/thermal/thermal_zone*/{type,temp}`` (millidegrees -> C)."""
    temps: dict[str, float] = {}
    zones = sorted(Path(root).glob("sys/devices/virtual/thermal/thermal_zone*"),
                   key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    for zone in zones:
        try:
            name = (zone / "type").read_text().strip() or zone.name
            milli = int((zone / "temp").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if milli <= -256000:  # a zone that is switched off
            continue
        temps[name if name not in temps else f"{name}.{zone.name}"] = milli / 1000.0
    return temps


def parse_nvpmodel(text: str) -> tuple[str | None, int | None]:
    """(mode name, mode id) from ``nvpmodel -q``: 'NV Power Mode: MAXN' then the id on the next line."""
    m = _POWER_MODE_RE.search(text)
    if not m:
        return None, None
    rest = text[m.end():].split()
    return m.group(1), (int(rest[0]) if rest and rest[0].isdigit() else None)


def parse_clocks(text: str) -> tuple[bool | None, str]:
    """(locked?, detail) from ``jetson_clocks --show``: locked when every CPU and the GPU run min == max."""
    rows = _FREQ_RE.findall(text)
    if not rows:
        return None, "no CPU/GPU clock lines in jetson_clocks --show"
    unlocked = [name for name, lo, hi, _cur in rows if lo != hi]
    if unlocked:
        return False, f"min != max clock on {', '.join(unlocked[:4])}{' ...' if len(unlocked) > 4 else ''}"
    return True, f"min == max clock on {len(rows)} CPU/GPU domain(s)"


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def software_versions(root: str | Path = "/") -> dict[str, str | None]:
    """TensorRT, CUDA, ONNX Runtime, NumPy, Python and edge-tl versions (None: not installed)."""
    trt = _dist_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_lean")
    if trt is None and has_module("tensorrt"):
        try:  # JetPack's python3-libnvinfer has no dist-info: ask the module
            trt = getattr(require("tensorrt", "recording the TensorRT version"), "__version__", None)
        except Exception:  # a broken install must not stop a benchmark
            trt = None
    cuda = None
    vjson = Path(root) / "usr/local/cuda/version.json"
    vtxt = Path(root) / "usr/local/cuda/version.txt"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cuda = json.loads(vjson.read_text())["cuda"]["version"]
    if cuda is None:
        with contextlib.suppress(OSError):
            m = re.search(r"(\d+\.\d+(?:\.\d+)?)", vtxt.read_text())
            cuda = m.group(1) if m else None
    return {"tensorrt": trt, "cuda": cuda, "onnxruntime": _dist_version("onnxruntime", "onnxruntime-gpu"),
            "numpy": _dist_version("numpy"), "python": platform.python_version(), "edge_tl": __version__}


def _cpu_name(root: Path) -> str | None:
    with contextlib.suppress(OSError):
        for line in (root / "proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or None


def collect_device_state(root: str | Path = "/", *, nvpmodel: str = "nvpmodel",
                         jetson_clocks: str = "jetson_clocks") -> DeviceState:
    """What the device is and how it is set up now (module, L4T/JetPack, power mode, clocks, versions)."""
    root = Path(root)
    l4t = devicefacts.l4t_release(root)
    state = DeviceState(hostname=socket.gethostname(), platform=f"{platform.system()} {platform.release()}",
                        machine=platform.machine(), cpu=_cpu_name(root), jetson_model=devicefacts.jetson_model(root),
                        l4t=l4t, jetpack=devicefacts.jetpack_version(l4t), versions=software_versions(root),
                        temps_start_c=read_temperatures(root))
    exe = shutil.which(nvpmodel)
    if exe:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            state.nvpmodel, state.nvpmodel_id = parse_nvpmodel(_run([exe, "-q"]).stdout)
    exe = shutil.which(jetson_clocks)
    if exe:
        try:
            proc = _run([exe, "--show"])
            state.clocks_locked, state.clocks_detail = parse_clocks(proc.stdout)
            if proc.returncode != 0 and state.clocks_locked is None:
                state.clocks_detail = f"jetson_clocks --show failed: {(proc.stderr or proc.stdout).strip()[:200]}"
        except (OSError, subprocess.SubprocessError) as exc:
            state.clocks_detail = f"jetson_clocks --show failed: {exc}"
    else:
        state.clocks_detail = "jetson_clocks not found (not a Jetson): clock state unknown"
    return state


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise EdgeTLError(f"{what} failed (exit {proc.returncode}): {msg[-1] if msg else 'no output'}",
                          "run edge-tl as root (sudo) for --lock-clocks, or drop --lock-clocks")


@contextlib.contextmanager
def locked_clocks(state: DeviceState | None = None, executable: str = "jetson_clocks") -> Iterator[None]:
    """Store the clock state (``jetson_clocks --store``), lock clocks (``jetson_clocks``), and always restore
    it (``jetson_clocks --restore``) on exit: normal, exception or Ctrl-C. A second Ctrl-C during the restore
    is ignored so the restore completes. Sets ``state.lock_clocks`` / ``state.clocks_restored``."""
    exe = shutil.which(executable)
    if exe is None:
        raise EdgeTLError(f"--lock-clocks needs '{executable}', which is not on PATH",
                          "run on a Jetson (jetson_clocks ships with L4T), or drop --lock-clocks")
    td = tempfile.mkdtemp(prefix="edge-tl-clocks-")
    store = str(Path(td) / "l4t_dfs.conf")
    try:
        _check(_run([exe, "--store", store]), "jetson_clocks --store")
    except BaseException:
        shutil.rmtree(td, ignore_errors=True)
        raise
    if state is not None:
        state.lock_clocks = True
    try:
        _check(_run([exe]), "jetson_clocks")
        yield
    finally:
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            proc = _run([exe, "--restore", store])
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        if state is not None:
            state.clocks_restored = proc.returncode == 0
        if proc.returncode != 0:  # keep the stored state so the user can restore it by hand
            raise EdgeTLError(f"jetson_clocks --restore failed: {(proc.stderr or proc.stdout).strip()[:200]}",
                              f"restore the clocks by hand: sudo jetson_clocks --restore {store}")
        shutil.rmtree(td, ignore_errors=True)
