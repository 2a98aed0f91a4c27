"""The last step: stage the bundle's files, fill the manifest, seal it with edge_tl.core.bundle.write_bundle."""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edge_tl.core.bundle import (
    FP32_MODEL,
    GOLDEN_INDEX,
    GOLDEN_INPUTS,
    GOLDEN_INT8_OUTPUTS,
    GOLDEN_OUTPUTS,
    INT8_MODEL,
    LABELS,
    POSTPROCESS,
    PREPROCESS,
    GoldenInfo,
    Manifest,
    StageMetrics,
    TargetInfo,
    TensorSpec,
    utc_now,
    write_bundle,
)
from edge_tl.core.parity import derive_tolerances
from edge_tl.core.postprocess import PostprocessConfig
from edge_tl.core.preprocess import Preprocessor, to_rgb
from edge_tl.core.targets import get_target
from edge_tl.workstation.pipeline.context import Context
from edge_tl.workstation.pipeline.stages import onnx_logits

SOFTWARE = ("torch", "torchvision", "torch-pruning", "nvidia-modelopt", "onnx", "onnxruntime", "onnxruntime-gpu",
            "onnxslim", "numpy", "pillow", "scikit-learn", "pydantic")
MANIFEST_STAGES = ("finetune", "prune", "export", "quantize", "qat")


