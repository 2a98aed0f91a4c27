"""`edge-tl build`: data -> finetune -> prune (+recovery) -> export -> quantize -> bundle, resumable.

The run folder (``--out``)::

    run.json                 status (running/done), stage keys, timings
    spec.resolved.toml       the spec after CLI overrides (rebuild with: edge-tl build spec.resolved.toml)
    stages/<stage>-<key>/    each stage's output, keyed by a hash of its inputs and settings (see cache.py)
    bundle/  bundle.tar.gz   what the device consumes (edge_tl.core.bundle)
    report.md  plots/        the report (edge_tl.workstation.pipeline.report)
    demo-data/               the demo's digits as PNG folders (demo only)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_write_text
from edge_tl.workstation.pipeline.cache import RunFolder, StageCache
from edge_tl.workstation.pipeline.context import Context, resolve_data, resolve_weights
from edge_tl.workstation.pipeline.guard import decide, needs_scratch
from edge_tl.workstation.pipeline.qat_stage import run_qat
from edge_tl.workstation.pipeline.stages import RUNNERS as _STAGE_RUNNERS
from edge_tl.workstation.spec import STAGES, BuildSpec, to_toml

RUNNERS = {**_STAGE_RUNNERS, "qat": run_qat}  # every stage's function, by name (spec.STAGES)


@dataclass
class BuildResult:
    run_dir: Path
    bundle_dir: Path
    tarball: Path
    report: Path
    stages: dict[str, dict[str, Any]]
    latency_ms: dict[str, float]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    comparison: dict[str, Any] | None = None
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)  # intervals and paired tests (stages.accuracy_stats)
    targets: list[tuple[str, str, str]] = field(default_factory=list)  # (what, measured, verdict): report.targets


def _check_force(force: list[str] | None) -> set[str]:
    out = set()
    for name in force or []:
        if name == "all":
            out |= {"data"}
        elif name not in STAGES:
            raise EdgeTLError(f"unknown stage '{name}' for --force", f"choose one of: {', '.join(STAGES)}, all")
        else:
            out.add(name)
    return out


def _auto_backbone(spec: BuildSpec, run_dir: Path, data_root: Path, data_label: str,
                   console: Console) -> tuple[BuildSpec, dict[str, Any] | None]:
    """``backbone = "auto"``: rank first (edge_tl.workstation.rank), build the best; the ranking goes to
    ``ranking.json`` in the run folder, the manifest and the report."""
    if spec.model.backbone != "auto":
        return spec, None
    from edge_tl.core.fsutil import atomic_write_text
    from edge_tl.workstation.rank import pick_backbone

    spec, ranking = pick_backbone(spec, data_root, data_label, console)
    atomic_write_text(run_dir / "ranking.json", json.dumps(ranking, indent=2, default=float) + "\n")
    return spec, ranking


def resolve_sign_key(path: str | Path | None) -> tuple[Any, dict[str, Any]]:
    """The key that signs the bundle: ``path`` (must load), else $EDGE_TL_SIGNING_KEY / the default key; where that
    does not exist yet, the first build makes it (0600, like ``edge-tl keys generate``; said, and recorded as
    ``generated``): devices accept only signed bundles. Loaded before any stage runs, so a wrong passphrase fails
    at once; a key that cannot be made (read-only home) leaves the bundle unsigned, said so."""
    import getpass
    import socket

    from edge_tl.core.signing import _raw_public, default_key_path, generate_key, key_id, load_private_key

    generated = None
    if path is None:
        path = default_key_path()
        if not path.is_file():
            try:
                _, pub, _ = generate_key(path, f"{getpass.getuser()}@{socket.gethostname()}")
            except (OSError, EdgeTLError) as exc:
                why = exc.problem if isinstance(exc, EdgeTLError) else (exc.strerror or str(exc))
                return None, {"unsigned": f"no signing key ({path} could not be made: {why}; edge-tl keys generate "
                                          "--out PATH, then --sign-key PATH)"}
            generated = str(pub)
    key = load_private_key(path)
    return key, {"key_id": key_id(_raw_public(key.public_key())), "key": str(path)} | (
        {"generated": generated} if generated else {})


def run_build(spec: BuildSpec, out: str | Path, *, overwrite: bool = False, force: list[str] | None = None,
              console: Console | None = None, sign_key: str | Path | None = None) -> BuildResult:
    """Run (or resume) a build into the run folder ``out``; return where everything is and the numbers.
    ``sign_key``: the signing key's path (default: $EDGE_TL_SIGNING_KEY or ~/.config/edge-tl/signing/edge-tl.key,
    made by the first build that needs it)."""
    start = time.perf_counter()
    console = console or Console(stderr=True)
    forced = _check_force(force)
    folder = RunFolder(out)
    plan = None
    if spec.continual.parent:  # edge-tl build --from RUN --add DIR: parent and field checked before anything
        from edge_tl.workstation import continual

        plan = continual.plan(spec)
        spec = continual.child_spec(spec, plan, folder.path)
    elif spec.continual.add:
        raise EdgeTLError("--add needs --from: the build whose model the field pictures teach",
                          "pass --from RUN (the parent build's run folder)")
    weights, weights_label = resolve_weights(spec)
    from edge_tl.workstation.qat import check_available

    check_available(spec.quantize.mode)  # QAT asked without ModelOpt: refused before the run folder is touched
    if not spec.is_demo and plan is None:
        resolve_data(spec, folder.path)  # a missing data folder fails before the run folder is touched
    key, signature = resolve_sign_key(sign_key)  # after the input checks: a refused build makes no key
    if signature.get("generated"):
        console.print(f"[bold yellow]made your signing key[/] {signature['key_id']}: {escape(signature['key'])} "
                      "(keep it secret, back it up). Devices install only bundles a key they trust signed: trust "
                      f"{escape(signature['generated'])} on each (docs/signing.md)")
    how = folder.claim(overwrite)
    run_dir = folder.path
    if how == "resume":
        console.print(f"[cyan]resuming[/] the interrupted build in {escape(str(run_dir))}")
    try:
        # the previous build's outputs would sit beside a new spec: remove them before anything new is written
        # (claim refused any folder that run.json does not mark as an edge-tl run: its files are not ours)
        stale = remove_outputs(run_dir)
        folder.mark("running", fresh=True, started=time.strftime("%Y-%m-%dT%H:%M:%S"), removed_stale=stale or None)
        if plan is not None:
            continual.materialize(plan, run_dir)
        return _run_stages(spec, folder, ctx_args=(forced, console, weights, weights_label, key, signature),
                           start=start, plan=plan)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (edge_tl.core.interrupt.Terminated)
        folder.mark("interrupted", error=f"{exc or 'interrupted (Ctrl-C)'}; run the same command to resume",
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        raise
    except BaseException as exc:
        why = exc.one_line() if isinstance(exc, EdgeTLError) else f"{type(exc).__name__}: {exc}"
        folder.mark("failed", error=why, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        raise
    finally:
        folder.release()


OUTPUTS = ("bundle", "bundle.tar.gz", "report.md", "metrics.json")


def remove_outputs(run_dir: Path) -> list[str]:
    """Delete a previous build's bundle, tarball, report and metrics from ``run_dir``; returns what was there."""
    import shutil

    removed = []
    for name in OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _check_finite(stage: str, folder: Path, metrics: dict[str, Any]) -> None:
    """Refuse to cache a training stage whose weights or losses are NaN/inf (a diverged run)."""
    import math

    def numbers(value: Any) -> list[float]:
        if isinstance(value, dict):
            return [n for v in value.values() for n in numbers(v)]
        if isinstance(value, (list, tuple)):
            return [n for v in value for n in numbers(v)]
        return [float(value)] if isinstance(value, float) else []

    fix = ("training diverged: lower the learning rates (--lr-head, --lr-backbone, or prune.recovery_lr in the spec)"
           " and run again")
    if any(not math.isfinite(n) for n in numbers(metrics)):
        raise EdgeTLError(f"the {stage} stage's metrics hold NaN or infinite values", fix)
    fit_json = folder / "fit.json"
    if fit_json.is_file():
        history = json.loads(fit_json.read_text()).get("history", [])
        if any(not math.isfinite(n) for n in numbers(history)):
            raise EdgeTLError(f"the {stage} stage's training loss became NaN or infinite", fix)
    model_pt = folder / "model.pt"
    if model_pt.is_file():
        import torch

        state = torch.load(model_pt, map_location="cpu", weights_only=True)
        tensors = [t for t in state.values() if torch.is_tensor(t) and t.is_floating_point()]
        bad = sum(1 for t in tensors if not bool(torch.isfinite(t).all()))
        if bad:
            raise EdgeTLError(f"the {stage} stage's model has {bad} of {len(tensors)} weight tensors with NaN or "
                              "infinite values", fix)


