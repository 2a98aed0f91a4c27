"""``edge-tl bench``: latency, throughput, power and energy per inference over any :class:`BaseRunner`.

Public API::

    from edge_tl.device.bench import BenchConfig, run_bench, write_outputs, BenchResult, compare

    result, record = run_bench(BenchConfig("runs/demo/bundle", backend="ort-cpu", batches=[1, 8]))
    write_outputs(result, record, "runs/bench/demo")      # bench.json, CSVs, PNGs
    BenchResult.from_external("trtexec", {"median": 1.2, "p99": 1.5}, throughput=800.0)

The results schema (``bench.json``) is documented in docs/bench-results.md.
"""

from __future__ import annotations

from edge_tl.device.bench.loop import Timings, latency_stats, measure
from edge_tl.device.bench.report import compare, compare_rows, print_result, write_outputs
from edge_tl.device.bench.run import BenchConfig, RunRecord, make_feed, make_runner, run_bench
from edge_tl.device.bench.schema import (
    BENCH_SCHEMA_VERSION,
    BatchResult,
    BenchResult,
    DeviceState,
    LatencyStats,
    PowerInfo,
    PowerWindow,
    json_schema,
)

__all__ = [
    "BENCH_SCHEMA_VERSION", "BatchResult", "BenchConfig", "BenchResult", "DeviceState", "LatencyStats",
    "PowerInfo", "PowerWindow", "RunRecord", "Timings", "compare", "compare_rows", "json_schema",
    "latency_stats", "make_feed", "make_runner", "measure", "print_result", "run_bench", "write_outputs",
]
