"""`edge-tl engine build | check | sensitivity` and `edge-tl doctor` (thin: the work is in edge_tl.device.engine).

Contract used by deploy on the device:
``edge-tl engine check BUNDLE_DIR --backend B --precision P --json OUT`` exits 0 when parity passes, 3 when it
fails, 2 on a user/environment error, and always writes OUT. ``edge-tl engine build BUNDLE_DIR --precision P
--cache-dir DIR`` prints the engine path as the last stdout line (exit 0), or exits 2 with one line when
TensorRT isn't installed.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_tl.cli._common import Backend, KeepPrecision, Precision, Via, _v

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

engine_app = typer.Typer(help="Build TensorRT engines on the device, check them against the golden outputs.",
                         no_args_is_help=True)



def _not_a_folder(path: Path | None, flag: str) -> None:
    """An output file option must not name a folder (the write would fail after all the work)."""
    from edge_tl.core.errors import EdgeTLError

    if path is not None and path.is_dir():
        raise EdgeTLError(f"{flag} {path} is a folder", f"give a file path for {flag}")


def _keep_names(keep_layers: str | None, keep_worst: int | None, bundle, threads: int | None) -> list[str]:
    from edge_tl.core.errors import EdgeTLError

    names = [n.strip() for n in (keep_layers or "").split(",") if n.strip()]
    if keep_worst:
        if bundle is None:
            raise EdgeTLError("--keep-worst needs a bundle (its golden inputs rank the layers)", "give the bundle")
        report = _sensitivity(bundle, threads=threads)
        names += [n for n in report.worst(keep_worst) if n not in names]
        err.print(f"keeping the {keep_worst} worst INT8 layer(s) in higher precision: {escape(', '.join(names))}")
    return names


def _sensitivity(bundle, *, threads: int | None = None, all_ops: bool = False):
    import onnx
    from rich.progress import Progress

    from edge_tl.device.engine.fallback import WEIGHTED_OPS, quantized_nodes, sensitivity

    int8 = bundle.model_path("int8")
    ops = None if all_ops else WEIGHTED_OPS
    total = len(quantized_nodes(onnx.load(str(int8), load_external_data=False), ops))
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("ranking INT8 layers", total=total)
        return sensitivity(int8, bundle.golden_inputs(), bundle.golden_outputs(), fp32_path=bundle.model_path("fp32"),
                           ops=ops, threads=threads, progress=lambda _name: progress.advance(task))


@engine_app.command("build")
def build_cmd(
    model: Path = typer.Argument(..., help="Bundle folder, bundle .tar.gz, or an .onnx file."),
    precision: Precision = typer.Option(None, "--precision", case_sensitive=False,
                                  help="Default: the bundle's default_precision (int8/best use model.int8.onnx)."),
    dla: int = typer.Option(None, "--dla", help="DLA core (GPU fallback on), with --precision fp16: DLA does not run "
                                               "the Q/DQ INT8 model; only where the builder reports DLA."),
    workspace_mb: int = typer.Option(None, "--workspace-mb", help="Builder workspace limit in MiB."),
    max_batch: int = typer.Option(None, "--max-batch", help="Profile max (default: the bundle's max_batch)."),
    opt_batch: int = typer.Option(None, "--opt-batch", help="Profile opt (default: max(1, max_batch // 4))."),
    via: Via = typer.Option(Via.api, "--via",
                            help="TensorRT's Python API, or the device's trtexec (command shown and logged)."),
    trtexec: Path = typer.Option(None, "--trtexec", help="trtexec binary (default: PATH, /usr/src/tensorrt/bin)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Engine cache (default ~/.cache/edge-tl/engines)."),
    out_file: Path = typer.Option(None, "--out", help="Also copy the engine (and its sidecar) here."),
    no_build: bool = typer.Option(False, "--no-build", help="Refuse to build: fail unless a matching engine exists."),
    keep_layers: str = typer.Option(None, "--keep-layers", help="Comma-separated layers to keep out of INT8/FP16."),
    keep_worst: int = typer.Option(None, "--keep-worst", help="Keep the K layers the sensitivity pass ranks worst."),
    keep_precision: KeepPrecision = typer.Option(KeepPrecision.fp32, "--keep-precision",
                                       help="Precision of kept layers in an fp16 build."),
    threads: int = typer.Option(None, "--threads", help="ONNX Runtime threads for --keep-worst's ranking."),
) -> None:
    """Build (or find in the cache) the TensorRT engine for this device; prints its path last."""
    from edge_tl.core.fsutil import atomic_write_bytes
    from edge_tl.device.engine.cache import DEFAULT_CACHE_DIR, load_or_build, read_sidecar
    from edge_tl.device.engine.fallback import keep_layers_model
    from edge_tl.device.runners import DEFAULT_MAX_BATCH, resolve_model

    precision, via, keep_precision = _v(precision), _v(via), _v(keep_precision)
    _not_a_folder(out_file, "--out")
    onnx, precision, bundle = resolve_model(model, precision)
    max_batch = max_batch or (bundle.manifest.max_batch if bundle else DEFAULT_MAX_BATCH)
    cache = (cache_dir or DEFAULT_CACHE_DIR).expanduser()
    names = _keep_names(keep_layers, keep_worst, bundle, threads)
    fallback: tuple[str, ...] = tuple(names)
    if names and precision in ("int8", "best"):
        fp32 = bundle.model_path("fp32") if bundle else None
        onnx = keep_layers_model(onnx, names, cache / "fallback", fp32)
        err.print(f"INT8 model with {len(names)} layer(s) in float: {escape(str(onnx))}")
        fallback = ()
    build_fn = None
    if via == "trtexec":
        from edge_tl.device.engine.trtexec import build_with_trtexec

        build_fn = partial(build_with_trtexec, trtexec=trtexec, echo=lambda cmd: err.print(f"[bold]$[/] {escape(cmd)}"))
    with err.status(f"engine for {escape(onnx.name)} ({precision}); a first build takes minutes on a Jetson"):
        engine = load_or_build(onnx, precision, cache, no_build=no_build, dla_core=dla, max_batch=max_batch,
                               opt_batch=opt_batch, workspace_mb=workspace_mb, fallback_layers=fallback,
                               fallback_precision=keep_precision, build_fn=build_fn, via=via, trtexec=trtexec,
                               notify=lambda msg: err.print(f"[yellow]{escape(msg)}[/]"))
    side = read_sidecar(engine) or {}
    perf = side.get("performance")
    if perf:
        from edge_tl.device.bench.trtexec import trtexec_to_bench

        opt = int(side.get("key", {}).get("batch_profile", "1-1-1").split("-")[1])
        result = trtexec_to_bench(perf, batch=opt, model=str(onnx), precision=precision)
        bench_json = result.save(engine.with_suffix(".trtexec.bench.json"))
        err.print(f"trtexec at batch {opt}: {perf.get('throughput_qps')} qps, latency median "
                  f"{perf.get('latency_ms', {}).get('median')} ms (bench JSON: {bench_json})")
    if out_file is not None:
        atomic_write_bytes(out_file, engine.read_bytes())
        shutil.copyfile(engine.with_name(engine.name + ".json"), out_file.with_name(out_file.name + ".json"))
        engine = out_file
    out.print(escape(str(engine)))


def _thresholds(precision: str, max_top1_drop, min_cosine, max_rel_diff, min_int8_departure=None):
    import math

    from edge_tl.core.errors import EdgeTLError
    from edge_tl.device.engine.parity import ParityThresholds

    for flag, value, low, high in (("--max-top1-drop", max_top1_drop, 0.0, 1.0),
                                   ("--min-cosine", min_cosine, -1.0, 1.0),
                                   ("--max-rel-diff", max_rel_diff, 0.0, math.inf),
                                   ("--min-int8-departure", min_int8_departure, 0.0, math.inf)):
        if value is not None and not (low <= value <= high):  # nan fails both comparisons
            span = f">= {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
            raise EdgeTLError(f"{flag} must be {span}, got {value}", f"pass {flag} within that range")
    return ParityThresholds.for_precision(precision, max_top1_drop=max_top1_drop, min_cosine=min_cosine,
                                          max_rel_diff=max_rel_diff, min_int8_departure=min_int8_departure)


def _parity_table(report) -> Table:
    table = Table(title=f"parity {report.precision} on {report.backend}: {'PASSED' if report.passed else 'FAILED'}")
    for col in ("output", "vs", "judged", "top-1 agree", "near-ties", "cos min", "max rel", "INT8 dep."):
        table.add_column(col, justify="right" if col not in ("output", "vs") else "left")
    for o in report.outputs.values():
        ratio = "-" if o.int8_departure is None else f"{o.int8_departure:.3f}"
        table.add_row(o.name, o.reference.upper(), f"{o.judged}/{o.count}", f"{o.top1_agreement:.3f}",
                      str(len(o.near_tie_changes)), f"{o.cosine_min:.5f}", f"{o.max_rel_diff:.4g}", ratio)
    return table


@engine_app.command("check")
def check_cmd(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder or .tar.gz."),
    engine_file: Path = typer.Option(None, "--engine", help="Check this engine file (TensorRT) instead."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="Runner backend."),
    precision: Precision = typer.Option(None, "--precision", case_sensitive=False,
                                  help="Default: the bundle's default_precision."),
    json_out: Path = typer.Option(None, "--json", help="Write the parity report here (always, even on failure)."),
    max_top1_drop: float = typer.Option(None, "--max-top1-drop", help="Allowed fraction of changed top-1."),
    min_cosine: float = typer.Option(None, "--min-cosine", help="Lowest per-sample cosine similarity."),
    max_rel_diff: float = typer.Option(None, "--max-rel-diff", help="Max |out - reference| / max |reference|."),
    min_int8_departure: float = typer.Option(
        None, "--min-int8-departure",
        help="int8/best: lowest |out - FP32| / |INT8 reference - FP32| (a float engine gated as INT8: ~0)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="TensorRT engine cache."),
    no_build: bool = typer.Option(False, "--no-build", help="Don't build a missing TensorRT engine."),
    threads: int = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
) -> None:
    """The parity gate: the bundle's golden inputs through the engine (or any backend) vs the bundle's reference.

    int8/best are compared with the INT8 model's outputs (Q/DQ in float, stored at build time), fp32/fp16 with
    the FP32 outputs; top-1 changes count only where the reference margin is above the build's tolerance."""
    from edge_tl.core.bundle import Bundle
    from edge_tl.core.errors import EdgeTLError
    from edge_tl.device.engine.parity import ParityReport, check_parity

    backend, precision = _v(backend), _v(precision)
    _not_a_folder(json_out, "--json")
    bundle = None
    prec = precision or "fp32"
    try:
        bundle = Bundle.open(bundle_path)
        prec = precision or bundle.manifest.default_precision
        thresholds = _thresholds(prec, max_top1_drop, min_cosine, max_rel_diff, min_int8_departure)
        runner = _runner(bundle, engine_file, backend, prec, cache_dir, no_build, threads)
        report = check_parity(bundle, runner, prec, thresholds)
    except Exception as exc:  # any failure still leaves a report behind (deploy reads it)
        if json_out is not None:
            about = {"name": bundle.manifest.name, "bundle_id": bundle.manifest.bundle_id} if bundle else {}
            why = exc.one_line() if isinstance(exc, EdgeTLError) else f"{type(exc).__name__}: {exc}"
            ParityReport(passed=False, precision=prec, backend=backend, error=why, bundle=about,
                         thresholds=_safe_thresholds(prec)).write_json(json_out)
        raise
    if json_out is not None:
        report.write_json(json_out)
    err.print(_parity_table(report))
    for note in report.notes:
        err.print(f"  {escape(note)}")
    for failure in report.failures:
        err.print(f"[red]- {escape(failure)}[/]")
    report.raise_if_failed()
    out.print(escape(report.summary()))