def _say_chance(ctx: Context, stage: str, m: dict[str, Any]) -> None:
    """Check a training stage against chance and the majority class (stages.chance_warning); a stage cached
    before the check existed gets it here. Said on every build, cached stage or not, and kept in its metrics."""
    from edge_tl.workstation.pipeline.stages import chance_check, chance_warning

    epochs = m.get("epochs_run", m.get("recovery_epochs_run"))
    if "chance_check" not in m and m.get("val_top1") is not None and epochs:
        m["chance_check"] = chance_check(ctx, m["val_top1"], epochs)
    warning = chance_warning(ctx, stage, m)
    m["chance_warning"] = warning
    if warning:
        ctx.console.print(f"[bold red]WARNING:[/] {escape(warning)}")


def _judge_continual(ctx: Context) -> None:
    """A continual build's child against its parent: stops the build here, before a bundle, when it lost."""
    if ctx.continual is not None:
        from edge_tl.workstation.continual import judge

        ctx.continual_result = judge(ctx, ctx.continual)


def _run_stages(spec: BuildSpec, folder: RunFolder, *, ctx_args: tuple, start: float,
                plan: Any = None) -> BuildResult:
    forced, console, weights, weights_label, key, signature = ctx_args
    run_dir = folder.path
    data_root, data_label = resolve_data(spec, run_dir)
    spec, ranking = _auto_backbone(spec, run_dir, data_root, data_label, console)
    ctx = Context(spec, run_dir, StageCache(run_dir, forced), console, data_root, data_label, weights, weights_label)
    ctx.ranking = ranking
    ctx.continual = plan
    ctx.sign_key, ctx.signature = key, signature
    ctx.processes = training_processes()
    keys = ctx.compute_keys()
    atomic_write_text(run_dir / "spec.resolved.toml", to_toml(spec))
    folder.mark("running", stage_keys=keys)
    # deferred: torch and the stage code load only after the cheap checks above passed
    from edge_tl.workstation.data import DataSplit
    from edge_tl.workstation.pipeline.stages import TRAINED, accuracy_stats, measure_latency

    stages = [s for s in STAGES if s != "scratch" or needs_scratch(ctx)]
    metrics: dict[str, dict[str, Any]] = {}
    ran, skipped = [], []
    for stage in stages:
        if stage == "prune":  # negative-transfer guard; may send the scratch model on (re-keys what follows)
            decide(ctx, metrics)
        key = keys[stage] = ctx.keys[stage]
        if ctx.processes > 1 and stage in _trains(ctx):  # the other ranks train this stage along (follow_build)
            _sync().share({"stage": stage, "run": not ctx.cache.is_done(stage, key), "keys": ctx.keys,
                           "parent": ctx.parent})
        if ctx.cache.is_done(stage, key):
            skipped.append(stage)
            console.print(f"[green]✓[/] {stage:<9} cached  ({escape(str(ctx.folder(stage).relative_to(run_dir)))})")
        else:
            console.print(f"[bold]→[/] {stage:<9} running")
            with ctx.cache.writing(stage, key, {"spec_name": spec.name}) as tmp:
                metrics[stage] = RUNNERS[stage](ctx, tmp)
                if stage in ("finetune", "scratch", "prune"):
                    _check_finite(stage, tmp, metrics[stage])
                if stage == "data":
                    ctx.split = DataSplit.from_json((tmp / "split.json").read_text())
            ran.append(stage)
        if stage == "data" and ctx.split is None:
            ctx.split = DataSplit.from_json((ctx.folder("data") / "split.json").read_text())
        if stage == "data" and ctx.processes > 1:  # what the other ranks need to train along (follow_build)
            _sync().share({"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir), "keys": keys,
                           "data_root": str(data_root), "data_label": data_label, "weights": weights,
                           "weights_label": weights_label})
        if stage == "data":
            for note in ctx.split.warnings:
                console.print(f"[yellow]warning:[/] {escape(note)}")
        metrics[stage] = ctx.read(stage, "metrics.json")
        if stage in TRAINED:
            _say_chance(ctx, stage, metrics[stage])
    if ctx.processes > 1:
        _sync().share({"stage": None})  # the other ranks' training is over (follow_build returns)
    console.print("[bold]→[/] measuring CPU latency (batch 1, "
                  f"{spec.report.latency_threads} thread(s), same run for every stage)")
    latency = measure_latency(ctx)
    _judge_continual(ctx)
    comparison = None
    if "scratch" in metrics:
        comparison = {"transfer_top1": metrics["finetune"]["top1"], "scratch_top1": metrics["scratch"]["top1"],
                      "train_images": metrics["data"]["train_images"], "weights": weights_label}
    stats = accuracy_stats(ctx, metrics)
    note = metrics["quantize"].get("ort_cpu_kernels_note")
    if note and "quantize" in skipped:  # said when the stage ran; said again when it comes from the cache
        console.print(f"[yellow]warning:[/] {escape(note)}")
    from edge_tl.workstation.pipeline.bundling import make_bundle

    bundle_dir = make_bundle(ctx, latency, comparison, stats)
    result = BuildResult(run_dir, bundle_dir, bundle_dir.with_name("bundle.tar.gz"), run_dir / "report.md", metrics,
                         latency, ran, skipped, comparison, time.perf_counter() - start, stats)
    from edge_tl.workstation.pipeline.report import targets, write_report

    result.targets = targets(ctx, result)
    write_report(ctx, result)
    atomic_write_text(run_dir / "metrics.json", json.dumps({"stages": metrics, "latency_ms": latency,
                                                           "comparison": comparison, "stats": stats,
                                                           "transfer": ctx.transfer,
                                                           "parity_gate": ctx.parity_gate,
                                                           "continual": ctx.continual_result,
                                                           "signature": ctx.signature,
                                                           "targets": [{"target": w, "measured": m, "verdict": v}
                                                                       for w, m, v in result.targets]},
                                                          indent=2, default=float) + "\n")
    from edge_tl.core.bundle import Bundle

    bundle_id = Bundle.open(bundle_dir).manifest.bundle_id  # verified: what run.json vouches for is intact
    folder.mark("done", stage_keys=keys, ran=ran, skipped=skipped, seconds=round(result.seconds, 1),
                bundle=str(bundle_dir), bundle_id=bundle_id, latency_ms=latency,
                finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return result


# -- torchrun (edge-tl build --nproc N, edge_tl.workstation.pipeline.launch) ----------------------------------
# Rank 0 runs the build above and is the only writer (run folder, stage cache, bundle). The other ranks run
# follow_build: they receive what rank 0 decided after the data stage, then rank 0 announces each training stage
# (broadcast, once every stage before it is written and after the negative-transfer guard chose the model to
# prune) and they train it along (fit under DistributedDataParallel); their stage functions return before
# writing anything (stages.is_writer).


def training_processes() -> int:
    """The number of torchrun processes this build trains with (1 outside torchrun); no torch import."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) if "TORCHELASTIC_RUN_ID" in os.environ else 1


def _sync() -> Any:
    from edge_tl.workstation.train import distributed

    return distributed


def _trains(ctx: Context) -> tuple[str, ...]:
    """The stages that train a network (with the other ranks, under torchrun)."""
    p, q = ctx.spec.prune, ctx.spec.quantize
    return (("finetune", "scratch") + (("prune",) if p.enabled and p.ratio > 0 and p.recovery_epochs > 0 else ())
            + (("qat",) if q.mode != "ptq" else ()))  # auto: every rank takes the same decision on the same files


def follow_build(scratch: Path | None = None) -> None:
    """A torchrun rank other than 0: train along with rank 0 (see above); writes nothing in the run folder (the
    stage functions get a throwaway folder under ``scratch``, the launcher's own temporary folder)."""
    import tempfile

    from edge_tl.workstation.data import DataSplit
    from edge_tl.workstation.train import distributed

    info = distributed.share()
    spec = BuildSpec.model_validate(info["spec"])
    run_dir = Path(info["run_dir"])
    ctx = Context(spec, run_dir, StageCache(run_dir, writer=False), Console(quiet=True), Path(info["data_root"]),
                  info["data_label"], info["weights"], info["weights_label"], processes=distributed.world_size())
    ctx.keys = info["keys"]
    ctx.split = DataSplit.from_json((ctx.folder("data") / "split.json").read_text())
    while (step := distributed.share())["stage"] is not None:  # rank 0 announces each training stage, in order,
        if not step["run"]:  # once every stage before it is written; cached there: cached here too
            continue
        ctx.keys, ctx.parent = step["keys"], step["parent"]  # after the negative-transfer guard (pipeline.guard)
        with tempfile.TemporaryDirectory(prefix=f"rank{distributed.rank()}-", dir=scratch) as tmp:
            RUNNERS[step["stage"]](ctx, Path(tmp))
