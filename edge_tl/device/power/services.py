"""Power from services and libraries: jetson-stats' jtop service, and NVML for discrete GPUs.

Both are optional packages imported lazily. jtop's own ``avg`` is a running blend of two readings, not a
time average, so only its instantaneous ``power`` values are kept; energy is integrated by edge-tl.
NVML reports no power on Jetson (use the INA3221 monitors, tegrastats or jtop there).
"""

from __future__ import annotations

import threading
import time

from edge_tl.core.importer import has_module, require
from edge_tl.device.power.base import PowerSampler, PowerUnavailable


class JtopSampler(PowerSampler):
    """Power from the jtop service, at the interval the service really publishes.

    jetson-stats 4.2 (``jtop/service.py``, ``jtop/jtop.py``): the service runs at the interval of its *first*
    client (later clients get "I can't set this speed"), and a client waits ``3 x`` *its own* requested interval
    for each update before it gives up ("Error connection"). Asking for 0.05 s while the jtop screen holds the
    service at 0.5-1 s therefore loses the source after one sample. So the client is created with jtop's own
    default interval, every sample is recorded when jtop delivers it (an observer, ``jtop.attach``) with that
    moment's timestamp, and ``describe()`` says which interval the service ran at and what was achieved.
    ``rate_hz`` is only what was asked for (it can't make jtop faster)."""

    kind = "jtop"

    def __init__(self, rate_hz: float = 20.0):
        super().__init__(rate_hz)
        self._jetson = None
        self.service_interval_s: float | None = None
        self.repeats = 0  # updates that re-delivered the previous reading (stale data, fresh timestamp): dropped
        self._last: dict[str, float] | None = None
        self._fresh = threading.Event()

    def open(self) -> None:
        if not has_module("jtop"):
            raise PowerUnavailable("jetson-stats (jtop) is not installed", "pip install 'edge-tl[jetson]'")
        jtop = require("jtop", "power readings from the jtop service")
        try:
            self._jetson = jtop.jtop()  # jtop's own interval: the one its timeouts are made for
            self._jetson.attach(self._on_sample)
            self._jetson.start()
        except Exception as exc:  # JtopException: the jtop.service is not running / not reachable
            self._jetson = None
            raise PowerUnavailable(f"the jtop service is not reachable: {exc}",
                                   "sudo systemctl restart jtop.service (and add the user to the jtop group)") from exc
        interval = getattr(self._jetson, "interval", None)
        self.service_interval_s = float(interval) if interval else None

    @staticmethod
    def rails_from(power: dict) -> dict[str, float]:
        """Rails in mW from jtop's ``power`` dict (its input rail sits under ``tot`` with a ``name``)."""
        rails = {name: float(v["power"]) for name, v in (power.get("rail") or {}).items() if "power" in v}
        tot = power.get("tot") or {}
        if tot.get("name") and "power" in tot:
            rails[tot["name"]] = float(tot["power"])
        return rails

    def _on_sample(self, jetson) -> None:
        """jtop's observer: called on its reader thread as each update arrives."""
        if self._stop.is_set():
            return
        t = time.monotonic_ns()
        try:
            rails = self.rails_from(jetson.power)
        except Exception:  # a malformed update: skip it, as a file caught mid-write is skipped
            self.skipped += 1
            return
        if not rails:
            self.skipped += 1
        elif rails == self._last:  # a slow service re-delivers its last reading with a fresh time: not a sample
            self.repeats += 1
        else:
            self._last = rails
            self.add(rails, t)
            self._fresh.set()

    def stop(self) -> list:
        """Bracket the window: wait (up to 3 service intervals) for one fresh reading after the stop was asked, so
        the energy integral covers the end of the last timed window (issue 22, D8), then stop."""
        if self._jetson is not None and self.lost is None and not self._stop.is_set():
            self._fresh.clear()
            self._fresh.wait(3 * (self.service_interval_s or 1.0))
        return super().stop()

    def _run(self) -> None:
        jetson = self._jetson
        while not self._stop.wait(0.1):
            try:
                alive = jetson.ok(spin=True)  # raises what jtop's reader thread hit (a lost service)
            except Exception as exc:
                self.lost = f"jtop failed mid-run: {exc}"
                return
            if not alive:
                self.lost = "the jtop service stopped publishing mid-run"
                return

    def achieved_interval_s(self) -> float | None:
        """Median time between the samples jtop delivered."""
        ts = [s.t_ns for s in self.snapshot()]
        if len(ts) < 2:
            return None
        gaps = sorted(b - a for a, b in zip(ts, ts[1:], strict=False))
        return gaps[len(gaps) // 2] / 1e9

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "rate_hz_asked": self.rate_hz, "service_interval_s": self.service_interval_s,
                "achieved_interval_s": self.achieved_interval_s(), "stale_repeats_dropped": self.repeats,
                "note": "jtop publishes at its service's interval (set by its first client); rate_hz can't change it"}

    def close(self) -> None:
        if self._jetson is not None:
            try:
                self._jetson.detach(self._on_sample)
                self._jetson.close()
            except Exception:  # closing a dead connection: nothing left to release
                pass
            self._jetson = None


class NvmlSampler(PowerSampler):
    """GPU board power from NVML (``nvmlDeviceGetPowerUsage``, mW) for a discrete NVIDIA GPU."""

    kind = "nvml"

    def __init__(self, index: int = 0, rate_hz: float = 20.0):
        super().__init__(rate_hz)
        self.index = index
        self._nvml = None
        self._handle = None
        self.gpu_name: str | None = None

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "rate_hz": self.rate_hz, "gpu_index": self.index, "gpu": self.gpu_name}

    def open(self) -> None:
        if not has_module("pynvml"):
            raise PowerUnavailable("pynvml (nvidia-ml-py) is not installed", "pip install nvidia-ml-py")
        nvml = require("pynvml", "GPU power from NVML")
        try:
            nvml.nvmlInit()
            self._nvml = nvml
            self._handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
            name = nvml.nvmlDeviceGetName(self._handle)
            self.gpu_name = name.decode() if isinstance(name, bytes) else str(name)
            nvml.nvmlDeviceGetPowerUsage(self._handle)
        except Exception as exc:  # NVMLError_*: no driver, no GPU, or power not supported (Jetson)
            self.close()
            raise PowerUnavailable(f"NVML gives no power reading here: {exc}",
                                   "on a Jetson choose --power ina3221, tegrastats or jtop") from exc

    def read(self) -> dict[str, float] | None:
        try:
            return {f"GPU{self.index}": float(self._nvml.nvmlDeviceGetPowerUsage(self._handle))}
        except Exception as exc:  # NVMLError: surface as a lost source
            raise OSError(f"NVML power read failed: {exc}") from exc

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # already shut down
                pass
            self._nvml = None