def _safe_thresholds(precision: str):
    from edge_tl.device.engine.parity import ParityThresholds

    try:
        return ParityThresholds.for_precision(precision)
    except Exception:  # the error being reported may be this one
        return ParityThresholds()


def _runner(bundle, engine_file: Path | None, backend: str, precision: str, cache_dir, no_build: bool, threads):
    from edge_tl.core.errors import EdgeTLError
    from edge_tl.device.engine.build import detect_device
    from edge_tl.device.engine.cache import EngineCache, device_mismatch
    from edge_tl.device.runners import create_runner

    # ort-cpu judges a Q/DQ model as written (Q/DQ in float, as TensorRT computes it), never on ONNX Runtime's
    # CPU integer kernels, whose numerics depend on the CPU (edge_tl.device.runtime.onnxrt)
    runner = create_runner(engine_file or bundle, backend=backend, precision=precision, threads=threads,
                           engines=EngineCache(cache_dir, build=not no_build), qdq="float")
    if engine_file is not None:  # an engine file from elsewhere: refuse one built for another device
        problem = device_mismatch(engine_file, detect_device(builder=False))
        if problem:
            raise EdgeTLError(problem, f"rebuild it here: edge-tl engine build {bundle.root} --precision {precision} "
                                       f"--out {engine_file}")
    return runner


