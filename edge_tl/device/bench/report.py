"""Bench outputs: bench.json, latencies.csv, power.csv, PNG plots, the terminal table, and ``compare``."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_tl.core.fsutil import atomic_file, atomic_write_text
from edge_tl.core.importer import has_module
from edge_tl.device.bench.schema import BenchResult

RESULT_FILE = "bench.json"
LATENCY_CSV = "latencies.csv"
POWER_CSV = "power.csv"
LATENCY_PNG = "latency_hist.png"
POWER_PNG = "power.png"


def _latency_csv(record) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["repeat", "batch", "iteration", "start_s", "latency_ms"])
    origin = min((int(t.starts_ns[0]) for _r, _b, t in record.timings if len(t.starts_ns)), default=0)
    for rep, b, t in record.timings:
        for i, (s, lat) in enumerate(zip(t.starts_ns.tolist(), t.latencies_ns.tolist(), strict=True)):
            w.writerow([rep, b, i, f"{(s - origin) / 1e9:.9f}", f"{lat / 1e6:.6f}"])
    return buf.getvalue()


def _phases(record) -> list[tuple[int, int, str]]:
    spans = [(*record.idle_window, "idle")] if record.idle_window else []
    return spans + [(t.t0_mono_ns, t.t1_mono_ns, f"batch {b}") for _r, b, t in record.timings]


def _power_csv(record) -> str:
    rails = sorted({k for s in record.samples for k in s.rails_mw})
    spans = _phases(record)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["t_s", "phase", "total_mw", *rails])
    for s in record.samples:
        phase = next((name for a, b, name in spans if a <= s.t_ns <= b), "")
        w.writerow([f"{(s.t_ns - record.trace_t0_ns) / 1e9:.6f}", phase, f"{s.total_mw:.1f}",
                    *(f"{s.rails_mw[r]:.1f}" if r in s.rails_mw else "" for r in rails)])
    return buf.getvalue()


def _save_fig(fig, path: Path) -> None:
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


def write_plots(result: BenchResult, record, out: Path) -> dict[str, str]:
    """latency_hist.png (per batch size) and power.png (trace, idle and measured windows shaded)."""
    import numpy as np
    from matplotlib.figure import Figure  # Agg canvas; no pyplot, no display needed

    files: dict[str, str] = {}
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for b in sorted({b for _r, b, _t in record.timings}):
        ms = np.concatenate([t.latencies_ns for _r, bb, t in record.timings if bb == b]) / 1e6
        ax.hist(ms, bins=min(60, max(10, ms.size // 10)), alpha=0.6, label=f"batch {b} (median {np.median(ms):.3g} ms)")
    ax.set_xlabel("latency per batch call (ms)")
    ax.set_ylabel("iterations")
    name, prec = (result.model.name, result.model.precision) if result.model else ("", "")
    ax.set_title(f"{name} {result.backend} {prec}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, out / LATENCY_PNG)
    files["latency_png"] = LATENCY_PNG
    if record.samples:
        fig = Figure(figsize=(8, 4))
        ax = fig.subplots()
        t = [(s.t_ns - record.trace_t0_ns) / 1e9 for s in record.samples]
        ax.plot(t, [s.total_mw / 1000 for s in record.samples], lw=1, color="black",
                label=f"total ({result.power.total_is or 'rails'})")
        for a, b, name in _phases(record):
            color = "tab:blue" if name == "idle" else "tab:orange"
            ax.axvspan((a - record.trace_t0_ns) / 1e9, (b - record.trace_t0_ns) / 1e9, alpha=0.2, color=color)
        ax.set_xlabel("time since sampler start (s); blue = idle baseline, orange = measured run")
        ax.set_ylabel("power (W)")
        ax.set_title(f"power from {result.power.source}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save_fig(fig, out / POWER_PNG)
        files["power_png"] = POWER_PNG
    return files


OUTPUT_FILES = (RESULT_FILE, LATENCY_CSV, POWER_CSV, LATENCY_PNG, POWER_PNG)


def previous_result(out: str | Path) -> list[str]:
    """The files of an earlier ``edge-tl bench`` in ``out`` (what a new run there would replace)."""
    out = Path(out)
    return [name for name in OUTPUT_FILES if (out / name).exists()] if out.is_dir() else []


def write_outputs(result: BenchResult, record, out: str | Path, *, plots: bool = True) -> Path:
    """Write every output into ``out`` (each file atomically, bench.json last); returns bench.json's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / LATENCY_CSV, _latency_csv(record))
    files = {"latencies_csv": LATENCY_CSV}
    if record.samples:
        atomic_write_text(out / POWER_CSV, _power_csv(record))
        files["power_csv"] = POWER_CSV
    if plots and record.timings:
        if has_module("matplotlib"):
            files.update(write_plots(result, record, out))
        else:
            result.warnings.append("plots skipped: matplotlib is not installed (pip install 'edge-tl[plots]')")
    result.files = files
    return result.save(out / RESULT_FILE)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"


