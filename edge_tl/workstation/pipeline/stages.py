"""The stages: data -> finetune (and scratch, for the comparison) -> prune (+ recovery) -> export -> quantize.

Each ``run_<stage>(ctx, out)`` writes its files into ``out`` (a temporary folder the cache renames when the
stage returns) and returns the stage's metrics, also written to ``metrics.json``. Test accuracy is measured
on the test split: with torch for the torch stages, through ONNX Runtime CPU for the ONNX ones. The INT8 Q/DQ
model's accuracy (``top1``) is measured with Q/DQ evaluated in float, as TensorRT computes it and the same on
every CPU (edge_tl.device.runtime.onnxrt, ``qdq="float"``); ONNX Runtime's own CPU integer kernels, whose numerics
depend on the CPU's instruction set, are measured beside it as ``top1_ort_cpu_kernels``. Every stage saves its
test predictions (``test_predictions.npy``) for the report's intervals and paired tests (:func:`accuracy_stats`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.workstation.pipeline.context import Context

MODEL_PT = "model.pt"  # plain state_dict (weights_only), see edge_tl.workstation.train.backbones.save_state
MODEL_PT2 = "model.pt2"  # torch.export program, for the torch bench baseline


def is_writer() -> bool:
    """False in the torchrun ranks other than 0: they train, rank 0 writes (edge-tl build --nproc)."""
    from edge_tl.workstation.train.distributed import is_writer as writer

    return writer()


def _write(out: Path, name: str, data: Any) -> None:
    (out / name).write_text(json.dumps(data, indent=2, default=float) + "\n")


def _fit_kwargs(ctx: Context, label: str) -> dict[str, Any]:
    t = ctx.spec.train
    return {"batch_size": t.batch_size, "weight_decay": t.weight_decay, "patience": t.patience,
            "label_smoothing": t.label_smoothing, "seed": ctx.spec.seed, "device": t.device, "workers": t.workers,
            "label": label, **_balance_kwargs(ctx)}


def balance_setup(ctx: Context) -> dict[str, Any]:
    """What train.balance does on this training split (edge_tl.workstation.train.balance.resolve)."""
    from edge_tl.workstation.train.balance import resolve

    t = ctx.spec.train
    return resolve(t.balance, ctx.data_split.labels("train"), len(ctx.classes), ctx.spec.data.imbalance_ratio,
                   t.balance_loss, t.focal_gamma)


def _balance_kwargs(ctx: Context) -> dict[str, Any]:
    from edge_tl.workstation.train.balance import fit_kwargs

    return fit_kwargs(balance_setup(ctx), ctx.data_split.labels("train"), len(ctx.classes), ctx.spec.seed,
                      ctx.spec.train.label_smoothing)


def balanced_top1(y: np.ndarray, pred: np.ndarray) -> float:
    """Balanced accuracy (mean per-class recall, scikit-learn) on the test split."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y, pred))


def chance_check(ctx: Context, val_top1: float, epochs: int) -> dict[str, Any]:
    """A training stage's best validation accuracy (of ``epochs``) against chance and the majority class
    (edge_tl.workstation.stats.chance_check)."""
    from edge_tl.workstation.stats import chance_check as check

    split = ctx.data_split
    return check(val_top1, np.asarray(split.labels("val")), np.asarray(split.labels("train")), len(ctx.classes),
                 picked_from=epochs)


#: what each training stage is called in the warning
TRAINED = {"finetune": "fine-tuned", "scratch": "from-scratch", "prune": "pruned + recovered"}


def chance_warning(ctx: Context, stage: str, metrics: dict[str, Any]) -> str | None:
    """The loud warning for a training stage whose validation accuracy is not better than guessing (None when it
    is, or when the stage has no check)."""
    c = metrics.get("chance_check")
    if not c or c["passed"]:
        return None
    s, t = ctx.spec, ctx.spec.train
    n_train = len(ctx.data_split.labels("train"))
    causes = [f"too few epochs ({metrics.get('epochs_run', metrics.get('recovery_epochs_run', '?'))} run)"]
    if stage == "prune":
        causes += [f"the recovery learning rate (prune.recovery_lr = {s.prune.recovery_lr:g}) or too much pruned "
                   f"(prune.ratio = {s.prune.ratio:g})"]
    elif stage == "scratch" or metrics.get("recipe") == "scratch":
        causes += [f"the learning rate (report.scratch_lr = {s.report.scratch_lr:g})",
                   f"training from random weights (weights = none) on only {n_train} training images"]
    else:
        causes += [f"the learning rates (train.lr_head = {t.lr_head:g}, lr_backbone = {t.lr_backbone:g})"]
        if t.mode == "feature-extract":
            causes += ["a frozen backbone (train.mode = 'feature-extract') whose features do not fit this data"]
    causes += ["broken labels (images in the wrong class folders, or classes that look alike)"]
    return (f"the {TRAINED[stage]} model is NOT better than guessing: validation top-1 {100 * c['val_top1']:.1f}% "
            f"({c['val_correct']}/{c['val_images']}) against chance {100 * c['chance']:.1f}% and always answering the "
            f"majority class {100 * c['majority_top1']:.1f}% (one-sided exact binomial p = {c['p_value']:.2g}, "
            f"needs < {c['level']:.2g}: 5% over the {c['picked_from_epochs']} epochs the best was picked from). "
            "Likely causes: " + "; ".join(causes) + ".")