@engine_app.command("sensitivity")
def sensitivity_cmd(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder or .tar.gz."),
    top: int = typer.Option(10, "--top", help="Show the K worst layers."),
    all_ops: bool = typer.Option(False, "--all-ops", help="Rank every quantized node, not only Conv/Gemm/MatMul."),
    json_out: Path = typer.Option(None, "--json", help="Write the full ranking here."),
    threads: int = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
) -> None:
    """Rank the INT8 layers worst first (each run alone in float on ONNX Runtime CPU vs the golden outputs)."""
    from edge_tl.core.bundle import Bundle
    from edge_tl.core.errors import EdgeTLError
    from edge_tl.core.fsutil import atomic_write_text

    if top < 1:
        raise EdgeTLError(f"--top must be at least 1, got {top}", "pass e.g. --top 10")
    _not_a_folder(json_out, "--json")
    bundle = Bundle.open(bundle_path)
    report = _sensitivity(bundle, threads=threads, all_ops=all_ops)
    table = Table(title=f"INT8 sensitivity (baseline: rel. error {report.baseline_rel_error:.4g}, "
                        f"top-1 {report.baseline_top1_agreement:.3f})")
    for col in ("rank", "layer", "op", "rel. error in float", "gain", "top-1"):
        table.add_column(col, overflow="fold")
    for i, layer in enumerate(report.layers[:top], 1):
        table.add_row(str(i), layer.name, layer.op_type, f"{layer.rel_error:.4g}", f"{layer.gain:+.4g}",
                      f"{layer.top1_agreement:.3f}")
    err.print(table)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(report.to_dict(), indent=2) + "\n")
    k = min(top, 3, len(report.layers))
    out.print(f"edge-tl engine build {escape(str(bundle_path))} --precision int8 --keep-worst {k}")


