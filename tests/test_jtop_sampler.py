"""The jtop power source with the jtop screen already open (the service at its first client's interval), against
tests/jtop_standin.py, which enforces jetson-stats 4.2's interval and timeout rules."""

from __future__ import annotations

import threading

import jtop_standin

from edge_tl.device.power.services import JtopSampler


def test_old_fast_interval_is_lost_under_a_slower_service(monkeypatch):
    """The rule itself: a client asking 0.05 s from a service held at 0.2 s loses the source (3 x 0.05 < 0.2)."""
    jtop_standin.install(monkeypatch, service_interval=0.2)
    client = jtop_standin.jtop(interval=0.05)
    client.start()
    threading.Event().wait(0.4)
    try:
        client.ok(spin=True)
        raised = False
    except jtop_standin.JtopException:
        raised = True
    client.close()
    assert raised


def test_sampler_keeps_up_with_the_service_pace_and_says_so(monkeypatch):
    jtop_standin.install(monkeypatch, service_interval=0.1)  # the jtop screen got there first
    sampler = JtopSampler(rate_hz=20.0)  # asks for 20 Hz: jtop can't, and that must be recorded, not lost
    sampler.start()
    while len(sampler.snapshot()) < 4 and sampler.lost is None:
        threading.Event().wait(0.05)
    samples = sampler.stop()
    assert sampler.lost is None
    assert len(samples) >= 4 and all(a.t_ns < b.t_ns for a, b in zip(samples, samples[1:], strict=False))
    assert samples[0].total_mw > 4800 and sampler.total_source == "VDD_IN"
    info = sampler.describe()
    assert info["service_interval_s"] == 0.1 and info["rate_hz_asked"] == 20.0
    assert info["achieved_interval_s"] is not None and info["achieved_interval_s"] > 0.05


def test_a_dead_service_is_reported_lost(monkeypatch):
    jtop_standin.install(monkeypatch, service_interval=0.1)
    sampler = JtopSampler().start()
    sampler._jetson._error = jtop_standin.JtopException("Lost connection with jtop server")
    while sampler.running:
        threading.Event().wait(0.05)
    sampler.stop()
    assert "Lost connection" in sampler.lost
