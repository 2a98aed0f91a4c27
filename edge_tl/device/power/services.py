"""Power from services and libraries: jetson-stats' jtop service, and NVML for discrete GPUs.

Both are optional packages imported lazily. jtop's own ``avg`` is a running blend of two readings, not a
time average, so only its instantaneous ``power`` values are kept; energy is integrated by edge-tl.
NVML reports no power on Jetson (use the INA3221 monitors, tegrastats or jtop there).
"""

from __future__ import annotations

import time

from edge_tl.core.importer import has_module, require
from edge_tl.device.power.base import PowerSampler, PowerUnavailable


class JtopSampler(PowerSampler):
    """Reads ``jtop().power`` each time the jtop service publishes (its interval; asks for ``1/rate_hz``)."""

    kind = "jtop"

    def __init__(self, rate_hz: float = 20.0):
        super().__init__(rate_hz)
        self._jetson = None

    def open(self) -> None:
        if not has_module("jtop"):
            raise PowerUnavailable("jetson-stats (jtop) is not installed", "pip install 'edge-tl[jetson]'")
        jtop = require("jtop", "power readings from the jtop service")
        try:
            self._jetson = jtop.jtop(interval=max(1.0 / self.rate_hz, 0.01))
            self._jetson.start()
        except Exception as exc:  # JtopException: the jtop.service is not running / not reachable
            raise PowerUnavailable(f"the jtop service is not reachable: {exc}",
                                   "sudo systemctl restart jtop.service (and add the user to the jtop group)") from exc

    @staticmethod
    def rails_from(power: dict) -> dict[str, float]:
        """Rails in mW from jtop's ``power`` dict (its input rail sits under ``tot`` with a ``name``)."""
        rails = {name: float(v["power"]) for name, v in (power.get("rail") or {}).items() if "power" in v}
        tot = power.get("tot") or {}
        if tot.get("name") and "power" in tot:
            rails[tot["name"]] = float(tot["power"])
        return rails

    def _run(self) -> None:
        jetson = self._jetson
        while not self._stop.is_set():
            try:
                if not jetson.ok():
                    self.lost = "the jtop service stopped publishing mid-run"
                    return
                rails = self.rails_from(jetson.power)
            except Exception as exc:  # the service went away
                self.lost = f"jtop failed mid-run: {exc}"
                return
            if rails:
                self.add(rails, time.monotonic_ns())

    def close(self) -> None:
        if self._jetson is not None:
            try:
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
