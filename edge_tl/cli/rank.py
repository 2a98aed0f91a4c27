"""`edge-tl rank [SPEC.toml] [--data DIR]`: score every backbone/weights pair on the data before training.

Thin: the work is in edge_tl.workstation.rank (LogME and a cross-validated linear probe on frozen features).
Without a spec and without --data it ranks on the bundled digits demo's data, as `edge-tl build` would build it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

from edge_tl.core import importer


def rank(
    spec: Path | None = typer.Argument(None, help="Build spec (TOML): its preprocessing, split and seed are used. "
                                          "Without a spec and without --data: the digits demo.", show_default=False),
    data: Path | None = typer.Option(None, help="ImageFolder root (as for edge-tl build).", show_default=False),
    weights: list[str] = typer.Option([], "--weights", help="Weights to score (imagenet, none, demo or a state_dict "
                                      "file). Repeatable. Default: every one available here.", show_default=False),
    backbone: list[str] = typer.Option([], "--backbone", help="Backbones to score. Repeatable. Default: all four.",
                                       show_default=False),
    input_size: int | None = typer.Option(None, help="Square network input in pixels.", show_default=False),
    folds: int = typer.Option(5, min=2, max=20, help="Linear probe: stratified cross-validation folds."),
    latency_iters: int = typer.Option(20, min=0, help="Timed batch-1 ONNX Runtime runs per backbone (0: skip)."),
    threads: int | None = typer.Option(None, help="CPU threads for features and latency.", show_default=False),
    demo_shots: str | None = typer.Option(None, help="Demo only: training images per class.", show_default=False),
    seed: int | None = typer.Option(None, help="Seed of the split and the probe's folds.", show_default=False),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the ranking as JSON here.",
                                         show_default=False),
) -> None:
    """Rank the backbones on your data without fine-tuning (LogME + linear probe), with MACs and CPU latency."""
    from rich.console import Console

    from edge_tl.core.fsutil import atomic_write_text
    from edge_tl.workstation.spec import load_spec

    overrides = {"data.root": str(data) if data is not None else None, "model.input_size": input_size,
                 "report.latency_threads": threads, "seed": seed}
    if demo_shots is not None:
        overrides["data.demo_shots"] = int(demo_shots) if demo_shots.isdigit() else demo_shots
    flags = {"data.root": "--data", "model.input_size": "--input-size", "report.latency_threads": "--threads",
             "seed": "--seed", "data.demo_shots": "--demo-shots"}
    build_spec = load_spec(spec, overrides, flags)
    ranker = importer.require_workstation("edge_tl.workstation.rank", "edge-tl rank")
    ctx = importer.require_workstation("edge_tl.workstation.pipeline.context", "edge-tl rank")
    err = Console(stderr=True, highlight=False)
    with tempfile.TemporaryDirectory(prefix="edge-tl-rank-") as td:
        root, label = ctx.resolve_data(build_spec, Path(td))  # the demo's digits are written to a temp folder
        err.print(f"ranking on {label}")
        result = ranker.rank_spec(build_spec, root, label, weights=weights or None, backbones=backbone or None,
                                  folds=folds,
                                  latency_iters=latency_iters, console=err)
    d = result.as_dict()
    table = rank_table(d, f"edge-tl rank ({result.images} train+val images, {len(result.classes)} classes)")
    out = Console(highlight=False, soft_wrap=True)
    out.print(table)
    out.print(f"LogME: You et al., ICML 2021 (higher is better). Probe: logistic regression, stratified "
              f"{folds}-fold CV, Wilson 95% interval. CPU latency: ONNX Runtime on this CPU ({result.cpu}, "
              f"{result.threads} thread(s)), not the Jetson's. {result.seconds:.1f} s.")
    for note in result.notes:
        out.print(f"[yellow]note:[/] {note}")
    best = result.best
    out.print(f"recommendation: backbone = \"{best.backbone}\", weights = \"{best.weights}\" "
              "(or backbone = \"auto\" in the build spec)")
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(d, indent=2, default=float) + "\n")
        out.print(f"ranking: {json_out}")


def rank_table(d: dict, title: str):
    """The ranking as a rich table whose names are never cut: the backbone and weights columns are as wide as
    their longest value (the other columns wrap instead; issue 23: 'mobilene…' in 80 columns)."""
    from rich.table import Table

    ranker = importer.require_workstation("edge_tl.workstation.rank", "edge-tl rank")
    rows = ranker.table_rows(d)
    table = Table(title=title)
    for i, col in enumerate(ranker.TABLE_HEAD):
        names = col in ("backbone", "weights")
        width = max([len(col)] + [len(r[i]) for r in rows]) if names else None
        table.add_column(col, justify="left" if col in ("backbone", "weights", "recommendation") else "right",
                         no_wrap=names, min_width=width, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def register(app: typer.Typer) -> None:
    app.command("rank", no_args_is_help=False)(rank)