def _torch_outputs(ctx: Context, model, out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Test top-1, MACs and params of a torch model; saves its state_dict and torch.export program."""
    from edge_tl.workstation.modelstats import count_macs_params
    from edge_tl.workstation.torch_runner import save_exported
    from edge_tl.workstation.train import evaluate, save_state

    model.cpu().eval()
    top1, _, preds = evaluate(model, *ctx.arrays("test"))
    macs, params = count_macs_params(model, ctx.size)
    save_state(model, out / MODEL_PT)
    save_exported(model, out / MODEL_PT2, ctx.size)
    metrics.update(top1=top1, macs=macs, params=params, file_bytes=(out / MODEL_PT).stat().st_size)
    metrics["balanced_top1"] = balanced_top1(ctx.arrays("test")[1], preds)
    np.save(out / "test_predictions.npy", preds)
    return metrics


def run_data(ctx: Context, out: Path) -> dict[str, Any]:
    split = ctx.scan()
    (out / "split.json").write_text(split.to_json())
    counts = split.summary.counts
    metrics = {"classes": len(split.classes), **{f"{s}_images": sum(c.values()) for s, c in counts.items()},
               "skipped": len(split.summary.skipped)}
    _write(out, "metrics.json", metrics)
    return metrics


def scratch_epochs(ctx: Context) -> int:
    """The from-scratch budget: the fine-tune's epochs plus its warm-up (the same number of epochs in all)."""
    t = ctx.spec.train
    return t.epochs + (t.warmup_epochs if t.mode != "feature-extract" else 0)


def scratch_recipe_note(ctx: Context) -> str:
    """The one line the build prints when ``weights = "none"`` replaces the fine-tune phases."""
    t, lr = ctx.spec.train, ctx.spec.report.scratch_lr
    return (f"weights = none: the fine-tune stage uses the from-scratch recipe (all layers from the first epoch, "
            f"BatchNorm trained, learning rate report.scratch_lr = {lr:g}, {scratch_epochs(ctx)} epochs without early "
            f"stopping) because there are no pretrained weights to keep; train.mode = {t.mode!r}, warmup_epochs, "
            f"lr_head, lr_backbone and freeze_bn do not apply")


def run_finetune(ctx: Context, out: Path) -> dict[str, Any]:
    from edge_tl.workstation.train import create_model, finetune_phases, fit, scratch_phases

    s, t = ctx.spec, ctx.spec.train
    auto = None
    if ctx.weights == "none":  # random weights: nothing to protect with a warm-up or a low backbone rate
        recipe = "scratch"
        ctx.console.print(f"[yellow]note:[/] {scratch_recipe_note(ctx)}")
        phases = scratch_phases(scratch_epochs(ctx), s.report.scratch_lr)
    elif t.mode == "auto":  # both modes under the same budget, the better on validation kept (train.modes)
        model, res, phases, auto = _fit_auto(ctx, out)
        recipe = auto["chosen"]
    else:
        recipe = t.mode
        phases = finetune_phases(t.mode, t.epochs, t.warmup_epochs, t.lr_head, t.lr_backbone, t.freeze_bn,
                                 head_solver(ctx), t.head_views)
    if auto is None:
        model = create_model(s.model.backbone, len(ctx.classes), ctx.weights, s.model.dropout, seed=s.seed)
        res = fit(model, s.model.backbone, ctx.train_dataset(), ctx.arrays("val"), phases,
                  **_fit_kwargs(ctx, "fine-tune"))
    if not is_writer():  # torchrun: rank 0 writes the stage (edge_tl.workstation.train.distributed)
        return {}
    _write(out, "fit.json", res.as_dict())
    metrics = {"val_top1": res.best_val_top1, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
               "train_seconds": round(res.seconds, 2), "device": res.device, "mode": t.mode, "recipe": recipe,
               "phases": [p.__dict__ for p in phases]}
    if recipe == "feature-extract":
        metrics["head"] = {"solver": head_solver(ctx), "asked": t.head,
                           **({"fit": res.history[-1]["head_fit"]} if res.history and "head_fit" in res.history[-1]
                              else {})}
    metrics["balance"] = balance_setup(ctx)
    metrics["augmentation"] = ctx.augmentation()
    if auto is not None:
        metrics["mode_auto"] = auto
    metrics["chance_check"] = chance_check(ctx, res.best_val_top1, res.epochs_run)
    save_val_predictions(ctx, model, out)
    metrics = _torch_outputs(ctx, model, out, metrics)
    _write(out, "metrics.json", metrics)
    return metrics


def head_solver(ctx: Context) -> str:
    """train.head for this backbone (edge_tl.workstation.train.head.solver)."""
    from edge_tl.workstation.train.head import solver

    return solver(ctx.spec.model.backbone, ctx.spec.train.head)


def recovery_distill(ctx: Context) -> str:
    """prune.recovery_distill resolved: auto distils features when the model pruned is a frozen backbone whose head
    was fitted by L-BFGS (the finetune stage's record says so), else logits."""
    asked = ctx.spec.prune.recovery_distill
    if asked != "auto":
        return asked
    if ctx.parent != "finetune":
        return "logits"
    done = json.loads((ctx.folder("finetune") / "metrics.json").read_text())
    return "features" if (done.get("head") or {}).get("solver") == "lbfgs" else "logits"


def save_val_predictions(ctx: Context, model, out: Path) -> None:
    """The validation predictions (``val_predictions.npy``) the negative-transfer guard pairs up."""
    from edge_tl.workstation.train import evaluate

    _, _, preds = evaluate(model.cpu(), *ctx.arrays("val"))
    np.save(out / "val_predictions.npy", preds)


def _fit_auto(ctx: Context, out: Path) -> tuple[Any, Any, list, dict[str, Any]]:
    """train.mode = "auto": feature extraction and fine-tuning from the same start, the better one on validation
    kept (edge_tl.workstation.train.modes); each run's curves saved as ``fit_<mode>.json``."""
    from edge_tl.workstation.train import create_model, fit
    from edge_tl.workstation.train.modes import candidates, pick, summary

    s, t = ctx.spec, ctx.spec.train
    phases = candidates(t.epochs, t.warmup_epochs, t.lr_head, t.lr_backbone, t.freeze_bn, head_solver(ctx),
                        t.head_views)
    models, results = {}, {}
    for mode, ph in phases.items():
        models[mode] = create_model(s.model.backbone, len(ctx.classes), ctx.weights, s.model.dropout, seed=s.seed)
        results[mode] = fit(models[mode], s.model.backbone, ctx.train_dataset(), ctx.arrays("val"), ph,
                            **_fit_kwargs(ctx, f"auto: {mode}"))
        _write(out, f"fit_{mode}.json", results[mode].as_dict())
    chosen, why = pick(results)
    ctx.console.print(f"[cyan]mode auto:[/] keeping {chosen} ({why})")
    return models[chosen], results[chosen], phases[chosen], summary(results, chosen, why, phases)


def run_scratch(ctx: Context, out: Path) -> dict[str, Any]:
    from edge_tl.workstation.train import build, evaluate, fit, save_state, scratch_phases

    s = ctx.spec
    model = build(s.model.backbone, len(ctx.classes), s.model.dropout, seed=s.seed)
    phases = scratch_phases(scratch_epochs(ctx), s.report.scratch_lr)
    res = fit(model, s.model.backbone, ctx.train_dataset(), ctx.arrays("val"), phases, **_fit_kwargs(ctx, "scratch"))
    if not is_writer():
        return {}
    _write(out, "fit.json", res.as_dict())
    top1, _, preds = evaluate(model.cpu(), *ctx.arrays("test"))
    np.save(out / "test_predictions.npy", preds)
    save_val_predictions(ctx, model, out)
    save_state(model, out / MODEL_PT)  # train.continue_with may send it on to pruning
    metrics = {"top1": top1, "val_top1": res.best_val_top1, "epochs_run": res.epochs_run,
               "train_seconds": round(res.seconds, 2)}
    metrics["balanced_top1"] = balanced_top1(ctx.arrays("test")[1], preds)
    metrics["chance_check"] = chance_check(ctx, res.best_val_top1, res.epochs_run)
    _write(out, "metrics.json", metrics)
    return metrics


#: prune.importance = "auto" tries these and keeps the one better on the decision set after recovery (with a latency
#: target and prune.target.ranking = "auto", each criterion with both rankings)
AUTO_IMPORTANCES = ("taylor", "lamp")


def run_prune(ctx: Context, out: Path) -> dict[str, Any]:
    from edge_tl.workstation.train import evaluate, load_state

    s, p = ctx.spec, ctx.spec.prune
    # the fine-tuned model, or the from-scratch one (train.continue_with; edge_tl.workstation.pipeline.guard)
    model = load_state(s.model.backbone, len(ctx.classes), ctx.folder(ctx.parent) / MODEL_PT, s.model.dropout)
    if not p.enabled or p.ratio == 0:
        metrics = {"enabled": False}
        return _finish(ctx, model, out, metrics)
    importances = AUTO_IMPORTANCES if p.importance == "auto" else (p.importance,)
    pruned: dict[str, Any] = {}  # candidate name -> (criterion, the pruning's result)
    refused: dict[str, str] = {}  # latency target, ranking = "auto": a ranking that cannot reach the target
    rankings = p.latency_target is not None and p.latency_target.ranking == "auto"  # names say the ranking too
    source = None  # a latency target's table and timing: set up once, shared by every criterion
    if p.latency_target is not None:
        from edge_tl.core.targets import TARGETS
        from edge_tl.workstation.latency import latency_source

        source = latency_source(model, ctx.size, p.latency_target, tensorrt=TARGETS[s.target].tensorrt)
    for imp in importances:
        got, why = _prune(ctx, model, imp, out, source)
        pruned.update({f"{imp}/{ranking}" if rankings else imp: (imp, res) for ranking, res in got.items()})
        refused.update({f"{imp}/{ranking}": text for ranking, text in why.items()})
    names = list(pruned)
    # the unpruned model on the decision set: what a failed recovery is told by (prune.retry_below)
    reference = evaluate(model, *ctx.decision_set())[0] if p.recovery_epochs else None
    parent_ok = p.recovery_epochs and chance_check(ctx, evaluate(model, *ctx.arrays("val"))[0], 1)["passed"]
    tried = {name: _recover(ctx, model, imp, res, reference, parent_ok) for name, (imp, res) in pruned.items()}
    at_chance = [name for name, t in tried.items() if t.get("at_chance")]
    if at_chance and len(at_chance) == len(tried):  # issue 23: a recovery at chance must not ship silently
        why = "; ".join(f"{name}: {tried[name]['at_chance']}" for name in at_chance)
        from edge_tl.core.errors import EdgeTLError

        raise EdgeTLError(f"the prune stage's recovery ended at chance for every candidate ({why}), while the "
                          "unpruned model is better than chance", "prune less (--prune-ratio), recover longer "
                          "(--recovery-epochs) or at another rate (prune.recovery_lr), or build with --no-prune")
    names = [name for name in names if name not in at_chance]  # a candidate at chance is never chosen
    if not is_writer():  # torchrun: every rank trained every candidate; rank 0 writes the stage
        return {}
    chosen = names[0]
    if len(names) > 1:
        # the better on the decision set (validation + its augmented copies, data.val_views) after recovery (ties:
        # validation top-1, then the lower validation loss, then the order above)
        decision = ctx.decision_set()
        for t in tried.values():
            if t["decision_top1"] is None:  # no recovery: not scored yet
                t["decision_top1"] = evaluate(t["model"], *decision)[0]
        chosen = max(names, key=lambda k: (tried[k]["decision_top1"], tried[k]["val_top1"], -tried[k]["val_loss"],
                                           -names.index(k)))
    pruned_model, metrics, fit_res = tried[chosen]["model"], tried[chosen]["metrics"], tried[chosen]["fit"]
    if fit_res is not None:
        _write(out, "fit.json", fit_res.as_dict())
    if len(names) > 1:
        for name in names:
            if tried[name]["fit"] is not None:
                _write(out, f"fit_{name.replace('/', '_')}.json", tried[name]["fit"].as_dict())
        over = ["criterion"] * (len(importances) > 1) + ["ranking"] * rankings
        metrics["auto_choice"] = {
            "chosen": chosen, "over": over, "decision_images": len(decision[1]),
            "rule": (f"higher top-1 after recovery on the {len(decision[1])} decision images (validation "
                     f"+ {s.data.val_views} augmented copies of each; ties: validation top-1, then loss)"),
            "candidates": {name: {"importance": pruned[name][0], "ranking": t["metrics"].get("ranking"),
                                  "decision_top1": t["decision_top1"], "val_top1": t["val_top1"],
                                  "val_loss": round(t["val_loss"], 5),
                                  "best_epoch_top1": t["metrics"].get("best_epoch_top1"),
                                  "top1": t["test_top1"], "macs": t["metrics"]["macs_after"],
                                  "latency_ms": t["metrics"].get("latency_ms"),
                                  "recovery_attempts": len(t["metrics"].get("recovery_attempts", ())) or 1}
                           for name, t in tried.items()}}
    if refused:
        metrics["refused"] = refused
    if at_chance:
        metrics["left_out_at_chance"] = {name: tried[name]["at_chance"] for name in at_chance}
    return _finish(ctx, pruned_model, out, metrics)


def _prune(ctx: Context, model, importance: str, out: Path, source) -> tuple[dict[str, Any], dict[str, str]]:
    """Prune copies of ``model`` with one channel importance: ``({ranking: result}, {ranking: why refused})``.
    A MACs target gives one result; a latency target (``source``: its edge_tl.workstation.latency.LatencySource)
    one per ranking of ``prune.target.ranking`` (edge_tl.workstation.latency.prune_for_target)."""
    import torch

    from edge_tl.workstation.prune import prune_to_macs, stream_layers

    s, p = ctx.spec, ctx.spec.prune
    taylor = None
    if importance in ("taylor", "contribution"):  # up to 64 training images (a seeded draw) rank the channels
        x, y = ctx.arrays("train")
        idx = np.sort(np.random.default_rng(s.seed).permutation(len(x))[:64])
        taylor = (torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))
    if source is not None:  # issue 13: pruned to a latency target
        from edge_tl.workstation.latency import prune_for_target

        return prune_for_target(model, ctx.size, p.latency_target, out=out, round_to=p.round_to,
                                importance=importance, taylor_batch=taylor, source=source)
    keep = stream_layers(model) if p.channels == "hidden" else None
    res = prune_to_macs(model, torch.zeros(1, 3, *ctx.size), target_macs_ratio=p.macs_ratio, round_to=p.round_to,
                        importance=importance, global_pruning=p.global_pruning, taylor_batch=taylor,
                        ignored_layers=keep)
    return {"macs": res}, {}


