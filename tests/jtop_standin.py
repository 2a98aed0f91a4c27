"""A stand-in for jetson-stats 4.2's ``jtop`` client and service that enforces the two rules edge-tl must live
with (jtop/service.py and jtop/jtop.py of jetson-stats 4.2):

* the service publishes at the interval of its FIRST client; a later client asking another interval is told
  "I can't set this speed" and gets the service's pace;
* a client waits ``TIMEOUT_GAIN (3) x`` its OWN requested interval for each update (``_get_data``), and when none
  comes it stores ``JtopException("Error connection")``, which ``ok()`` raises.

Updates carry a ``power`` dict shaped as 4.x's. Tests scale time down (service intervals of 0.1-0.2 s).

``Service.stale_every = k`` makes every k-th update re-deliver the previous reading: jtop's client signals its
observers on every message from the service, and a service that has not re-read the sensors sends the same values
again (the stale samples of issue 22, D8); the client cannot tell them apart except by their content.
"""

from __future__ import annotations

import importlib.machinery
import threading
import types

TIMEOUT_GAIN = 3
DEFAULT_INTERVAL = 1.0  # jetson-stats 4.2: jtop(interval=1.0)


class JtopException(Exception):
    pass


class Service:
    def __init__(self) -> None:
        self.interval: float | None = None
        self.clients = 0
        self.stale_every = 0  # 0: every update is a fresh reading

    def connect(self, asked: float) -> float:
        if self.interval is None:  # the first client sets the pace
            self.interval = asked
        self.clients += 1
        return self.interval


SERVICE = Service()


class jtop:  # noqa: N801 - the library's name
    def __init__(self, interval: float = DEFAULT_INTERVAL):
        self._interval = float(interval)
        self._observers: set = set()
        self._error: Exception | None = None
        self._running = False
        self._trigger = threading.Event()
        self._n = 0
        self._n_updates = 0
        self.power: dict = {}

    def attach(self, observer) -> None:
        self._observers.add(observer)

    def detach(self, observer) -> None:
        self._observers.discard(observer)

    @property
    def interval(self) -> float:
        return self._server_interval

    def start(self) -> None:
        self._server_interval = SERVICE.connect(self._interval)
        # jtop.start() waits for the first data and hands it to the observers before its reader thread starts
        # (jetson-stats 4.2 jtop/jtop.py: start() -> _get_data() -> observers)
        self._update()
        self._running = True
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        while self._running:
            # the service's next update comes after its interval; the client waits 3x its own interval
            if self._server_interval > self._interval * TIMEOUT_GAIN:
                threading.Event().wait(self._interval * TIMEOUT_GAIN)
                self._error = JtopException("Error connection")
                self._running = False
                return
            threading.Event().wait(self._server_interval)
            self._update()

    def _update(self) -> None:
        stale = SERVICE.stale_every and self._n and (self._n_updates + 1) % SERVICE.stale_every == 0
        self._n_updates += 1
        if not stale:
            self._n += 1
        self.power = {"rail": {"VDD_CPU_GPU_CV": {"power": 500.0 + self._n}}, "tot": {"name": "VDD_IN",
                                                                                     "power": 4800.0 + self._n}}
        self._trigger.set()
        for obs in list(self._observers):
            obs(self)

    def ok(self, spin: bool = False) -> bool:
        if not spin and not self._trigger.wait(self._interval * TIMEOUT_GAIN):
            self._running = False
        if self._error is not None:
            raise self._error
        self._trigger.clear()
        return self._running

    def close(self) -> None:
        self._running = False


def install(monkeypatch, service_interval: float | None = None) -> Service:
    """Put the stand-in in sys.modules; ``service_interval``: a client (the jtop screen) already connected."""
    import sys

    global SERVICE
    SERVICE = Service()
    if service_interval is not None:
        SERVICE.connect(service_interval)
    mod = types.ModuleType("jtop")
    mod.__spec__ = importlib.machinery.ModuleSpec("jtop", None)
    mod.jtop, mod.JtopException = jtop, JtopException
    monkeypatch.setitem(sys.modules, "jtop", mod)
    return SERVICE
