"""tegrastats: the public line parser and a sampler that runs ``tegrastats --interval MS``.

``parse_tegrastats(line)`` reads every published form of the rails:

- JetPack 4 and older: ``POM_5V_IN 4122/3107`` (current/average, mW without a unit);
- JetPack 5/6: ``VDD_IN 4824mW/4824mW``;
- JetPack 7: ``VDD_GPU_SOC 5139mW/5139mW/5139mW`` (three values; the first two as before).

Every field of a tegrastats line is optional (tegrastats run without root prints no rails): missing
fields give empty dicts / None, never an error. ``NC`` (unconnected) channels are dropped.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from edge_tl.device.power.base import PowerSampler, PowerUnavailable, is_unused_rail, total_power

_RAIL_RE = re.compile(
    r"(?<![\w/])([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?(?=\s|$)")
_TIME_RE = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\b")
_TEMP_RE = re.compile(r"(?<![\w%])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C(?:/(-?\d+(?:\.\d+)?)C)?(?=\s|$)")
_RAM_RE = re.compile(r"\bRAM (\d+)/(\d+)MB")
_CPU_RE = re.compile(r"\bCPU \[([^\]]*)\]")
_GPU_RE = re.compile(r"\bGR3D_FREQ (\d+)%")
_EMC_RE = re.compile(r"\bEMC_FREQ (\d+)%")
_OFFLINE_TEMP = -256.0  # tegrastats prints -256C for a thermal zone that is switched off


@dataclass
class TegrastatsSample:
    """One parsed tegrastats line. Power in mW, temperatures in degrees C."""

    timestamp: dt.datetime | None = None  #: the line's own clock (JetPack 5+ prints it), else None
    rails_mw: dict[str, int] = field(default_factory=dict)  #: current value per rail
    rails_avg_mw: dict[str, int] = field(default_factory=dict)  #: tegrastats' running average per rail
    rails_max_mw: dict[str, int] = field(default_factory=dict)  #: JetPack 7's third value (empty before)
    total_mw: float | None = None  #: the input rail (VDD_IN / POM_5V_IN) if present, else the sum; None: no rails
    total_source: str | None = None  #: which rail the total is, or "sum of rails"
    temps_c: dict[str, float] = field(default_factory=dict)  #: zones that are on (-256C zones dropped)
    cpu_load_pct: list[int | None] = field(default_factory=list)  #: per core; None for an offline core
    gpu_load_pct: int | None = None
    emc_load_pct: int | None = None
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None

    def __getitem__(self, key: str):  # dict-style access: sample["rails_mw"]
        return getattr(self, key)


def parse_tegrastats(line: str) -> TegrastatsSample:
    """Parse one tegrastats output line (any JetPack). Never raises on missing fields."""
    s = TegrastatsSample()
    m = _TIME_RE.match(line)
    if m:
        try:
            s.timestamp = dt.datetime.strptime(m.group(1), "%m-%d-%Y %H:%M:%S")
        except ValueError:
            s.timestamp = None
    for name, cur, avg, third in _RAIL_RE.findall(line):
        if is_unused_rail(name):
            continue
        s.rails_mw[name] = int(cur)
        s.rails_avg_mw[name] = int(avg)
        if third:
            s.rails_max_mw[name] = int(third)
    if s.rails_mw:
        s.total_mw, s.total_source = total_power(s.rails_mw)
    for name, cur, _avg in _TEMP_RE.findall(line):
        value = float(cur)
        if value != _OFFLINE_TEMP:
            s.temps_c[name] = value
    m = _CPU_RE.search(line)
    if m:
        for core in m.group(1).split(","):
            pct = re.match(r"\s*(\d+)%", core)
            s.cpu_load_pct.append(int(pct.group(1)) if pct else None)
    if m := _GPU_RE.search(line):
        s.gpu_load_pct = int(m.group(1))
    if m := _EMC_RE.search(line):
        s.emc_load_pct = int(m.group(1))
    if m := _RAM_RE.search(line):
        s.ram_used_mb, s.ram_total_mb = int(m.group(1)), int(m.group(2))
    return s


class TegrastatsSampler(PowerSampler):
    """Runs ``tegrastats --interval MS`` and parses its lines as they come (timestamped on arrival).

    ``start()`` waits for the first line and refuses (PowerUnavailable) when tegrastats is missing, exits,
    or prints no rails (it needs root on most boards). If the process dies later, ``lost`` says so and
    the samples taken until then are kept.
    """

    kind = "tegrastats"

    def __init__(self, interval_ms: int = 50, executable: str = "tegrastats", first_line_timeout_s: float = 5.0):
        if interval_ms <= 0:
            raise PowerUnavailable(f"tegrastats interval must be positive, got {interval_ms} ms", "pass --interval 50")
        super().__init__(rate_hz=1000.0 / interval_ms)
        self.interval_ms = int(interval_ms)
        self.executable = executable
        self.first_line_timeout_s = first_line_timeout_s
        self.proc: subprocess.Popen | None = None
        self._stderr: deque[str] = deque(maxlen=5)
        self._first = threading.Event()
        self._first_error: str | None = None

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "rate_hz": self.rate_hz, "interval_ms": self.interval_ms,
                "executable": self.executable}

    def open(self) -> None:
        exe = shutil.which(self.executable)
        if exe is None:
            raise PowerUnavailable(f"'{self.executable}' was not found on PATH (it ships with JetPack's L4T)",
                                   "run on a Jetson, or choose another --power source")
        try:
            self.proc = subprocess.Popen([exe, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, bufsize=1)
        except OSError as exc:
            raise PowerUnavailable(f"could not start {exe}: {exc}", "check it is executable") from exc
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def start(self) -> TegrastatsSampler:
        super().start()
        if not self._first.wait(self.first_line_timeout_s):
            self._first_error = f"tegrastats printed nothing in {self.first_line_timeout_s:.0f} s"
        if self._first_error:
            self.stop()
            raise PowerUnavailable(self._first_error, "run edge-tl as root (sudo) or choose another --power source")
        return self

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr if self.proc and self.proc.stderr else ():
            if line.strip():
                self._stderr.append(line.strip())

    def _run(self) -> None:
        if self.proc is None or self.proc.stdout is None:
            return
        for line in self.proc.stdout:
            t = time.monotonic_ns()
            if self._stop.is_set():
                break
            sample = parse_tegrastats(line)
            if not sample.rails_mw:
                if not self._first.is_set():
                    self._first_error = "tegrastats prints no power rails here (it needs root on most Jetsons)"
                    self._first.set()
                    return
                self.skipped += 1
                continue
            self.add({k: float(v) for k, v in sample.rails_mw.items()}, t)
            self._first.set()
        if self._stop.is_set():
            return
        code = self.proc.wait()
        why = f"tegrastats exited with code {code} mid-run"
        if self._stderr:
            why += f" ({self._stderr[-1]})"
        if not self._first.is_set():
            self._first_error = why.replace(" mid-run", " before printing a line")
            self._first.set()
        else:
            self.lost = why

    def stop(self):
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for stream in (self.proc.stdout, self.proc.stderr) if self.proc else ():
            if stream:
                try:
                    stream.close()
                except OSError:
                    pass
        return self.samples

