"""``edge-tl bench``: latency, throughput, power and energy (``bench run``, the default) and ``bench compare``.

Thin layer over :mod:`edge_tl.device.bench`; nothing heavy is imported until a command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from edge_tl.cli._common import BenchBackend, Data, Power, Precision, _v, default_command_group
from edge_tl.core.errors import EdgeTLError


def _batches(text: str) -> list[int]:
    fix = "pass e.g. --batch 1,8,32"
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise EdgeTLError(f"--batch '{text}' is not a comma-separated list of integers", fix) from exc
    if not values or any(v < 1 for v in values):
        raise EdgeTLError(f"--batch '{text}' needs positive batch sizes", fix)
    return list(dict.fromkeys(values))


def run_cmd(
    model: Path = typer.Argument(..., help="Bundle folder or .tar.gz, an .onnx file, or a TensorRT .engine/.plan."),
    backend: BenchBackend = typer.Option(BenchBackend.auto, help="Runtime (torch: a build run's .pt2)."),
    precision: Precision = typer.Option(None, help="Default: the bundle's default precision."),
    batch: str = typer.Option("1", "--batch", "-b", help="Batch sizes, comma-separated, e.g. 1,8,32."),
    warmup: int = typer.Option(None, help="Warm-up iterations per batch size (default 50)."),
    warmup_seconds: float = typer.Option(None, help="Warm up for this many seconds instead of --warmup."),
    iterations: int = typer.Option(None, "--iterations", "-n", help="Measured iterations (default 200)."),
    duration: float = typer.Option(None, help="Measure for this many seconds instead of --iterations."),
    repeat: int = typer.Option(1, help="Repeat the whole measurement N times (interleaved); JSON records the spread."),
    data: Data = typer.Option(None, help="Default: golden for a bundle, random for a model file."),
    power: Power = typer.Option(Power.auto, help="Power source."),
    root: Path = typer.Option(Path("/"), "--root", "--power-root",
                              help="Root of the device's files (sysfs, /proc, /etc): facts and INA3221 power."),
    rate: float = typer.Option(20.0, help="Power sampling rate in Hz."),
    interval: int = typer.Option(None, help="tegrastats --interval in ms (default 1000/rate)."),
    idle_seconds: float = typer.Option(2.0, help="Idle power baseline before the run, seconds (0: none)."),
    lock_clocks: bool = typer.Option(False, "--lock-clocks", help="Run jetson_clocks for the run, restore after."),
    threads: int = typer.Option(None, help="CPU threads for ONNX Runtime / torch."),
    engine_dir: Path = typer.Option(None, help="TensorRT engine cache folder."),
    no_build: bool = typer.Option(False, "--no-build", help="TensorRT: refuse to build an engine that isn't cached."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default runs/bench/<model>-<backend>-<time>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier result in --out."),
    label: str = typer.Option(None, help="Short name for compare tables."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots (needs matplotlib)."),
    layer_profile: Path = typer.Option(None, "--layer-profile", help="Instead: write TensorRT's per-layer batch-1 "
                                       "times (trtexec --exportProfile) to this latency table (JSON, "
                                       "docs/latency-table.md) for edge-tl build's prune.target.latency_ms."),
    trtexec: Path = typer.Option(None, help="--layer-profile: the trtexec to run (default: PATH, then JetPack's)."),
) -> None:
    """Measure latency percentiles, throughput, power and energy per inference."""
    import datetime as dt

    if layer_profile is not None:
        return _layer_profile(model, layer_profile, _v(precision), iterations, root, trtexec)

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edge_tl.device.bench import BenchConfig, print_result, run_bench, write_outputs
    from edge_tl.device.bench.report import previous_result

    if out is not None and out.exists() and not out.is_dir():
        raise EdgeTLError(f"--out {out} is a file", "give a folder for the results (it is created if missing)")
    if out is not None and not overwrite and (earlier := previous_result(out)):
        raise EdgeTLError(f"--out {out} already holds a bench result ({', '.join(earlier)})",
                          "choose another --out, or pass --overwrite to replace it")
    console = Console()
    err = Console(stderr=True)
    cfg = BenchConfig(model=model, backend=_v(backend), precision=_v(precision), batches=_batches(batch),
                      warmup=50 if warmup is None and warmup_seconds is None else warmup,
                      warmup_seconds=warmup_seconds, iterations=iterations, duration_s=duration, repeat=repeat,
                      data=_v(data), power=_v(power), root=root, rate_hz=rate, interval_ms=interval,
                      idle_seconds=idle_seconds, lock_clocks=lock_clocks, threads=threads, engine_dir=engine_dir,
                      build_engine=not no_build, label=label)
    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:

        def progress(task: str, done: int, total: int | None) -> None:
            if task not in tasks:
                tasks[task] = bar.add_task(escape(task), total=total)
            bar.update(tasks[task], completed=done)

        result, record = run_bench(cfg, progress=progress,
                                   warn=lambda m: err.print(f"[yellow]warning:[/] {escape(m)}", soft_wrap=True))
    if out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = result.model.name if result.model else model.stem
        out = base = Path("runs/bench") / f"{name}-{result.backend}-{stamp}"
        n = 1
        while out.exists():  # two runs in one second: the second gets its own folder
            n += 1
            out = base.with_name(f"{base.name}-{n}")
    try:
        path = write_outputs(result, record, out, plots=plots)
    except OSError as exc:
        raise EdgeTLError(f"cannot write the results to {out} ({exc.strerror or exc})",
                          "give a writable folder with --out") from exc
    print_result(result, console)
    console.print(f"results: {escape(str(path))}")
    if result.interrupted:
        raise typer.Exit(130)


def _layer_profile(model: Path, out: Path, precision: str | None, iterations: int | None, root: Path,
                   trtexec: Path | None) -> None:
    from rich.console import Console
    from rich.markup import escape

    from edge_tl.core.bundle import Bundle
    from edge_tl.device.bench.layer_profile import layer_profile, summary

    if not model.exists():
        raise EdgeTLError(f"model {model} does not exist", "give a bundle folder or .tar.gz, or an .onnx file")
    if out.is_dir():
        raise EdgeTLError(f"--layer-profile {out} is a folder", "give the table's file name, e.g. table.json")
    onnx = model
    if model.is_dir() or model.name.endswith(".tar.gz"):
        bundle = Bundle.open(model)
        onnx = bundle.model_path("fp32")
        precision = precision or bundle.manifest.default_precision
    table = layer_profile(onnx, out, precision=precision or "fp16", trtexec=trtexec, root=root,
                          iterations=iterations or 200)
    Console().print(f"latency table: {escape(str(out))} {summary(table)}")


def compare_cmd(
    results: list[Path] = typer.Argument(..., help="bench.json files (or folders holding one); the first is the base."),
) -> None:
    """Side-by-side table of bench results, with ratios against the first."""
    from edge_tl.device.bench import compare

    if len(results) < 2:
        raise EdgeTLError("compare needs at least two results", "pass A.json B.json ...")
    paths = [p / "bench.json" if p.is_dir() else p for p in results]
    compare(paths)


def register(app: typer.Typer) -> None:
    group = typer.Typer(cls=default_command_group("run"), no_args_is_help=True,
                        help="Latency, throughput, power and energy per inference; `bench compare` for tables.")
    group.command("run")(run_cmd)
    group.command("compare")(compare_cmd)
    app.add_typer(group, name="bench")