#: prune.recovery_bn = "auto": BatchNorm stays frozen in the recovery only up to this input size (pixels)
RECOVERY_BN_FROZEN_MAX_PX = 64


def recovery_bn_frozen(s) -> bool:
    """Whether the recovery after pruning keeps BatchNorm frozen (prune.recovery_bn; auto: see the spec)."""
    if s.prune.recovery_bn != "auto":
        return s.prune.recovery_bn == "frozen"
    return s.train.freeze_bn and max(s.model.preprocess().input_size) <= RECOVERY_BN_FROZEN_MAX_PX


#: a recovery run again after failing its check (prune.retry_below) uses seed + RETRY_SEED_STEP x attempt
RETRY_SEED_STEP = 1000


def _recover(ctx: Context, model, importance: str, res, reference: float | None,
             parent_ok: bool = False) -> dict[str, Any]:
    """Re-estimate BatchNorm of one pruned candidate (``res.model``) and recover it (distillation from ``model``,
    the unpruned one). A recovery whose decision-set top-1 falls more than ``prune.retry_below`` points under
    ``reference`` (the unpruned model's) is run again from the same pruned network with another seed, at most
    ``prune.recovery_retries`` times, and the attempt best on the decision set is kept. Returns the pruned model,
    its stage metrics, the recovery's FitResult (None without recovery), its decision-set top-1 (None without
    recovery), validation top-1 and loss (what the auto choice compares) and test top-1 (for the record).

    A recovery whose kept attempt is no better than chance on validation while the unpruned model was
    (``parent_ok``) runs once more with a changed recipe: BatchNorm trained (momentum 0.1) instead of frozen, the
    fix for a net whose weights drift under frozen statistics (issue 23: a from-scratch model at 224 px recovered
    to 20% in six attempts). Still at chance: the result says so (``at_chance``) and the stage leaves it out."""
    from edge_tl.workstation.train import Phase, evaluate, fit, recalibrate_bn, recovery_phases
    from edge_tl.workstation.train.fit import FEATURE_TARGETS

    s, p = ctx.spec, ctx.spec.prune
    pruned = res.model
    before, _, _ = evaluate(pruned, *ctx.arrays("test"))
    recalibrate_bn(pruned, ctx.train_dataset(), batch_size=s.train.batch_size, seed=s.seed, device=s.train.device)
    recal, _, _ = evaluate(pruned.cpu(), *ctx.arrays("test"))
    ranking = getattr(res, "ranking", None)
    metrics: dict[str, Any] = {"enabled": True, "top1_before_recovery": before, "top1_after_bn_recalibration": recal,
                               "global_pruning": p.global_pruning if ranking is None else ranking == "per-ms",
                               **res.summary()}
    fit_res, decision_top1 = None, None
    on = recovery_distill(ctx)
    distill = {"teacher": model if p.distill_weight or on in FEATURE_TARGETS else None,
               "distill_weight": p.distill_weight, "distill_temperature": p.distill_temperature, "distill_on": on,
               "mixup": p.recovery_mixup}
    if p.recovery_epochs:
        metrics["recovery_distill"] = {"on": on, "asked": p.recovery_distill, "mixup": p.recovery_mixup}
        label = importance if ranking is None else f"{importance}, {ranking}"
        start = copy.deepcopy(pruned) if p.recovery_retries else None  # every attempt starts from here
        floor = reference - p.retry_below / 100
        attempts: list[dict[str, Any]] = []
        best = None
        for k in range(1 + p.recovery_retries):
            net = pruned if k == 0 else copy.deepcopy(start)
            seed = s.seed + RETRY_SEED_STEP * k
            got = fit(net, s.model.backbone, ctx.train_dataset(), ctx.arrays("val"),
                      recovery_phases(p.recovery_epochs, p.recovery_lr, recovery_bn_frozen(s)),
                      **distill, keep=p.recovery_keep,
                      **{**_fit_kwargs(ctx, f"recovery ({label})" + (f", retry {k}" if k else "")), "seed": seed})
            _refit_head(ctx, net, distill, seed)
            val_top1, val_loss, _ = evaluate(net.cpu(), *ctx.arrays("val"))  # the weights kept (recovery_keep)
            scored = {"seed": seed, "decision_top1": evaluate(net, *ctx.decision_set())[0], "val_top1": val_top1,
                      "top1": evaluate(net, *ctx.arrays("test"))[0]}
            attempts.append(scored)
            if best is None or scored["decision_top1"] > best[0]["decision_top1"]:  # ties: the earlier attempt
                best = (scored, val_loss, net, got)
            if scored["decision_top1"] >= floor:
                break
        if parent_ok and not chance_check(ctx, best[0]["val_top1"], p.recovery_epochs)["passed"]:
            net = copy.deepcopy(start) if start is not None else best[2]
            seed = s.seed + RETRY_SEED_STEP * len(attempts)
            # the changed recipe: BatchNorm trained where it was frozen; where it already trained, a third of the
            # learning rate (a rate that wrecked the pretrained weights is the other cause seen)
            frozen = recovery_bn_frozen(s)
            lr = p.recovery_lr if frozen else p.recovery_lr / 3
            recipe = "BatchNorm trained" if frozen else f"BatchNorm trained, lr {lr:.2g}"
            changed = [Phase("recovery-bn", p.recovery_epochs, lr, lr, train_bn=True, early_stop=False,
                             bn_momentum=0.1)]
            got = fit(net, s.model.backbone, ctx.train_dataset(), ctx.arrays("val"), changed, **distill,
                      keep=p.recovery_keep, **{**_fit_kwargs(ctx, f"recovery ({label}), {recipe}"), "seed": seed})
            _refit_head(ctx, net, distill, seed)
            val_top1, val_loss2, _ = evaluate(net.cpu(), *ctx.arrays("val"))
            scored = {"seed": seed, "recipe": recipe,
                      "decision_top1": evaluate(net, *ctx.decision_set())[0], "val_top1": val_top1,
                      "top1": evaluate(net, *ctx.arrays("test"))[0]}
            attempts.append(scored)
            if scored["decision_top1"] > best[0]["decision_top1"]:
                best = (scored, val_loss2, net, got)
        kept, val_loss, pruned, fit_res = best
        decision_top1, val_top1, test_top1 = kept["decision_top1"], kept["val_top1"], kept["top1"]
        metrics.update(decision_top1=decision_top1, unpruned_decision_top1=reference, retry_below=p.retry_below)
        if len(attempts) > 1:
            metrics["recovery_attempts"] = attempts
    else:  # no recovery: the pruned network as BatchNorm re-estimation left it
        val_top1, val_loss, _ = evaluate(pruned.cpu(), *ctx.arrays("val"))
        test_top1, _, _ = evaluate(pruned, *ctx.arrays("test"))
    if fit_res is not None:
        metrics.update(val_top1=val_top1, recovery_epochs_run=fit_res.epochs_run, recovery_keep=fit_res.kept,
                       best_val_top1=fit_res.best_val_top1, best_epoch=fit_res.best_epoch,
                       distill_weight=p.distill_weight, train_seconds=round(fit_res.seconds, 2))
        metrics["chance_check"] = chance_check(ctx, val_top1, fit_res.epochs_run)
        if fit_res.kept == "last" and fit_res.best_state is not None:  # the other choice's score
            best_net = copy.deepcopy(pruned)
            best_net.load_state_dict(fit_res.best_state)
            metrics["best_epoch_top1"] = evaluate(best_net.cpu(), *ctx.arrays("test"))[0]
    check = metrics.get("chance_check")
    at_chance = (f"validation top-1 {100 * val_top1:.1f}% after {len(metrics.get('recovery_attempts', [0]))} "
                 f"attempt(s), chance {100 * check['baseline']:.1f}%"
                 if parent_ok and check and not check["passed"] else None)
    return {"model": pruned, "metrics": metrics, "fit": fit_res, "decision_top1": decision_top1,
            "val_top1": val_top1, "val_loss": val_loss, "test_top1": test_top1, "at_chance": at_chance}


