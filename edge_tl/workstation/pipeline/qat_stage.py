"""The ``qat`` stage (after ``quantize``): quantization-aware training when asked or needed, sensitivity-guided
mixed precision when INT8 still costs too much, and the choice of the INT8 model the bundle ships.

Decisions are taken on the decision set (the validation images plus ``data.val_views`` lightly augmented copies
of each: :meth:`Context.decision_set`), with Q/DQ evaluated in float (what TensorRT computes), against the FP32
ONNX model (the same network: quantization's own cost). The test split only reports.

- ``quantize.mode = "ptq"``: the PTQ model (stage ``quantize``) is the candidate; ``"qat"``: QAT runs
  (:mod:`edge_tl.workstation.qat`); ``"auto"``: QAT runs unless PTQ's cost on the decision set is within
  ``quantize.max_cost_points`` with 95% confidence (its one-sided upper bound, by validation image).
- PTQ ships unless QAT scores higher on the decision set beyond noise (:func:`pick_int8`: the one-sided 95% bound
  of its gain above 0): a gain within noise, on the pictures QAT's epochs were also judged on, is no reason to
  ship a trained model. With ``quantize.mode = "qat"`` (asked for) it is the other way round: QAT ships unless
  PTQ beats it beyond noise.
- When that model still costs more than ``quantize.max_cost_points``, ``quantize.mixed_max_layers > 0`` and the
  mode is not ``"ptq"`` (which means post-training quantization only), the most sensitive layers are kept in
  float (:mod:`edge_tl.workstation.mixed`), the fewest that meet it; that model ships when it beats the other
  beyond noise too.

Writes ``model.int8.onnx`` (the shipped model), ``model.qat.onnx`` when QAT ran, test predictions (Q/DQ in float
and on ONNX Runtime's CPU kernels) and ``metrics.json`` (same keys as the ``quantize`` stage's, plus ``selected``,
``candidates``, ``decision`` and ``mixed``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.workstation.pipeline.context import Context
from edge_tl.workstation.pipeline.stages import (
    MODEL_PT,
    QDQ_FLOAT_EVAL,
    _fit_kwargs,
    _write,
    balanced_top1,
    calibration,
    confusion,
    is_writer,
    kernel_gap_note,
    onnx_logits,
)


def _qdq_pairs(path: Path) -> int:
    import onnx

    return sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "QuantizeLinear")


def _quantized_nodes(path: Path) -> int:
    import onnx

    from edge_tl.workstation.quantize import quantized_node_names

    return len(quantized_node_names(onnx.load(str(path))))


def per_image_mean(values: np.ndarray, images: int) -> np.ndarray:
    """The mean of a decision-set score over each validation image's copies (entry ``j`` is image
    ``j % images``): one value per image, the unit a decision-set comparison is paired on."""
    image = np.arange(len(values)) % images
    return np.bincount(image, weights=values, minlength=images) / np.bincount(image, minlength=images)


def cost_bound(reference_correct: np.ndarray, correct: np.ndarray, images: int) -> tuple[float, float]:
    """(cost, one-sided 95% upper bound), in points, of a model against a reference on the decision set.

    The decision set holds ``images`` validation images followed by copies of them (entry ``j`` is image
    ``j % images``): copies of one image are not independent, so the per-image cost (the share of its copies the
    reference gets right and the model not, minus the reverse) is the unit, and the bound is its mean + 1.645
    standard errors."""
    per_image = per_image_mean(reference_correct.astype(np.float64) - correct.astype(np.float64), images)
    mean = float(per_image.mean())
    se = float(per_image.std(ddof=1) / np.sqrt(images)) if images > 1 else 0.0
    return 100 * mean, 100 * (mean + 1.645 * se)


def needs_qat(mode: str, ptq_cost_points: float, threshold: float, where: str = "the validation split",
              upper_points: float | None = None) -> tuple[bool, str]:
    """(run QAT?, why) for ``quantize.mode`` and PTQ's cost on the decision set (``where`` names it).

    With ``upper_points`` (the cost's one-sided 95% upper bound, :func:`cost_bound`), auto runs QAT unless PTQ is
    within the threshold with that confidence: QAT costs training time only, and a cost measured just under the
    threshold on a hundred images is not a cost known to be under it."""
    if mode == "ptq":
        return False, "quantize.mode = \"ptq\": post-training quantization only"
    if mode == "qat":
        return True, "quantize.mode = \"qat\""
    bound = upper_points if upper_points is not None else ptq_cost_points
    said = f"PTQ costs {ptq_cost_points:+.2f} points on {where} (Q/DQ in float" + (
        f"; one-sided 95% upper bound {upper_points:+.2f})" if upper_points is not None else ")")
    if bound > threshold:
        return True, (f"quantize.mode = \"auto\": {said}, "
                      f"{'possibly ' if ptq_cost_points <= threshold else ''}more than quantize.max_cost_points = "
                      f"{threshold:g}")
    return False, f"quantize.mode = \"auto\": {said}, within quantize.max_cost_points = {threshold:g}: QAT not needed"


def gain_over(name: str, base: dict[str, Any], other: dict[str, Any], images: int) -> dict[str, Any]:
    """``other``'s decision-set gain over ``base`` (named ``name``) and its one-sided 95% lower bound, in points
    (:func:`cost_bound` the other way round: copies of one validation image as one unit)."""
    cost, upper = cost_bound(base["decision_correct"], other["decision_correct"], images)
    return {"base": name, "gain_points": -cost, "gain_lower_points": -upper}


def beats(base: dict[str, Any], other: dict[str, Any], images: int) -> bool:
    """Whether ``other`` scores higher than ``base`` on the decision set beyond noise: its gain's lower bound
    (:func:`gain_over`) above 0."""
    return gain_over("", base, other, images)["gain_lower_points"] > 0


def pick_int8(candidates: dict[str, dict[str, Any]], images: int, base: str = "ptq") -> str:
    """The INT8 model to ship: another candidate replaces ``base`` (PTQ; QAT where quantize.mode = "qat" asked
    for it) only when it :func:`beats` it; of several that do, the higher decision-set top-1 (the earlier on a
    tie). A gain within noise is no reason to ship the model picked on those same pictures: on the photos QAT
    won the decision set by one picture in 441 (seed 4) and by 2.7 points within noise (seed 3), then gained 4.8
    points on test on one and lost 4.8 on the other (benchmarks/RESULTS.md "int8-choice"); ModelOpt's Q/DQ
    placement also runs slower on ONNX Runtime's CPU."""
    best = base
    for name, c in candidates.items():
        if name != base and beats(candidates[base], c, images) and (
                best == base or c["decision_top1"] > candidates[best]["decision_top1"]):
            best = name
    return best


def run_qat(ctx: Context, out: Path) -> dict[str, Any]:
    s, q = ctx.spec, ctx.spec.quantize
    xv, yv = ctx.arrays("val")
    xt, yt = ctx.arrays("test")
    fp32_path = ctx.folder("export") / "model.onnx"
    ptq_path = ctx.folder("quantize") / "model.int8.onnx"
    # validation + its augmented copies: what the choices below are scored on. It starts with the validation
    # images themselves (train.datasets.decision_views), so validation top-1 is read off its first len(yv) rows.
    xd, yd = ctx.decision_set()
    n_val = len(yv)
    where = f"the {len(yd)} decision images (validation + {s.data.val_views} augmented copies of each)"
    fp32_dec_logits = onnx_logits(fp32_path, xd)
    fp32_dec_correct = fp32_dec_logits.argmax(1) == yd
    fp32_dec, fp32_val = float(fp32_dec_correct.mean()), float(fp32_dec_correct[:n_val].mean())
    pm = ctx.read("quantize", "metrics.json")

    def candidate(path: Path, test_pred: np.ndarray | None = None) -> dict[str, Any]:
        dec_correct = onnx_logits(path, xd).argmax(1) == yd
        dec_top1, val_top1 = float(dec_correct.mean()), float(dec_correct[:n_val].mean())
        if test_pred is None:
            test_pred = onnx_logits(path, xt).argmax(1)
        _, upper = cost_bound(fp32_dec_correct, dec_correct, n_val)
        return {"path": path, "decision_correct": dec_correct, "decision_top1": dec_top1,
                "decision_cost_points": 100 * (fp32_dec - dec_top1),
                "decision_cost_upper_points": upper,
                "val_top1": val_top1, "val_cost_points": 100 * (fp32_val - val_top1),
                "top1": float((test_pred == yt).mean()), "qdq_pairs": _qdq_pairs(path), "test_pred": test_pred}

    cands = {"ptq": candidate(ptq_path, np.load(ctx.folder("quantize") / "test_predictions.npy"))}
    run, why = needs_qat(q.mode, cands["ptq"]["decision_cost_points"], q.max_cost_points, where,
                         cands["ptq"]["decision_cost_upper_points"])
    ctx.console.print(f"  {why}")
    qat_info = None
    if run:
        from edge_tl.workstation.qat import require_modelopt, train_qat
        from edge_tl.workstation.train import load_state

        require_modelopt(f"quantize.mode = \"{q.mode}\"")  # one line naming the fix; nothing is cached

        n = len(ctx.classes)
        student = load_state(s.model.backbone, n, ctx.folder("prune") / MODEL_PT, s.model.dropout)
        # the model that was pruned (fine-tuned, or from scratch after the negative-transfer guard) teaches
        teacher = load_state(s.model.backbone, n, ctx.folder(ctx.parent) / MODEL_PT, s.model.dropout)
        kw = _fit_kwargs(ctx, "qat")
        for k in ("label", "patience", "label_smoothing", "seed", "device", "workers", "batch_size", "weight_decay"):
            kw.pop(k, None)
        kw["keep"] = q.qat_keep
        res = train_qat(student, teacher if q.qat_distill_weight else None, s.model.backbone, ctx.calibration(),
                        ctx.train_dataset(), (xv, yv), out / "model.qat.onnx", ctx.size, epochs=q.qat_epochs,
                        lr=q.qat_lr, opset=s.opset(), target=s.target, distill_weight=q.qat_distill_weight,
                        batch_size=s.train.batch_size, seed=s.seed, device=s.train.device, fit_kwargs=kw)
        qat_info = res.summary()
        cands["qat"] = candidate(out / "model.qat.onnx")
    if not is_writer():  # torchrun: the other ranks only train QAT along; rank 0 decides and writes
        return {}
    # what ships unless another beats it beyond noise: PTQ, or QAT where the spec asked for QAT
    base = "qat" if q.mode == "qat" and "qat" in cands else "ptq"
    for name, c in cands.items():
        if name != base:
            c["against"] = gain_over(base, cands[base], c, n_val)
    chosen = pick_int8(cands, n_val, base)
    mixed = None
    if q.mode != "ptq" and cands[chosen]["decision_cost_points"] > q.max_cost_points and q.mixed_max_layers > 0:
        from edge_tl.workstation.mixed import keep_sensitive

        ctx.console.print(f"  {chosen.upper()} still costs {cands[chosen]['decision_cost_points']:+.2f} points on "
                          f"the decision set: ranking layers to keep in float (at most {q.mixed_max_layers})")
        mres = keep_sensitive(cands[chosen]["path"], xd, yd, fp32_dec_logits, q.max_cost_points,
                              q.mixed_max_layers, out / "model.mixed.onnx", seed=s.seed)
        mixed = {"base": chosen, **mres.summary()}
        if mres.layers:
            cands["mixed"] = candidate(out / "model.mixed.onnx")
            cands["mixed"]["against"] = gain = gain_over(chosen, cands[chosen], cands["mixed"], n_val)
            if gain["gain_lower_points"] > 0:  # beats() on the gain just recorded
                chosen = "mixed"
            else:
                mixed["note"] = ("keeping those layers in float scored no higher on the decision set beyond noise: "
                                 "not shipped")
    ship = cands[chosen]
    shutil.copyfile(ship["path"], out / "model.int8.onnx")
    import onnx

    from edge_tl.workstation.quantize import check_tensorrt_qdq

    check_tensorrt_qdq(onnx.load(str(out / "model.int8.onnx")))  # whichever ships: the form TensorRT builds
    pred = ship["test_pred"]
    if chosen == "ptq":
        kernel_pred = np.load(ctx.folder("quantize") / "test_predictions_ort_cpu_kernels.npy")
    else:
        kernel_pred = onnx_logits(out / "model.int8.onnx", xt, qdq="kernels").argmax(1)
    top1, kernel_top1 = float((pred == yt).mean()), float((kernel_pred == yt).mean())
    gap = kernel_gap_note(top1, kernel_top1)
    if gap and chosen != "ptq":
        ctx.console.print(f"[yellow]warning:[/] {gap}")
    np.save(out / "test_predictions.npy", pred)
    np.save(out / "test_predictions_ort_cpu_kernels.npy", kernel_pred)
    for name, c in cands.items():
        np.save(out / f"test_predictions_{name}.npy", c["test_pred"])
    em = ctx.read("export", "metrics.json")
    metrics: dict[str, Any] = {
        "top1": top1, "top1_eval": QDQ_FLOAT_EVAL, "top1_ort_cpu_kernels": kernel_top1, "ort_cpu_kernels_note": gap,
        "macs": em["macs"], "params": em["params"], "file_bytes": (out / "model.int8.onnx").stat().st_size,
        "selected": chosen, "mode": q.mode, "decision": why, "max_cost_points": q.max_cost_points,
        "fp32_onnx_val_top1": fp32_val, "val_images": len(yv), "fp32_onnx_decision_top1": fp32_dec,
        "decision_images": len(yd), "val_views": s.data.val_views,
        "candidates": {k: {kk: v for kk, v in c.items() if kk not in ("path", "test_pred", "decision_correct")}
                       | {"file": c["path"].name}
                       for k, c in cands.items()},
        "qat": qat_info, "mixed": mixed, "kept_float_layers": mixed["layers"] if chosen == "mixed" else [],
        "quantized_nodes": pm["quantized_nodes"] if chosen == "ptq" else _quantized_nodes(out / "model.int8.onnx"),
        "confusion": confusion(yt, pred, len(ctx.classes)), "fp32_onnx_top1": em["top1"],
        "balanced_top1": balanced_top1(yt, pred),
    }
    metrics["calibration"] = calibration(ctx, out, onnx_logits(out / "model.int8.onnx", xt), yt)
    _write(out, "metrics.json", metrics)
    return metrics


LABELS = {"ptq": "PTQ (ORT quantize_static, MinMax/Entropy/Percentile calibration)",
          "qat": "QAT (NVIDIA ModelOpt, from max calibration, distilled)", "mixed": "mixed precision"}


def report_lines(stages: dict[str, dict[str, Any]], latency: dict[str, float],
                 stats: dict[str, Any] | None) -> list[str]:
    """The report's section on the INT8 candidates: PTQ and QAT side by side, mixed precision's layers."""
    from edge_tl.workstation.stats import wilson

    m = stages.get("qat")
    if not m or "candidates" not in m:
        return []
    n = (stats or {}).get("test_images") or 0
    ft = stages["finetune"]["top1"]
    head = ["INT8 model", "decision-set top-1 (Q/DQ in float)", "decision-set cost vs FP32 ONNX",
            "val top-1 (Q/DQ in float)", "val cost vs FP32 ONNX", "test top-1 (95% CI)", "test cost vs fine-tuned FP32",
            "Q/DQ pairs", "shipped"]
    lines = ["## INT8: PTQ and QAT", "", f"Decision: {m['decision']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in m["candidates"].items():
        ci = wilson(int(round(c["top1"] * n)), n) if n else None
        label = LABELS.get(name, name) + (f" of {m['mixed']['base'].upper()}" if name == "mixed" else "")
        cells = [f"{100 * c['decision_top1']:.2f}%", f"{c['decision_cost_points']:+.2f} points",
                 f"{100 * c['val_top1']:.2f}%", f"{c['val_cost_points']:+.2f} points"]
        lines.append(f"| {label} | " + " | ".join(cells) + " | "
                     f"{100 * c['top1']:.2f}%" + (f" ({100 * ci[0]:.1f}–{100 * ci[1]:.1f})" if ci else "")
                     + f" | {100 * (ft - c['top1']):+.2f} points | {c['qdq_pairs']} | "
                     f"{'**yes**' if name == m['selected'] else 'no'} |")
    basis = (f"Decision set: the {m['val_images']} validation images and {m['val_views']} lightly augmented copies "
             f"of each ({m['decision_images']} images), FP32 ONNX {100 * m['fp32_onnx_decision_top1']:.2f}%; the "
             "INT8 model that ships is PTQ (QAT where quantize.mode = \"qat\" asked for it) unless another "
             "scores higher on it beyond noise (the one-sided 95% lower bound of its gain, copies of one validation "
             "image counted as one, above 0)" + "".join(
                 f"; {LABELS.get(k, k).split(' (')[0]} against {c['against']['base'].upper()}: "
                 f"{c['against']['gain_points']:+.2f} points (lower bound {c['against']['gain_lower_points']:+.2f})"
                 for k, c in m["candidates"].items() if c.get("against")))
    lines += ["", f"{basis}. Validation alone: FP32 ONNX {100 * m['fp32_onnx_val_top1']:.2f}%. Target "
              f"quantize.max_cost_points = {m['max_cost_points']:g}. Test costs are differences of two accuracies "
              "on the same test images (their paired intervals are in the differences table).", ""]
    if m.get("qat"):
        qa = m["qat"]
        lines += [f"QAT: {qa['implementation']}, {qa['epochs_run']} epochs (best on validation: epoch "
                  f"{qa['best_epoch']}), {qa['folded_batchnorms']} BatchNorms folded, {qa['quantizers']} quantizers, "
                  f"{qa['train_seconds']:.1f} s; ONNX Runtime (Q/DQ in float) vs the fake-quantized PyTorch model: "
                  f"max |diff| {qa['max_abs_diff']:.2e}." + (
                      f" ONNX Runtime CPU latency (its INT8 kernels): QAT {latency['qat_all_int8']:.3f} ms, PTQ "
                      f"{latency['quantize']:.3f} ms. ModelOpt places Q/DQ on the inputs of weighted layers only "
                      "(NVIDIA's placement for TensorRT, which fuses the following activation and quantization); "
                      "ONNX Runtime's CPU provider fuses fewer integer kernels with it, so this CPU figure says "
                      "little about the Jetson." if "qat_all_int8" in latency and "quantize" in latency else ""),
                  ""]
    mx = m.get("mixed")
    if mx:
        lines += [f"Mixed precision (base {mx['base'].upper()}): sets tried smallest first, the top k of the "
                  "sensitivity ranking (each quantized Conv/Gemm alone in float, error against the FP32 ONNX "
                  "outputs on validation images; the device's fallback ranking)" + (
                      f"; {mx['note']}" if mx.get("note") else "") + ":", "",
                  "| k | layers kept in float | decision-set top-1 | cost vs FP32 ONNX |",
                  "|---|---|---|---|"]
        lines += [f"| {t['k']} | {', '.join(f'`{x}`' for x in t['layers'])} | {100 * t['val_top1']:.2f}% | "
                  f"{t['val_cost_points']:+.2f} points |" for t in mx["tried"]]
        if m["selected"] == "mixed":
            base = latency.get("qat_all_int8" if mx["base"] == "qat" else "quantize")
            share = sum(mx["macs_share"].values())
            lat = (f"{latency['qat'] - base:+.3f} ms ({latency['qat']:.3f} against {base:.3f} ms all-INT8)"
                   if base and "qat" in latency else "not measured")
            lines += ["", f"Shipped with {len(m['kept_float_layers'])} layer(s) in float "
                      f"({'meets' if mx['met'] else '**does not meet**'} the target on validation). Their cost: "
                      f"{100 * share:.1f}% of the model's Conv/Gemm MACs (share computed from ONNX shapes); latency "
                      f"{lat} on ONNX Runtime CPU (its INT8 kernels, batch 1, this machine; TensorRT on the Jetson "
                      "differs)."]
        lines += [""]
    return lines
