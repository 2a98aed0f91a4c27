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


def test_stale_redeliveries_are_dropped_not_counted_as_samples(monkeypatch):
    """A slow service re-sends its last reading with a fresh arrival time (issue 22, D8): those are not samples."""
    service = jtop_standin.install(monkeypatch, service_interval=0.05)
    service.stale_every = 2  # every second update repeats the previous one
    sampler = JtopSampler().start()
    while sampler.repeats < 3 and sampler.lost is None:
        threading.Event().wait(0.05)
    samples = sampler.stop()
    assert sampler.lost is None and sampler.repeats >= 3
    totals = [s.total_mw for s in samples]
    assert len(totals) >= 3 and all(a != b for a, b in zip(totals, totals[1:], strict=False))
    assert sampler.describe()["stale_repeats_dropped"] == sampler.repeats


def test_stop_brackets_the_window_with_a_reading_after_it(monkeypatch):
    """The energy integral must cover the end of the last timed window: stop() waits for one fresh reading taken
    after it was called (at most 3 service intervals), as bench's start() waits for the first."""
    import time

    jtop_standin.install(monkeypatch, service_interval=0.2)
    sampler = JtopSampler().start()
    while not sampler.snapshot() and sampler.lost is None:
        threading.Event().wait(0.01)
    threading.Event().wait(0.05)  # mid-interval: the last reading is older than the end of the window
    end_of_window = time.monotonic_ns()
    samples = sampler.stop()
    assert sampler.lost is None
    assert samples[-1].t_ns >= end_of_window


def test_the_first_update_arrives_inside_start(monkeypatch):
    """Real jtop hands its first data to the observers inside start(), before its reader thread runs: the sampler
    must take it (it is attached before start)."""
    jtop_standin.install(monkeypatch, service_interval=0.5)
    sampler = JtopSampler().start()
    assert len(sampler.snapshot()) >= 1  # without waiting a service interval
    sampler.stop()