def print_result(result: BenchResult, console: Console | None = None) -> None:
    console = console or Console()
    m, d = result.model, result.device
    title = f"{m.name if m else '?'} · {result.backend} · {m.precision if m else '?'}"
    table = Table(title=escape(title), title_justify="left")
    for col in ("batch", "iters", "median ms", "p95", "p99", "img/s", "W", "mJ/img", "mJ>idle"):
        table.add_column(col, justify="right")
    for r in result.results:
        lat, p = r.latency_ms, r.power
        table.add_row(str(r.batch), str(r.iterations), _fmt(lat.median, 4), _fmt(lat.p95), _fmt(lat.p99),
                      _fmt(r.throughput_ips, 4), _fmt(p.mean_mw / 1000 if p else None),
                      _fmt(p.energy_per_inference_mj if p else None),
                      _fmt(p.energy_per_inference_above_idle_mj if p else None))
    console.print(table)
    where = d.jetson_model or _gpu_of(result.runner, d.cpu) or d.cpu or d.machine or "?"
    mode = f", nvpmodel {d.nvpmodel}" if d.nvpmodel else ""
    clocks = {True: "locked", False: "NOT locked", None: "unknown"}[d.clocks_locked]
    console.print(escape(f"device: {where}{mode}, clocks {clocks}" + (f", JetPack {d.jetpack}" if d.jetpack else "")))
    pw = result.power
    if pw.available:
        idle = f", idle {pw.idle_mw / 1000:.3g} W" if pw.idle_mw is not None else ""
        console.print(f"power: {pw.source} ({pw.total_is}), {pw.sample_count} samples at "
                      f"{_fmt(pw.measured_rate_hz)} Hz{idle}")
    else:
        console.print(escape(f"power: unavailable ({pw.reason})"))
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)


METRICS = (("median ms", lambda r: r.latency_ms.median), ("p99 ms", lambda r: r.latency_ms.p99),
           ("img/s", lambda r: r.throughput_ips),
           ("mJ/inference", lambda r: r.power.energy_per_inference_mj if r.power else None))


def _labels(results: Sequence[BenchResult], paths: Sequence[str | Path]) -> list[str]:
    labels = [r.label or f"{r.backend or r.source} {r.model.precision if r.model and r.model.precision else ''}".strip()
              for r in results]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({Path(p).parent.name or Path(p).name})" for lab, p in zip(labels, paths, strict=True)]
    return labels


def compare_rows(results: Sequence[BenchResult]) -> list[dict]:
    """For each batch size of the first result and each metric: the values and their ratio to the first."""
    rows = []
    for base in results[0].results:
        for metric, get in METRICS:
            values = [(get(row) if (row := r.row(base.batch)) else None) for r in results]
            if all(v is None for v in values):
                continue
            first = values[0]
            ratios = [None if v is None or not first else v / first for v in values]
            rows.append({"batch": base.batch, "metric": metric, "values": values, "ratios": ratios})
    return rows


def compare(paths: Sequence[str | Path], console: Console | None = None) -> list[dict]:
    """Print a side-by-side table of bench.json files, with ratios against the first; returns the rows."""
    results = [BenchResult.load(p) for p in paths]
    labels = _labels(results, paths)
    table = Table(title="ratios are against the first file", title_justify="left")
    table.add_column("batch", justify="right")
    table.add_column("metric")
    for lab in labels:
        table.add_column(escape(lab), justify="right")
    rows = compare_rows(results)
    for row in rows:
        cells = [_fmt(row["values"][0], 4)] + [
            "-" if v is None else f"{_fmt(v, 4)} (x{q:.2f})" if q is not None else _fmt(v, 4)
            for v, q in zip(row["values"][1:], row["ratios"][1:], strict=True)]
        table.add_row(str(row["batch"]), row["metric"], *cells)
    (console or Console()).print(table)
    return rows


def _gpu_of(runner: dict, cpu: str | None) -> str | None:
    """The GPU a desktop runner ran on (the torch runner names it; ONNX Runtime's GPU providers don't), with the
    host CPU beside it: the CPU alone would name a device the model did not run on."""
    host = f" (host CPU: {cpu})" if cpu else ""
    if runner.get("gpu"):
        return f"{runner['gpu']}{host}"
    gpu_providers = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    if str(runner.get("device", "")).startswith("cuda") or gpu_providers & set(runner.get("providers") or ()):
        return f"an NVIDIA GPU{host}"
    return None
