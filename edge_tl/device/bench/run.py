"""``run_bench``: one benchmark run from options to a :class:`BenchResult` (and its files).

Order of a run: record the device state; lock clocks if asked (restored on every exit path); activate the
runner (load the model / engine); start the power sampler; take the idle baseline; then for each repeat,
for each batch size (so repeats interleave and drift cancels): warm up and measure. Ctrl-C keeps what
finished and returns it marked ``interrupted`` (the CLI writes it, then exits 130).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_tl.core.bundle import Bundle, utc_now
from edge_tl.core.errors import EdgeTLError
from edge_tl.device.bench.device import collect_device_state
from edge_tl.device.bench.energy import batch_power, build_power
from edge_tl.device.bench.loop import Timings, latency_stats, measure, validate_plan
from edge_tl.device.bench.schema import BatchResult, BenchResult, ModelInfo
from edge_tl.device.engine.cache import EngineCache
from edge_tl.device.facts import DeviceFacts
from edge_tl.device.power import NoPower
from edge_tl.device.runners import create_runner, model_kind
from edge_tl.device.runtime.base import BaseRunner


@dataclass
class BenchConfig:
    model: str | Path  #: bundle folder or .tar.gz, .onnx, a TensorRT .engine/.plan, or a PyTorch .pt2
    backend: str = "auto"
    precision: str | None = None
    batches: list[int] = field(default_factory=lambda: [1])
    warmup: int | None = 50
    warmup_seconds: float | None = None
    iterations: int | None = None  #: default 200 when neither iterations nor duration_s is given
    duration_s: float | None = None
    repeat: int = 1
    data: str | None = None  #: golden (default for bundles) | random (default for model files)
    power: str = "auto"
    root: str | Path = "/"  #: where the device's files are read (sysfs, /proc, /etc): facts and power
    rate_hz: float = 20.0
    interval_ms: int | None = None  #: tegrastats --interval (default 1000/rate_hz)
    idle_seconds: float = 2.0
    lock_clocks: bool = False
    threads: int | None = None
    engine_dir: str | Path | None = None
    build_engine: bool = True
    seed: int = 0
    label: str | None = None

    def validate(self) -> None:
        """Raise an EdgeTLError naming the first option that cannot work (before anything is loaded)."""
        validate_plan(self.iterations, self.duration_s, self.warmup, self.warmup_seconds)
        if not self.batches or any(b < 1 for b in self.batches):
            raise EdgeTLError(f"batch sizes must be positive integers, got {self.batches}", "pass e.g. --batch 1,8,32")
        if self.repeat < 1:
            raise EdgeTLError(f"--repeat must be at least 1, got {self.repeat}", "pass --repeat 3")
        for flag, value in (("--rate", self.rate_hz), ("--idle-seconds", self.idle_seconds)):
            if not math.isfinite(value) or value < 0 or (flag == "--rate" and value == 0):
                raise EdgeTLError(f"{flag} must be a finite, {'positive' if flag == '--rate' else 'non-negative'} "
                                  f"number, got {value}", "pass --rate 20 and --idle-seconds 2 (0 skips the baseline)")
        if self.interval_ms is not None and self.interval_ms < 1:
            raise EdgeTLError(f"--interval must be at least 1 ms, got {self.interval_ms}", "pass e.g. --interval 50")
        if self.idle_seconds < 0:
            raise EdgeTLError("--idle-seconds must not be negative", "pass --idle-seconds 2 (0 skips the baseline)")
        if self.data not in (None, "golden", "random"):
            raise EdgeTLError(f"unknown --data '{self.data}'", "choose golden or random")


def make_runner(cfg: BenchConfig) -> tuple[BaseRunner, Bundle | None, str | None]:
    """(runner, bundle or None, precision) for the config's model and backend (not yet activated)."""
    path = Path(cfg.model)
    if not path.exists():
        raise EdgeTLError(f"model {path} does not exist", "give a bundle folder or .tar.gz, an .onnx or an .engine")
    bundle = Bundle.open(path) if model_kind(path) == "bundle" else None
    runner = create_runner(bundle or path, backend=cfg.backend, precision=cfg.precision, threads=cfg.threads,
                           engines=EngineCache(cfg.engine_dir, build=cfg.build_engine))
    precision = cfg.precision or (bundle.manifest.default_precision if bundle else None)
    if precision is None and model_kind(path) != "engine":  # an engine's precision is inside it
        precision = "int8" if path.name.endswith(".int8.onnx") else "fp32"
    return runner, bundle, precision


