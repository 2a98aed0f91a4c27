"""The measurement loop: warm-up, then a fixed count or a duration of timed ``runner.infer`` calls.

Each iteration is timed with ``time.perf_counter_ns`` (monotonic, nanoseconds) around ``runner.infer``,
which is synchronous for every backend (GPU runners synchronise their stream inside it), so a latency
covers host-to-device copies, compute and device-to-host copies. Nothing else runs inside the timed span.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edge_tl.core.errors import EdgeTLError
from edge_tl.device.bench.schema import LatencyStats
from edge_tl.device.runtime.base import BaseRunner


@dataclass
class Timings:
    """One measured loop: per-iteration latencies and where the loop sat on the monotonic clock."""

    latencies_ns: np.ndarray  #: int64, one per iteration
    starts_ns: np.ndarray  #: perf_counter_ns at each iteration's start
    t0_mono_ns: int  #: time.monotonic_ns() just before the first timed call (for the power trace)
    t1_mono_ns: int  #: time.monotonic_ns() just after the last one
    wall_ns: int  #: perf_counter_ns from the first start to the last end
    warmup_iterations: int
    #: per iteration, the part of the latency spent handing the feed to the runner's owning thread and back (the
    #: TensorRT runner's ``last_handoff_ns``); None for runners that compute on the calling thread (issue 22, D7)
    handoff_ns: np.ndarray | None = None


def latency_stats(latencies_ns: np.ndarray) -> LatencyStats:
    """min/mean/median/p90/p95/p99/max/std in milliseconds (percentiles: linear interpolation)."""
    ms = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    if ms.size == 0:
        return LatencyStats(count=0)
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return LatencyStats(count=int(ms.size), min=float(ms.min()), mean=float(ms.mean()), median=float(p50),
                        p90=float(p90), p95=float(p95), p99=float(p99), max=float(ms.max()), std=float(ms.std()))


def validate_plan(iterations: int | None, duration_s: float | None, warmup: int | None,
                  warmup_seconds: float | None) -> None:
    for flag, value in (("--duration", duration_s), ("--warmup-seconds", warmup_seconds)):
        if value is not None and not math.isfinite(value):
            raise EdgeTLError(f"{flag} must be a finite number of seconds, got {value}", f"pass e.g. {flag} 10")
    if iterations is not None and duration_s is not None:
        raise EdgeTLError("give either --iterations or --duration, not both", "pick one way to end the run")
    if iterations is not None and iterations < 1:
        raise EdgeTLError(f"--iterations must be at least 1, got {iterations}", "pass e.g. --iterations 200")
    if duration_s is not None and duration_s <= 0:
        raise EdgeTLError(f"--duration must be positive, got {duration_s}", "pass e.g. --duration 10")
    if warmup is not None and warmup_seconds is not None:
        raise EdgeTLError("give either --warmup or --warmup-seconds, not both", "pick one way to warm up")
    if (warmup is not None and warmup < 0) or (warmup_seconds is not None and warmup_seconds < 0):
        raise EdgeTLError("warm-up must not be negative", "pass --warmup 50 or --warmup-seconds 2")


def measure(runner: BaseRunner, feed: Mapping[str, np.ndarray], *, iterations: int | None = 200,
            duration_s: float | None = None, warmup: int | None = 50, warmup_seconds: float | None = None,
            on_progress: Callable[[int], None] | None = None) -> Timings:
    """Warm up, then time ``iterations`` calls (or as many as fit in ``duration_s``) of ``runner.infer``.

    ``on_progress(i)`` is called between iterations (outside the timed span), at most every 1/10 s.
    """
    if iterations is None and duration_s is None:
        iterations = 200
    validate_plan(iterations, duration_s, warmup, warmup_seconds)
    feed = dict(feed)
    infer = runner.infer
    clock = time.perf_counter_ns
    n_warm = 0
    if warmup_seconds is not None:
        end = clock() + int(warmup_seconds * 1e9)
        while clock() < end or n_warm == 0:
            infer(feed)
            n_warm += 1
    else:
        for _ in range(warmup or 0):
            infer(feed)
        n_warm = warmup or 0

    cap = iterations if iterations is not None else 1 << 20
    lat = np.empty(min(cap, 1 << 16), dtype=np.int64)
    starts = np.empty_like(lat)
    deadline = None if duration_s is None else clock() + int(duration_s * 1e9)
    next_report = clock() + 100_000_000
    n = 0
    handed = hasattr(runner, "last_handoff_ns")
    hand = np.zeros_like(lat)
    t0_mono = time.monotonic_ns()
    while n < cap:
        t0 = clock()
        infer(feed)
        t1 = clock()
        if n == lat.size:
            lat, starts, hand = np.resize(lat, 2 * n), np.resize(starts, 2 * n), np.resize(hand, 2 * n)
        lat[n], starts[n] = t1 - t0, t0
        if handed:  # outside the timed span
            hand[n] = runner.last_handoff_ns
        n += 1
        if deadline is not None and t1 >= deadline:
            break
        if on_progress is not None and t1 >= next_report:
            on_progress(n)
            next_report = t1 + 100_000_000
    t1_mono = time.monotonic_ns()
    lat, starts = lat[:n].copy(), starts[:n].copy()
    wall = int(starts[-1] + lat[-1] - starts[0])
    if on_progress is not None:
        on_progress(n)
    return Timings(lat, starts, t0_mono, t1_mono, wall, n_warm, hand[:n].copy() if handed else None)
