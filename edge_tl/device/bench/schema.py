"""The bench results file (``bench.json``): a versioned pydantic schema, documented in docs/bench-results.md.

One :class:`BenchResult` per run: what was measured (model, backend, precision, settings), on what
(:class:`DeviceState`), and per batch size the latency statistics, throughput and, when a power source
worked, power and energy. External tools' numbers (trtexec) go in the same schema through
:meth:`BenchResult.from_external`, so ``edge-tl bench compare`` can set them side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_tl import __version__
from edge_tl.core.bundle import utc_now
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_write_text

BENCH_SCHEMA_VERSION = 1
STAT_KEYS = ("min", "mean", "median", "p90", "p95", "p99", "max", "std")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LatencyStats(_Model):
    """Milliseconds per batch call (None where the source did not report it)."""

    count: int | None = Field(None, description="iterations the statistics cover")
    min: float | None = None
    mean: float | None = None
    median: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None
    std: float | None = Field(None, description="population standard deviation")


class PowerWindow(_Model):
    """Power during one batch size's measured loop, and the energy it took."""

    sample_count: int = Field(description="power samples inside the measured window")
    rate_hz: float | None = Field(None, description="measured sampling rate inside the window")
    duration_s: float
    coverage: float = Field(description="fraction of the window between the first and last sample")
    mean_mw: float = Field(description="time-weighted mean total power")
    peak_mw: float
    above_idle_mw: float | None = Field(None, description="mean_mw minus the idle baseline")
    rails_mean_mw: dict[str, float] = Field(default_factory=dict)
    energy_mj: float = Field(description="total energy over the window (trapezoid on the timestamps)")
    energy_per_inference_mj: float = Field(description="energy_mj / images (one inference = one image)")
    energy_per_inference_above_idle_mj: float | None = Field(None, description="(mean - idle) x time / images")
    energy_per_batch_mj: float


class BatchResult(_Model):
    batch: int = Field(ge=1)
    iterations: int = Field(ge=0, description="measured batch calls (all repeats)")
    warmup_iterations: int = 0
    repeats: int = 1
    wall_s: float | None = Field(None, description="time spent in the measured loops")
    latency_ms: LatencyStats
    throughput_ips: float | None = Field(None, description="images per second = batch x iterations / wall_s")
    repeat_medians_ms: list[float] = Field(default_factory=list, description="median of each repeat")
    median_spread_pct: float | None = Field(None, description="(max - min) / min of repeat_medians_ms, in %")
    power: PowerWindow | None = None
    thread_handoff_us: float | None = Field(
        None, description="median time per call spent handing the batch to the runner's owning thread and back "
                          "(TensorRT runner), inside latency_ms; trtexec has none")
    extra: dict[str, Any] = Field(default_factory=dict, description="source-specific numbers (e.g. trtexec's)")


class PowerInfo(_Model):
    available: bool
    source: str = Field(description="ina3221, jtop, tegrastats, nvml or none")
    reason: str | None = Field(None, description="why power is unavailable or was lost mid-run")
    lost_mid_run: bool = False
    requested_rate_hz: float | None = None
    measured_rate_hz: float | None = None
    sample_count: int = 0
    total_is: str | None = Field(None, description="VDD_IN / POM_5V_IN (module input) or 'sum of rails'")
    idle_mw: float | None = Field(None, description="mean power over the idle baseline before the run")
    idle_seconds: float | None = None
    idle_sample_count: int = 0
    notes: list[str] = Field(default_factory=list, description="why other sources were not used")
    details: dict[str, Any] = Field(default_factory=dict)


class DeviceState(_Model):
    hostname: str | None = None
    platform: str | None = None
    machine: str | None = None
    cpu: str | None = None
    jetson_model: str | None = None
    l4t: str | None = None
    jetpack: str | None = None
    nvpmodel: str | None = Field(None, description="power mode name, e.g. 'MAXN' or '15W'")
    nvpmodel_id: int | None = None
    clocks_locked: bool | None = Field(None, description="jetson_clocks --show: min == max clocks; None: unknown")
    clocks_detail: str | None = None
    lock_clocks: bool = Field(False, description="--lock-clocks was given")
    clocks_restored: bool | None = Field(None, description="the previous clock state was restored afterwards")
    versions: dict[str, str | None] = Field(default_factory=dict, description="tensorrt, cuda, onnxruntime, ...")
    temps_start_c: dict[str, float] = Field(default_factory=dict)
    temps_end_c: dict[str, float] = Field(default_factory=dict)


