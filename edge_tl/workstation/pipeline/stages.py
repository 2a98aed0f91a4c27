"""The stages: data -> finetune (and scratch, for the comparison) -> prune (+ recovery) -> export -> quantize.

Each ``run_<stage>(ctx, out)`` writes its files into ``out`` (a temporary folder the cache renames when the
stage returns) and returns the stage's metrics, also written to ``metrics.json``. Test accuracy is measured
on the test split: with torch for the torch stages, through ONNX Runtime CPU for the ONNX ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.workstation.pipeline.context import Context

MODEL_PT = "model.pt"  # plain state_dict (weights_only), see edge_tl.workstation.train.backbones.save_state
MODEL_PT2 = "model.pt2"  # torch.export program, for the torch bench baseline


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


def run_finetune(ctx: Context, out: Path) -> dict[str, Any]:
    from edge_tl.workstation.train import create_model, finetune_phases, fit

    s, t = ctx.spec, ctx.spec.train
    model = create_model(s.model.backbone, len(ctx.classes), ctx.weights, s.model.dropout, seed=s.seed)
    phases = finetune_phases(t.mode, t.epochs, t.warmup_epochs, t.lr_head, t.lr_backbone, t.freeze_bn)
    res = fit(model, s.model.backbone, ctx.train_dataset(), ctx.arrays("val"), phases, **_fit_kwargs(ctx, "fine-tune"))
    _write(out, "fit.json", res.as_dict())
    metrics = {"val_top1": res.best_val_top1, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
               "train_seconds": round(res.seconds, 2), "device": res.device, "mode": t.mode}
    metrics["balance"] = balance_setup(ctx)
    metrics = _torch_outputs(ctx, model, out, metrics)
    _write(out, "metrics.json", metrics)
    return metrics


def run_scratch(ctx: Context, out: Path) -> dict[str, Any]:
    from edge_tl.workstation.train import build, evaluate, fit, scratch_phases

    s, t = ctx.spec, ctx.spec.train
    model = build(s.model.backbone, len(ctx.classes), s.model.dropout, seed=s.seed)
    epochs = t.epochs + (t.warmup_epochs if t.mode == "finetune" else 0)
    phases = scratch_phases(epochs, s.report.scratch_lr)
    res = fit(model, s.model.backbone, ctx.train_dataset(), ctx.arrays("val"), phases, **_fit_kwargs(ctx, "scratch"))
    _write(out, "fit.json", res.as_dict())
    top1, _, preds = evaluate(model.cpu(), *ctx.arrays("test"))
    metrics = {"top1": top1, "val_top1": res.best_val_top1, "epochs_run": res.epochs_run,
               "train_seconds": round(res.seconds, 2)}
    metrics["balanced_top1"] = balanced_top1(ctx.arrays("test")[1], preds)
    _write(out, "metrics.json", metrics)
    return metrics


def run_prune(ctx: Context, out: Path) -> dict[str, Any]:
    import torch

    from edge_tl.workstation.train import evaluate, fit, load_state, recalibrate_bn, recovery_phases

    s, p = ctx.spec, ctx.spec.prune
    model = load_state(s.model.backbone, len(ctx.classes), ctx.folder("finetune") / MODEL_PT, s.model.dropout)
    if not p.enabled or p.ratio == 0:
        metrics = {"enabled": False}
        return _finish(ctx, model, out, metrics)
    from edge_tl.workstation.prune import prune_to_macs

    taylor = None
    if p.importance == "taylor":  # one gradient pass on up to 64 training images (a seeded draw) ranks channels
        x, y = ctx.arrays("train")
        idx = np.sort(np.random.default_rng(s.seed).permutation(len(x))[:64])
        taylor = (torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))
    res = prune_to_macs(model, torch.zeros(1, 3, *ctx.size), target_macs_ratio=p.ratio, round_to=p.round_to,
                        importance=p.importance, global_pruning=p.global_pruning, taylor_batch=taylor)
    pruned = res.model
    before, _, _ = evaluate(pruned, *ctx.arrays("test"))
    recalibrate_bn(pruned, ctx.train_dataset(), batch_size=s.train.batch_size, seed=s.seed, device=s.train.device)
    recal, _, _ = evaluate(pruned.cpu(), *ctx.arrays("test"))
    metrics: dict[str, Any] = {"enabled": True, "top1_before_recovery": before, "top1_after_bn_recalibration": recal,
                               "global_pruning": p.global_pruning, **res.summary()}
    if p.recovery_epochs:
        fit_res = fit(pruned, s.model.backbone, ctx.train_dataset(), ctx.arrays("val"),
                      recovery_phases(p.recovery_epochs, p.recovery_lr, s.train.freeze_bn),
                      teacher=model if p.distill_weight else None, distill_weight=p.distill_weight,
                      distill_temperature=p.distill_temperature, **_fit_kwargs(ctx, "recovery"))
        _write(out, "fit.json", fit_res.as_dict())
        metrics.update(val_top1=fit_res.best_val_top1, recovery_epochs_run=fit_res.epochs_run,
                       distill_weight=p.distill_weight,
                       train_seconds=round(fit_res.seconds, 2))
    return _finish(ctx, pruned, out, metrics)


def _finish(ctx: Context, model, out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    metrics = _torch_outputs(ctx, model, out, metrics)
    _write(out, "metrics.json", metrics)
    return metrics


def run_export(ctx: Context, out: Path) -> dict[str, Any]:
    from edge_tl.workstation.export import export_onnx
    from edge_tl.workstation.modelstats import onnx_top1
    from edge_tl.workstation.train import load_state

    s = ctx.spec
    model = load_state(s.model.backbone, len(ctx.classes), ctx.folder("prune") / MODEL_PT, s.model.dropout)
    res = export_onnx(model, out / "model.onnx", ctx.size, opset=s.opset(), target=s.target)
    x, y = ctx.arrays("test")
    pm = ctx.read("prune", "metrics.json")
    metrics = {"top1": onnx_top1(out / "model.onnx", x, y), "macs": pm["macs"], "params": pm["params"],
               "file_bytes": (out / "model.onnx").stat().st_size, "max_abs_diff": res.max_abs_diff,
               "opset": res.opset, "slimmed": res.slimmed, "checked_batches": list(res.checked_batches),
               "op_types": res.op_types}
    metrics["balanced_top1"] = balanced_top1(y, onnx_predictions(out / "model.onnx", x))
    _write(out, "metrics.json", metrics)
    return metrics


def onnx_predictions(path: Path, x: np.ndarray, batch: int = 64) -> np.ndarray:
    from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner

    preds = []
    with OnnxRuntimeRunner.from_path(path, "ort-cpu") as runner:
        for i in range(0, len(x), batch):
            preds.append(runner.infer({"input": np.ascontiguousarray(x[i:i + batch])})["logits"].argmax(1))
    return np.concatenate(preds)


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
    pred = onnx_predictions(out / "model.int8.onnx", x)
    em = ctx.read("export", "metrics.json")
    metrics = {"top1": float((pred == y).mean()), "macs": em["macs"], "params": em["params"],
               "file_bytes": (out / "model.int8.onnx").stat().st_size, "method": res.method,
               "calib_count": res.calib_count, "per_channel": res.per_channel,
               "quantized_nodes": len(res.quantized_nodes), "confusion": confusion(y, pred, len(ctx.classes)),
               "fp32_onnx_top1": em["top1"]}
    metrics["balanced_top1"] = balanced_top1(y, pred)
    np.save(out / "test_predictions.npy", pred)
    _write(out, "metrics.json", metrics)
    return metrics


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
    return lat