def make_feed(runner: BaseRunner, bundle: Bundle | None, batch: int, data: str, seed: int) -> dict[str, np.ndarray]:
    """One batch: the bundle's golden inputs tiled to ``batch``, or random data of the model's input shape."""
    metas = runner.get_input_metadata()
    if len(metas) != 1:
        raise EdgeTLError(f"the model has {len(metas)} inputs; edge-tl bench feeds one-input image models",
                          "bench a model with a single image input")
    meta = metas[0]
    if data == "golden":
        if bundle is None:
            raise EdgeTLError("--data golden needs a bundle (a bare model file has no golden inputs)",
                              "pass the bundle, or --data random")
        golden = bundle.golden_inputs()
        return {meta.name: np.ascontiguousarray(golden[np.arange(batch) % len(golden)])}
    if bundle is not None:
        shape = (batch, *bundle.preprocess.input_shape)
    else:
        dims = list(meta.shape[1:])
        if any(not isinstance(d, int) for d in dims):
            raise EdgeTLError(f"input {meta.name} has dynamic dimensions {meta.shape}", "bench the bundle instead")
        shape = (batch, *dims)
    rng = np.random.default_rng(seed)
    dtype = np.dtype(meta.dtype) if meta.dtype in ("float32", "float16") else np.float32
    return {meta.name: rng.standard_normal(shape).astype(dtype)}


@dataclass
class RunRecord:
    """Raw measurements of a run, kept for the CSV and the plots."""

    timings: list[tuple[int, int, Timings]] = field(default_factory=list)  #: (repeat, batch, timings)
    idle_window: tuple[int, int] | None = None
    samples: list = field(default_factory=list)
    trace_t0_ns: int = 0


