"""trtexec's performance summary as a bench result: the adapter from :mod:`edge_tl.device.engine.trtexec`
(which builds with trtexec and parses its output) to :mod:`edge_tl.device.bench.schema`. It lives in bench so
the engine package never imports bench."""

from __future__ import annotations

from typing import Any

from edge_tl.device.bench.schema import STAT_KEYS, BenchResult


def trtexec_to_bench(parsed: dict[str, Any], *, batch: int, model: str | None = None, precision: str | None = None,
                     label: str | None = None, extra: dict[str, Any] | None = None) -> BenchResult:
    """``parse_trtexec``'s output as a bench result, so ``edge-tl bench compare`` can set trtexec's numbers beside
    a runner's. Latency is trtexec's ``Latency`` (H2D + compute +
    D2H per query of ``batch`` images); its other timing lines go to the row's ``extra``."""
    latency = {k: v for k, v in (parsed.get("latency_ms") or parsed.get("gpu_compute_ms") or {}).items()
               if k in STAT_KEYS}
    timings = {k: v for k, v in parsed.items() if k.endswith(("_ms", "_s"))}
    return BenchResult.from_external("trtexec", latency, parsed.get("throughput_qps"), batch=batch,
                                     throughput_unit="qps", label=label or "trtexec", model=model,
                                     precision=precision, backend="tensorrt",
                                     extra={"trtexec": timings, **(extra or {})})