def _refit_head(ctx: Context, net, distill: dict[str, Any], seed: int) -> None:
    """After a recovery by feature distillation: the head fitted once more on the recovered features, with the
    augmented copies the finetune stage's head was fitted on (train.head_views)."""
    from edge_tl.workstation.train.fit import FEATURE_TARGETS
    from edge_tl.workstation.train.head import fit_head

    if distill["distill_on"] not in FEATURE_TARGETS:
        return

    fit_head(net, ctx.spec.model.backbone, ctx.train_dataset(), views=ctx.spec.train.head_views, seed=seed,
             device="cpu")


def _finish(ctx: Context, model, out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    metrics = _torch_outputs(ctx, model, out, metrics)
    _write(out, "metrics.json", metrics)
    return metrics


def run_export(ctx: Context, out: Path) -> dict[str, Any]:
    from edge_tl.workstation.export import export_onnx
    from edge_tl.workstation.train import load_state

    s = ctx.spec
    model = load_state(s.model.backbone, len(ctx.classes), ctx.folder("prune") / MODEL_PT, s.model.dropout)
    res = export_onnx(model, out / "model.onnx", ctx.size, opset=s.opset(), target=s.target)
    x, y = ctx.arrays("test")
    pm = ctx.read("prune", "metrics.json")
    pred = onnx_predictions(out / "model.onnx", x)
    np.save(out / "test_predictions.npy", pred)
    metrics = {"top1": float((pred == y).mean()), "macs": pm["macs"], "params": pm["params"],
               "file_bytes": (out / "model.onnx").stat().st_size, "max_abs_diff": res.max_abs_diff,
               "opset": res.opset, "slimmed": res.slimmed, "checked_batches": list(res.checked_batches),
               "op_types": res.op_types}
    metrics["balanced_top1"] = balanced_top1(y, onnx_predictions(out / "model.onnx", x))
    _write(out, "metrics.json", metrics)
    return metrics


def onnx_predictions(path: Path, x: np.ndarray, batch: int = 64, qdq: str = "float") -> np.ndarray:
    """Top-1 predictions with ONNX Runtime CPU; ``qdq="float"`` evaluates Q/DQ as written (TensorRT's maths),
    ``"kernels"`` with ORT's fused integer CPU kernels."""
    return onnx_logits(path, x, batch, qdq).argmax(1)


def onnx_logits(path: Path, x: np.ndarray, batch: int = 64, qdq: str = "float") -> np.ndarray:
    """The logits (N, classes) of an ONNX model with ONNX Runtime CPU (``qdq`` as in :func:`onnx_predictions`)."""
    from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner

    out = []
    with OnnxRuntimeRunner.from_path(path, "ort-cpu", qdq=qdq) as runner:
        for i in range(0, len(x), batch):
            out.append(runner.infer({"input": np.ascontiguousarray(x[i:i + batch])})["logits"])
    return np.concatenate(out).astype(np.float32)


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> list[list[int]]:
    m = np.zeros((n, n), dtype=int)
    np.add.at(m, (y, pred), 1)
    return m.tolist()


def run_quantize(ctx: Context, out: Path) -> dict[str, Any]:
    from edge_tl.workstation.quantize import quantize_int8

    q = ctx.spec.quantize
    res = quantize_int8(ctx.folder("export") / "model.onnx", out / "model.int8.onnx", ctx.calibration(),
                        method=q.method, per_channel=q.per_channel)
    x, y = ctx.arrays("test")
    pred = onnx_predictions(out / "model.int8.onnx", x, qdq="float")
    kernel_pred = onnx_predictions(out / "model.int8.onnx", x, qdq="kernels")
    top1, kernel_top1 = float((pred == y).mean()), float((kernel_pred == y).mean())
    em = ctx.read("export", "metrics.json")
    gap = kernel_gap_note(top1, kernel_top1)
    if gap:
        ctx.console.print(f"[yellow]warning:[/] {gap}")
    metrics = {"top1": top1, "top1_eval": QDQ_FLOAT_EVAL, "top1_ort_cpu_kernels": kernel_top1,
               "ort_cpu_kernels_note": gap, "macs": em["macs"], "params": em["params"],
               "file_bytes": (out / "model.int8.onnx").stat().st_size, "method": res.method,
               "calib_count": res.calib_count, "per_channel": res.per_channel,
               "quantized_nodes": len(res.quantized_nodes), "confusion": confusion(y, pred, len(ctx.classes)),
               "fp32_onnx_top1": em["top1"]}
    metrics["balanced_top1"] = balanced_top1(y, pred)
    np.save(out / "test_predictions.npy", pred)
    np.save(out / "test_predictions_ort_cpu_kernels.npy", kernel_pred)
    _write(out, "metrics.json", metrics)
    return metrics


def calibration(ctx: Context, out: Path, test_logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Temperature scaling of the shipped INT8 model ``out/model.int8.onnx`` (Q/DQ in float) fitted on validation,
    ECE on test (edge_tl.workstation.calibrate); the bundle's postprocess.json takes the temperature. Run by the
    ``qat`` stage, which picks the model that ships."""
    from edge_tl.workstation.calibrate import calibrate, summary_line

    xv, yv = ctx.arrays("val")
    val_logits = onnx_logits(out / "model.int8.onnx", xv, qdq="float")
    np.save(out / "val_logits.npy", val_logits)
    np.save(out / "test_logits.npy", test_logits)
    cal = calibrate(val_logits, yv, test_logits, y)
    ctx.console.print(summary_line(cal))
    return cal


QDQ_FLOAT_EVAL = "onnxruntime-cpu, Q/DQ evaluated in float (session.disable_quant_qdq=1), as TensorRT computes it"


def kernel_gap_note(float_top1: float, kernel_top1: float, limit_points: float = 1.0) -> str | None:
    """The build's warning when ONNX Runtime's CPU integer kernels score > ``limit_points`` away from the
    float-evaluated Q/DQ model; None when they agree."""
    gap = 100 * (kernel_top1 - float_top1)
    if abs(gap) <= limit_points:
        return None
    return (f"ONNX Runtime's CPU INT8 kernels score {100 * kernel_top1:.1f}% on this CPU, {gap:+.1f} points from the "
            f"INT8 model as written ({100 * float_top1:.1f}%, Q/DQ in float): ORT fuses Q/DQ into integer kernels "
            f"whose precision depends on the CPU's instruction set (16-bit saturating intermediates without "
            f"AVX-512 VNNI). TensorRT does not run those kernels and is not affected; the bundle's INT8 accuracy is "
            f"the float-evaluated one.")


def accuracy_stats(ctx: Context, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """95 % Wilson intervals of every stage's test top-1, and paired comparisons (exact McNemar, paired
    bootstrap interval of the difference) between stages scored on the same test images."""
    from edge_tl.workstation.stats import paired, wilson

    _, y = ctx.arrays("test")
    n = len(y)
    correct: dict[str, np.ndarray] = {}
    for stage in ("finetune", "scratch", "prune", "export", "quantize", "qat"):
        f = ctx.folder(stage) / "test_predictions.npy" if stage in stages else None
        if f is not None and f.is_file():
            pred = np.load(f)
            if pred.shape == y.shape:
                correct[stage] = pred == y
    ci = {stage: list(wilson(int(round(m["top1"] * n)), n)) for stage, m in stages.items()
          if stage != "data" and m.get("top1") is not None}
    for stage in ("quantize", "qat"):
        kf = ctx.folder(stage) / "test_predictions_ort_cpu_kernels.npy" if stage in stages else None
        if kf is not None and kf.is_file():
            correct[f"{stage}_ort_cpu_kernels"] = np.load(kf) == y
            ci[f"{stage}_ort_cpu_kernels"] = list(wilson(int(correct[f"{stage}_ort_cpu_kernels"].sum()), n))
    pairs = {}
    for name, (a, b) in PAIRS.items():
        if name in ("pruning_cost", "int8_cost_vs_finetuned"):  # costs against the model that was pruned
            a = ctx.parent
        if a in correct and b in correct:
            pairs[name] = paired(correct[a], correct[b]).as_dict()
    return {"test_images": n, "top1_ci95": ci, "paired": pairs}


#: (A, B) pairs the report compares: difference = accuracy(A) - accuracy(B), so a stage's cost is positive.
PAIRS = {"pruning_cost": ("finetune", "prune"), "export_cost": ("prune", "export"),
         "int8_cost_vs_fp32_onnx": ("export", "quantize"), "int8_cost_vs_finetuned": ("finetune", "quantize"),
         "transfer_gain_vs_scratch": ("finetune", "scratch"),
         "ort_cpu_kernels_vs_float_qdq": ("quantize", "quantize_ort_cpu_kernels"),
         # the shipped INT8 model (stage qat: PTQ, QAT or mixed precision, pipeline.qat_stage)
         "shipped_int8_cost_vs_fp32_onnx": ("export", "qat"), "shipped_int8_cost_vs_finetuned": ("finetune", "qat"),
         "shipped_int8_gain_vs_ptq": ("qat", "quantize")}


# The ``qat`` stage's function lives in pipeline.qat_stage (it builds on these); pipeline.run joins both lists.
RUNNERS = {"data": run_data, "finetune": run_finetune, "scratch": run_scratch, "prune": run_prune,
           "export": run_export, "quantize": run_quantize}


def measure_latency(ctx: Context) -> dict[str, float]:
    """Batch-1 CPU latency of every stage's model, all in this one run with the same thread count (ms)."""
    from edge_tl.workstation.modelstats import onnx_latency_ms, torch_latency_ms
    from edge_tl.workstation.train import load_state

    r, s = ctx.spec.report, ctx.spec
    lat: dict[str, float] = {}
    for stage in ("finetune", "prune"):
        model = load_state(s.model.backbone, len(ctx.classes), ctx.folder(stage) / MODEL_PT, s.model.dropout)
        lat[stage] = torch_latency_ms(model, ctx.size, iters=r.latency_iters, threads=r.latency_threads)
    lat["export"] = onnx_latency_ms(ctx.folder("export") / "model.onnx", ctx.size, iters=r.latency_iters,
                                    threads=r.latency_threads)
    lat["quantize"] = onnx_latency_ms(ctx.folder("quantize") / "model.int8.onnx", ctx.size, iters=r.latency_iters,
                                      threads=r.latency_threads)
    lat["qat"] = lat["quantize"]  # the shipped INT8 model: PTQ's file unless QAT or mixed precision replaced it
    shipped = ctx.folder("qat") / "model.int8.onnx"
    if shipped.read_bytes() != (ctx.folder("quantize") / "model.int8.onnx").read_bytes():
        lat["qat"] = onnx_latency_ms(shipped, ctx.size, iters=r.latency_iters, threads=r.latency_threads)
    qat_only = ctx.folder("qat") / "model.qat.onnx"  # QAT's all-INT8 model (the base of mixed precision)
    if qat_only.is_file():
        lat["qat_all_int8"] = onnx_latency_ms(qat_only, ctx.size, iters=r.latency_iters, threads=r.latency_threads)
    return lat