def run_bench(cfg: BenchConfig, *, progress: Callable[[str, int, int | None], None] | None = None,
              warn: Callable[[str], None] | None = None) -> tuple[BenchResult, RunRecord]:
    """Run the benchmark. ``progress(task, done, total)`` is called between iterations; ``warn(msg)`` as
    soon as a warning is known. Returns the result and the raw record (``write_outputs`` saves both).

    Ctrl-C during the measurement does not propagate: the clocks are restored, the sampler stopped, and the
    result comes back with ``interrupted=True`` and the batches that finished (callers exit 130 after
    writing it)."""
    cfg.validate()
    iterations = cfg.iterations if cfg.iterations is not None or cfg.duration_s is not None else 200
    say = warn or (lambda _msg: None)

    runner, bundle, precision = make_runner(cfg)
    if precision in ("fp16", "best") and runner.backend != "tensorrt":
        raise EdgeTLError(f"--precision {precision} is TensorRT-only; backend {runner.backend} runs the bundle's "
                          "fp32 or int8 model", "use --backend tensorrt, or --precision fp32 / int8")
    data = cfg.data or ("golden" if bundle is not None else "random")
    if bundle is not None and max(cfg.batches) > bundle.manifest.max_batch:
        raise EdgeTLError(f"batch {max(cfg.batches)} exceeds the bundle's max_batch {bundle.manifest.max_batch} "
                          "(the largest batch its engine profile accepts)",
                          f"use batch sizes <= {bundle.manifest.max_batch}")
    facts = DeviceFacts(cfg.root)
    state = collect_device_state(facts)
    result = BenchResult(created=utc_now(), label=cfg.label, backend=runner.backend, device=state,
                         model=ModelInfo(path=str(Path(cfg.model).resolve()), precision=precision,
                                         bundle_id=bundle.manifest.bundle_id if bundle else None,
                                         name=bundle.manifest.name if bundle else Path(cfg.model).stem),
                         settings={"batches": list(cfg.batches), "warmup": None if cfg.warmup_seconds else cfg.warmup,
                                   "warmup_seconds": cfg.warmup_seconds, "iterations": iterations,
                                   "duration_s": cfg.duration_s, "repeat": cfg.repeat, "data": data,
                                   "power": cfg.power, "rate_hz": cfg.rate_hz, "interval_ms": cfg.interval_ms,
                                   "idle_seconds": cfg.idle_seconds, "lock_clocks": cfg.lock_clocks,
                                   "threads": cfg.threads, "seed": cfg.seed})
    if state.clocks_locked is False and not cfg.lock_clocks:
        result.warnings.append(f"clocks are not locked ({state.clocks_detail}): latency may vary with DVFS; "
                               "pass --lock-clocks or run sudo jetson_clocks first")
        say(result.warnings[-1])
    record = RunRecord()
    sampler = NoPower()
    try:
        with contextlib.ExitStack() as stack:
            if cfg.lock_clocks:
                stack.enter_context(facts.clocks.locked(state))
            stack.enter_context(runner)  # load the model / engine first: a model that can't load fails early
            result.runner = runner.describe()
            static = runner.static_batch()
            if static is not None and set(cfg.batches) != {static}:
                raise EdgeTLError(f"this model takes batch {static} only (a static-shape engine, as DLA engines "
                                  f"are), not {', '.join(map(str, cfg.batches))}", f"pass --batch {static}")
            feeds = {b: make_feed(runner, bundle, b, data, cfg.seed) for b in cfg.batches}
            result.model.input_shape = list(next(iter(feeds[cfg.batches[0]].values())).shape[1:])
            sampler = facts.power.sampler(cfg.power, rate_hz=cfg.rate_hz, interval_ms=cfg.interval_ms)
            stack.callback(sampler.stop)
            if not sampler.available:
                say(f"power will not be measured: {sampler.reason}")
            record.trace_t0_ns = time.monotonic_ns()
            if sampler.available and cfg.idle_seconds > 0:
                t0 = time.monotonic_ns()
                time.sleep(cfg.idle_seconds)
                record.idle_window = (t0, time.monotonic_ns())
            for rep in range(cfg.repeat):
                for b in cfg.batches:
                    task = f"batch {b}" + (f" (repeat {rep + 1}/{cfg.repeat})" if cfg.repeat > 1 else "")

                    def on_progress(n: int, task: str = task) -> None:
                        if progress is not None:
                            progress(task, n, iterations)

                    t = measure(runner, feeds[b], iterations=iterations, duration_s=cfg.duration_s,
                                warmup=None if cfg.warmup_seconds is not None else cfg.warmup,
                                warmup_seconds=cfg.warmup_seconds, on_progress=on_progress)
                    record.timings.append((rep, b, t))
            if sampler.available:  # two more sample periods, so the last window's end is bracketed by samples
                time.sleep(2.0 / sampler.rate_hz)
    except KeyboardInterrupt:  # clocks are restored and the sampler stopped by now (ExitStack)
        result.interrupted = True
        result.warnings.append("interrupted by Ctrl-C: results hold the measurements that finished")
        say(result.warnings[-1])
    finally:
        state.temps_end_c = facts.temperatures.read()
        record.samples = list(sampler.samples)
        finish(result, record, cfg, sampler)
    return result, record


def finish(result: BenchResult, record: RunRecord, cfg: BenchConfig, sampler) -> None:
    """Fill ``result.results`` and ``result.power`` from the raw record."""
    result.power = build_power(sampler, record, cfg, result.warnings)
    by_batch: dict[int, list[Timings]] = {}
    for _rep, b, t in record.timings:
        by_batch.setdefault(b, []).append(t)
    rows = []
    for b in cfg.batches:
        runs = by_batch.get(b)
        if not runs:
            continue
        lat = np.concatenate([t.latencies_ns for t in runs])
        wall = sum(t.wall_ns for t in runs) / 1e9
        medians = [float(np.median(t.latencies_ns) / 1e6) for t in runs]
        spread = (max(medians) - min(medians)) / min(medians) * 100 if len(medians) > 1 and min(medians) > 0 else None
        row = BatchResult(batch=b, iterations=int(lat.size), warmup_iterations=runs[0].warmup_iterations,
                          repeats=len(runs), wall_s=wall, latency_ms=latency_stats(lat),
                          throughput_ips=b * lat.size / wall if wall > 0 else None,
                          repeat_medians_ms=medians, median_spread_pct=spread)
        hand = [t.handoff_ns for t in runs if t.handoff_ns is not None]
        if hand:
            row.thread_handoff_us = float(np.median(np.concatenate(hand)) / 1e3)
        if result.power.available:
            row.power = batch_power(record.samples, [(t.t0_mono_ns, t.t1_mono_ns) for t in runs],
                                    images=b * int(lat.size), batch=b, idle_mw=result.power.idle_mw,
                                    warnings=result.warnings)
        rows.append(row)
    result.results = rows