def doctor_cmd(
    bundle_path: Path = typer.Argument(None, metavar="[BUNDLE]", help="Also check whether this bundle can run here."),
    root: Path = typer.Option(Path("/"), "--root", help="Read device files under this root (for recorded trees)."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts and checks as JSON (stdout)."),
    facts_file: Path = typer.Option(None, "--facts", help="Use facts recorded by `edge-tl doctor --json` elsewhere."),
) -> None:
    """What this machine has, and whether BUNDLE can run here; blockers exit 3 with the fix."""
    from edge_tl.core.bundle import Bundle
    from edge_tl.device.doctor import evaluate, gather_facts, load_facts, raise_on_blockers, report_json

    bundle = Bundle.open(bundle_path) if bundle_path else None  # a bad bundle fails before anything is probed
    facts = load_facts(facts_file) if facts_file else gather_facts(root)
    rows = evaluate(facts, bundle)
    if as_json:
        out.print(escape(json.dumps(report_json(facts, rows), indent=2)))
    else:
        colour = {"ok": "green", "info": "dim", "warn": "yellow", "blocker": "bold red"}
        table = Table(title="edge-tl doctor" + (f": {escape(bundle.manifest.name)}" if bundle else ""))
        for col in ("", "item", "value", "fix"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(f"[{colour[r.status]}]{r.status}[/]", escape(r.item), escape(r.value), escape(r.fix or ""))
        out.print(table)
    raise_on_blockers(rows)


def register(app: typer.Typer) -> None:
    app.add_typer(engine_app, name="engine")
    app.command("doctor")(doctor_cmd)