class ModelInfo(_Model):
    path: str
    bundle_id: str | None = None
    name: str | None = None
    precision: str | None = None
    input_shape: list[int | str | None] = Field(default_factory=list, description="one image (C, H, W)")


class BenchResult(_Model):
    schema_version: int = BENCH_SCHEMA_VERSION
    edge_tl_version: str = __version__
    created: str = Field(description="UTC, ISO 8601")
    source: str = Field("edge-tl", description="edge-tl, or the external tool the numbers came from (trtexec)")
    label: str | None = Field(None, description="short name for compare tables")
    model: ModelInfo | None = None
    backend: str | None = None
    runner: dict[str, Any] = Field(default_factory=dict, description="BaseRunner.describe()")
    settings: dict[str, Any] = Field(default_factory=dict, description="the options of the run")
    device: DeviceState = Field(default_factory=DeviceState)
    power: PowerInfo = Field(default_factory=lambda: PowerInfo(available=False, source="none"))
    results: list[BatchResult] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    interrupted: bool = Field(False, description="Ctrl-C stopped the run; results hold what finished")
    files: dict[str, str] = Field(default_factory=dict, description="other outputs, relative to this file")

    @classmethod
    def from_external(cls, source: str, latency_ms_stats: dict[str, float | None], throughput: float | None = None,
                      *, batch: int = 1, throughput_unit: str = "qps", label: str | None = None,
                      model: str | None = None, precision: str | None = None, backend: str | None = None,
                      device: DeviceState | None = None, extra: dict[str, Any] | None = None,
                      created: str | None = None) -> BenchResult:
        """A result from another tool's numbers, e.g. ``edge_tl.device.engine.parse_trtexec``'s output::

            p = parse_trtexec(log)
            r = BenchResult.from_external("trtexec", p["latency_ms"], p["throughput_qps"], batch=8,
                                          extra={k: v for k, v in p.items() if k.endswith("_ms")})

        ``latency_ms_stats`` takes any of min/mean/median/p90/p95/p99/max/std (and count). ``throughput``
        counts queries (batch calls) per second when ``throughput_unit="qps"`` (trtexec's unit) and is
        converted to images/s with ``batch``; pass ``throughput_unit="ips"`` for images per second.
        """
        unknown = set(latency_ms_stats) - {*STAT_KEYS, "count"}
        if unknown:
            raise EdgeTLError(f"unknown latency statistic(s) {sorted(unknown)}", f"use {', '.join(STAT_KEYS)}")
        if throughput_unit not in ("qps", "ips"):
            raise EdgeTLError(f"unknown throughput unit '{throughput_unit}'", "use 'qps' or 'ips'")
        ips = None if throughput is None else float(throughput) * (batch if throughput_unit == "qps" else 1)
        row = BatchResult(batch=batch, iterations=int(latency_ms_stats.get("count") or 0),
                          latency_ms=LatencyStats(**latency_ms_stats), throughput_ips=ips, extra=extra or {})
        return cls(created=created or utc_now(), source=source, label=label or source, backend=backend,
                   model=ModelInfo(path=model, precision=precision) if model else None,
                   device=device or DeviceState(), results=[row],
                   power=PowerInfo(available=False, source="none", reason=f"not measured by {source}"))

    def save(self, path: str | Path) -> Path:
        atomic_write_text(path, self.model_dump_json(indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> BenchResult:
        path = Path(path)
        fix = "give a bench.json written by edge-tl bench"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise EdgeTLError(f"results file {path} does not exist", fix) from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise EdgeTLError(f"{path} is not readable JSON ({exc})", fix) from exc
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != BENCH_SCHEMA_VERSION:
            raise EdgeTLError(f"{path} has bench schema_version {version}, this edge-tl reads {BENCH_SCHEMA_VERSION}",
                              "re-run edge-tl bench with this version")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise EdgeTLError(f"{path}: '{loc}' {err['msg']}", fix) from exc

    def row(self, batch: int) -> BatchResult | None:
        return next((r for r in self.results if r.batch == batch), None)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of bench.json (``BenchResult.model_json_schema()``)."""
    return BenchResult.model_json_schema()
