"""One interface for every power source: a background thread that collects timestamped samples.

A :class:`PowerSampler` is started before the work and stopped after it; ``samples`` holds
:class:`PowerSample` records (``time.monotonic_ns()`` timestamps, total and per-rail milliwatts). Sources
that can fail mid-run (a tegrastats process dying, a sensor disappearing) stop sampling and set ``lost``
to the reason; the samples taken before stay usable. A source that cannot start raises
:class:`PowerUnavailable` with the reason (no sensor, no permission, not installed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from edge_tl.core.errors import EdgeTLError

#: rails that measure the module's input power; when present they are the total (jetson_stats does the same)
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


class PowerUnavailable(EdgeTLError):
    """A power source that cannot be used here; ``problem`` says why (no sensor, no permission, ...)."""


def is_unused_rail(name: str) -> bool:
    """``NC`` (not connected) channels carry no rail: AGX Orin's second INA3221 has two of them."""
    return name.strip().upper() == "NC" or name.strip().upper().startswith("NC ")


def total_power(rails_mw: Mapping[str, float]) -> tuple[float, str]:
    """(total mW, what it is): the module input rail where there is one, else the sum of the rails."""
    for name in INPUT_RAILS:
        if name in rails_mw:
            return float(rails_mw[name]), name
    return float(sum(rails_mw.values())), "sum of rails"


@dataclass(frozen=True)
class PowerSample:
    t_ns: int  #: time.monotonic_ns() when the sample was read
    total_mw: float
    rails_mw: dict[str, float] = field(default_factory=dict)


class PowerSampler:
    """Base class: a thread calls :meth:`read` every ``1/rate_hz`` seconds (on a fixed grid, no drift).

    Subclasses implement :meth:`open` (find and open the sensors once; raise PowerUnavailable),
    :meth:`read` (one cheap reading -> rails in mW, or None to skip) and :meth:`close`. Sources that push
    their own samples (a tegrastats subprocess) override :meth:`_run` instead.
    """

    kind = "base"

    def __init__(self, rate_hz: float = 20.0):
        if not rate_hz or rate_hz <= 0:
            raise EdgeTLError(f"power sampling rate must be positive, got {rate_hz}", "pass e.g. --rate 20")
        self.rate_hz = float(rate_hz)
        self.samples: list[PowerSample] = []
        self.lost: str | None = None  #: why sampling stopped early (None while healthy)
        self.total_source: str | None = None  #: "VDD_IN", "POM_5V_IN" or "sum of rails"
        self.skipped = 0  #: readings that could not be parsed (a file caught mid-write)
        self.selection_notes: list[str] = []  #: why sources tried before this one were refused (auto)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- hooks --------------------------------------------------------------------------------------
    def open(self) -> None:
        """Find and open the sensors; raise PowerUnavailable with the reason when there are none."""

    def read(self) -> dict[str, float] | None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release what open() acquired."""

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "rate_hz": self.rate_hz}

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> PowerSampler:
        if self._thread is not None:
            raise EdgeTLError("power sampler already started", "create a new sampler for each run")
        self.open()
        self._thread = threading.Thread(target=self._run, name=f"edge-tl-power-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[PowerSample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.close()
        return self.samples

    def __enter__(self) -> PowerSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, rails_mw: dict[str, float], t_ns: int | None = None) -> None:
        total, source = total_power(rails_mw)
        self.total_source = source
        with self._lock:
            self.samples.append(PowerSample(t_ns if t_ns is not None else time.monotonic_ns(), total, rails_mw))

    def snapshot(self) -> list[PowerSample]:
        with self._lock:
            return list(self.samples)

    def _run(self) -> None:
        period_ns = int(1e9 / self.rate_hz)
        next_ns = time.monotonic_ns()
        while not self._stop.is_set():
            t = time.monotonic_ns()
            try:
                rails = self.read()
            except OSError as exc:
                self.lost = f"{self.kind} sensor read failed mid-run: {exc}"
                return
            if rails is None:
                self.skipped += 1
            else:
                self.add(rails, t)
            next_ns += period_ns
            now = time.monotonic_ns()
            if next_ns < now:  # fell behind (a stalled read): skip the missed slots, don't burst
                next_ns = now + period_ns - (now - next_ns) % period_ns
            self._stop.wait((next_ns - now) / 1e9)


class NoPower(PowerSampler):
    """No power source: results say power is unavailable, and ``reason`` says why."""

    kind = "none"

    def __init__(self, reason: str = "power measurement was turned off (--power none)"):
        super().__init__(rate_hz=1.0)
        self.reason = reason

    @property
    def available(self) -> bool:
        return False

    def start(self) -> NoPower:
        return self

    def stop(self) -> list[PowerSample]:
        return []

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "reason": self.reason}