def build_software() -> dict[str, str]:
    """Versions of the workstation's build stack, recorded in the manifest (the device records its own with
    ``edge_tl.device.facts.Versions``)."""
    out = {"python": platform.python_version(), "edge-tl": metadata.version("edge-tl")}
    for dist in SOFTWARE:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def golden_picks(labels: np.ndarray, count: int) -> list[int]:
    """Indices of ``count`` images of one split, round-robin over the classes (so every class is represented)."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picks: list[int] = []
    while len(picks) < min(count, len(labels)):
        for idxs in by_class:
            if idxs and len(picks) < count:
                picks.append(int(idxs.pop(0)))
    return sorted(picks)


#: the golden images kept as PNG too (the device can check its preprocessing on them); all are kept as crops
GOLDEN_PNGS = 8
#: validation images (beside the golden set) the margin tolerances are derived on
TOLERANCE_VAL_IMAGES = 256


def golden_set(ctx: Context, count: int) -> list[tuple[str, int]]:
    """(split, index) of ``count`` golden images: the test split first, then validation, then training, so that
    a small data set still fills the golden set (one input must not decide the gate)."""
    split = ctx.data_split
    out: list[tuple[str, int]] = []
    for name in ("test", "val", "train"):
        if len(out) >= count or name not in split.items:
            continue
        out += [(name, i) for i in golden_picks(split.labels(name), count - len(out))]
    return out


def self_gate(bundle_dir: Path) -> dict[str, Any]:
    """The build runs the gate it ships with on the sealed bundle, through the device's own reading of it (hashes,
    uint8 crops normalized by the bundle's preprocessing, the stored references): FP32 and INT8 on ONNX Runtime CPU,
    Q/DQ evaluated in float (the same on every CPU). Raises CheckFailed (nothing is shipped) on a failure."""
    from edge_tl.core.bundle import Bundle
    from edge_tl.core.errors import CheckFailed
    from edge_tl.core.parity import ParityThresholds, judge_parity
    from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner

    bundle = Bundle.open(bundle_dir)
    x = bundle.golden_inputs()
    out: dict[str, Any] = {}
    for precision, qdq in (("fp32", "kernels"), ("int8", "float")):
        with OnnxRuntimeRunner.from_path(bundle.model_path(precision), "ort-cpu", qdq=qdq) as runner:
            actual = runner.infer(x)
            described = runner.describe()
        report = judge_parity(bundle, actual, precision, ParityThresholds.for_precision(precision),
                              backend="ort-cpu", runner=described)
        o = next(iter(report.outputs.values()))
        out[precision] = {"passed": report.passed, "judged": o.judged, "count": o.count,
                          "top1_agreement": o.top1_agreement, "cosine_min": round(o.cosine_min, 6),
                          "int8_departure": o.int8_departure, "margin_tolerance": o.margin_tolerance,
                          "failures": report.failures}
        if not report.passed:
            raise CheckFailed(f"the bundle fails its own parity gate, so it was not written: {report.summary()}",
                              "this is a bug in the build (the bundle does not reproduce its own references); "
                              "report it with the run folder")
    return out


def stage_metrics(ctx: Context, latency: dict[str, float],
                  stats: dict[str, Any] | None = None) -> dict[str, StageMetrics]:
    out = {}
    ci = (stats or {}).get("top1_ci95", {})
    for stage in MANIFEST_STAGES:
        m = dict(ctx.read(stage, "metrics.json"))
        m.pop("confusion", None)
        m.pop("op_types", None)
        if isinstance(m.get("calibration"), dict):  # the manifest line; the reliability bins stay in the report
            m["calibration"] = {k: v for k, v in m["calibration"].items() if not k.startswith("reliability")}
        if stage in ci:
            m["top1_ci95"] = [round(v, 4) for v in ci[stage]]
        if f"{stage}_ort_cpu_kernels" in ci:
            m["top1_ort_cpu_kernels_ci95"] = [round(v, 4) for v in ci[f"{stage}_ort_cpu_kernels"]]
        m["cpu_latency_ms"] = round(latency[stage], 4)
        m["latency_runtime"] = {"finetune": "torch-eager", "prune": "torch-eager", "export": "onnxruntime-cpu",
                                "quantize": "onnxruntime-cpu (its INT8 CPU kernels)",
                                "qat": "onnxruntime-cpu (its INT8 CPU kernels)"}[stage]
        out[stage] = StageMetrics.model_validate(m)
    return out


def postprocess_config(shipped_metrics: dict[str, Any], val_logits: Path | None = None, ood_score: str = "none",
                       ood_keep: float = 0.95, val_inputs: np.ndarray | None = None,
                       drift_window: int = 0, train_signals: dict[str, np.ndarray] | None = None) -> PostprocessConfig:
    """The bundle's postprocess.json: the temperature the ``qat`` stage fitted for the shipped INT8 model
    (edge_tl.workstation.calibrate), the OOD rule fitted on the same validation logits (``val_logits``, saved
    by that stage; export.ood_score = none or no logits: no rule) and the drift reference of those logits'
    scores and of the inputs (``val_inputs``, preprocessed, and ``train_signals``, the training pictures'
    input signals; drift_window 0 or under 20 validation images: none)."""
    from edge_tl.core.drift import input_signals
    from edge_tl.workstation.calibrate import fit_drift_reference, fit_ood_rule

    cal = shipped_metrics.get("calibration")
    if not cal:
        return PostprocessConfig()
    t = round(float(cal["temperature"]), 6)
    rule = drift = None
    if val_logits is not None and val_logits.is_file():
        logits = np.load(val_logits)
        if ood_score != "none":
            rule = fit_ood_rule(logits, ood_score, ood_keep, t)
        if drift_window and val_inputs is not None and len(val_inputs) == len(logits) >= 20:
            confidence = PostprocessConfig(temperature=t).scores(logits).max(axis=1)
            inputs = input_signals(val_inputs)
            if train_signals:
                inputs = {k: np.concatenate([train_signals[k], v]) for k, v in inputs.items()}
            drift = fit_drift_reference({"confidence": confidence, **inputs}, drift_window, variety=len(logits))
    return PostprocessConfig(temperature=t, fitted_on=cal["fitted_on"], ood=rule, drift=drift)


#: at most this many training pictures (a seeded sample) join the validation pictures in the drift reference's input
#: signals
DRIFT_TRAIN_PICTURES = 1000


def drift_train_signals(ctx: Context) -> dict[str, np.ndarray] | None:
    """The input signals (edge_tl.core.drift.input_signals) of up to DRIFT_TRAIN_PICTURES training pictures, read
    64 at a time (export.drift_window 0, or no training pictures: none)."""
    from edge_tl.core.drift import input_signals
    from edge_tl.workstation.train.datasets import eval_arrays

    split = ctx.data_split
    paths, labels = split.paths("train"), np.asarray(split.labels("train"))
    if not ctx.spec.export.drift_window or not len(paths):
        return None
    keep = np.sort(np.random.default_rng(ctx.spec.seed).permutation(len(paths))[:DRIFT_TRAIN_PICTURES])
    parts = [input_signals(eval_arrays([paths[i] for i in keep[j:j + 64]], labels[keep[j:j + 64]], ctx.pre)[0])
             for j in range(0, len(keep), 64)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _transfer_choices(ctx: Context) -> dict[str, Any]:
    """The backbone ranking (backbone = "auto") and the class balancing the fine-tune used, for the manifest."""
    out: dict[str, Any] = {"balance": ctx.read("finetune", "metrics.json").get("balance"),
                           "augmentation": ctx.augmentation()}
    if ctx.ranking is not None:
        out["backbone_ranking"] = ctx.ranking
    if ctx.transfer is not None:  # the negative-transfer guard and which model was pruned (pipeline.guard)
        out["transfer"] = ctx.transfer
    if ctx.continual_result is not None:  # lineage: the parent bundle, the field data's hashes, the verdict
        out["continual"] = ctx.continual_result
    return out


def make_bundle(ctx: Context, latency: dict[str, float], comparison: dict[str, Any] | None,
                stats: dict[str, Any] | None = None) -> Path:
    """Write ``<run>/bundle/`` and ``<run>/bundle.tar.gz`` (atomically: a failed run leaves no half bundle)."""
    import onnxruntime as ort

    s = ctx.spec
    split = ctx.data_split
    pre = ctx.pre
    tgt = get_target(s.target)
    export_metrics = ctx.read("export", "metrics.json")
    quant = ctx.read("quantize", "metrics.json")
    shipped = ctx.read("qat", "metrics.json")  # the INT8 model shipped: PTQ, QAT or mixed (pipeline.qat_stage)
    with tempfile.TemporaryDirectory(prefix=".bundle-staging-", dir=ctx.run_dir) as td:
        staging = Path(td)
        shutil.copyfile(ctx.folder("export") / "model.onnx", staging / FP32_MODEL)
        shutil.copyfile(ctx.folder("qat") / "model.int8.onnx", staging / INT8_MODEL)
        (staging / LABELS).write_text("\n".join(split.classes) + "\n")
        pre.save(staging / PREPROCESS)
        postprocess_config(shipped, ctx.folder("qat") / "val_logits.npy", s.export.ood_score, s.export.ood_keep,
                           ctx.arrays("val")[0], s.export.drift_window,
                           drift_train_signals(ctx)).save(staging / POSTPROCESS)
        (staging / "golden" / "images").mkdir(parents=True)
        preproc = Preprocessor(pre)
        index, crops = [], []
        for n, (part, i) in enumerate(golden_set(ctx, s.export.golden_count)):
            src = split.paths(part)[i]
            label = int(split.labels(part)[i])
            with Image.open(src) as img:
                img.load()
                rgb = to_rgb(img)
            crops.append(np.asarray(preproc.resize_crop(rgb), dtype=np.uint8))
            entry = {"label": label, "label_name": split.classes[label], "split": part,
                     "source": Path(split.items[part][i][0]).as_posix()}
            if n < GOLDEN_PNGS:  # stored as RGB: the image the device's preprocessing starts from
                entry["file"] = f"golden/images/{n:03d}.png"
                rgb.save(staging / entry["file"])
            index.append(entry)
        crop_arr = np.stack(crops)
        inputs = np.stack([preproc.normalize(c) for c in crop_arr])
        sess = ort.InferenceSession(str(staging / FP32_MODEL), providers=["CPUExecutionProvider"])
        input_name, output_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name  # as exported
        del sess
        outputs = onnx_logits(staging / FP32_MODEL, inputs)
        reference = onnx_logits(staging / INT8_MODEL, inputs, qdq="float")  # the INT8 gate's reference
        val = split.paths("val")[:TOLERANCE_VAL_IMAGES]
        xv = preproc.batch([_rgb(p) for p in val]) if val else inputs[:0]
        tolerance, note = derive_tolerances(np.concatenate([outputs, onnx_logits(staging / FP32_MODEL, xv)]),
                                            np.concatenate([reference,
                                                            onnx_logits(staging / INT8_MODEL, xv, qdq="float")]))
        np.save(staging / GOLDEN_INPUTS, crop_arr)
        np.save(staging / GOLDEN_OUTPUTS, outputs)
        np.save(staging / GOLDEN_INT8_OUTPUTS, reference)
        (staging / GOLDEN_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        h, w = pre.input_size
        speedup = latency["finetune"] / latency["qat"] if latency.get("qat") else None
        manifest = Manifest(
            created=utc_now(), name=s.name,
            target=TargetInfo(name=tgt.name, jetpack=tgt.jetpack, tensorrt=tgt.tensorrt, max_opset=tgt.max_opset,
                              opset=int(export_metrics["opset"])),
            backbone=s.model.backbone, weights=ctx.weights_label,
            input=TensorSpec(name=input_name, shape=["batch", 3, h, w]),
            output=TensorSpec(name=output_name, shape=["batch", len(split.classes)]),
            max_batch=s.export.max_batch, classes=split.classes, software=build_software(), seed=s.seed,
            data=split.summary, stages=stage_metrics(ctx, latency, stats),
            export={"opset": export_metrics["opset"], "max_abs_diff": export_metrics["max_abs_diff"],
                    "slimmed": export_metrics["slimmed"], "checked_batches": export_metrics["checked_batches"],
                    "op_types": export_metrics["op_types"], "int8": {k: quant[k] for k in
                                                                     ("method", "calib_count", "per_channel",
                                                                      "quantized_nodes")}
                    | {"selected": shipped["selected"], "mode": shipped["mode"], "decision": shipped["decision"],
                       "quantized_nodes": shipped["quantized_nodes"],
                       "kept_float_layers": shipped["kept_float_layers"]}},
            golden=GoldenInfo(count=len(index), inputs=GOLDEN_INPUTS, outputs_int8=GOLDEN_INT8_OUTPUTS,
                              margin_tolerance=tolerance, tolerance_note=note),
            build={"stage_keys": ctx.keys, "latency_threads": s.report.latency_threads,
                   "latency_iters": s.report.latency_iters,
                   "speedup_int8_vs_torch_eager_fp32": round(speedup, 3) if speedup else None,
                   "comparison": comparison, "paired_tests": (stats or {}).get("paired"),
                   "test_images": (stats or {}).get("test_images"), "mode": s.train.mode,
                   "training_processes": ctx.processes,
                   "preprocess": pre.model_dump(mode="json"), **_transfer_choices(ctx)},
        )
        gate: dict[str, Any] = {}
        out = write_bundle(staging, manifest, ctx.run_dir / "bundle", overwrite=True,
                           check=lambda sealed: gate.update(self_gate(sealed)), sign_key=ctx.sign_key)
    ctx.parity_gate = gate
    sig = ctx.signature or {}
    ctx.console.print(f"  signed with key {sig['key_id']}" if sig.get("key_id") else
                      f"  [yellow]unsigned:[/] {sig.get('unsigned', 'no signing key')}; devices that trust keys refuse "
                      "it without --allow-unsigned")
    g8 = gate["int8"]
    ctx.console.print(f"  parity gate (as shipped, ort-cpu, Q/DQ in float): int8 top-1 {g8['top1_agreement']:.3f} "
                      f"of {g8['judged']}/{g8['count']} judged golden images (margin > {g8['margin_tolerance']:.3g}),"
                      " fp32 passed too")
    return out


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)
