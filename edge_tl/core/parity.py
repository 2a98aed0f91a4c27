"""The parity gate's maths, on both machines (NumPy and pydantic only): compare a runner's outputs on the bundle's
golden inputs with the bundle's reference outputs, and judge them.

The reference (``Bundle.golden_reference``):

* fp32 / fp16: the FP32 model's outputs (ONNX Runtime CPU, at build time);
* int8 / best: the INT8 model's outputs evaluated as written, Q/DQ in float (ONNX Runtime CPU with
  ``session.disable_quant_qdq``, at build time). The gate measures the device, not quantization: what INT8 does
  to the FP32 answer was measured by the build on the test split; the device must reproduce the INT8 model.

A top-1 change counts only on a *judged* input: one whose reference top-1 margin (top-1 minus top-2 logit) is
above the build's ``margin_tolerance`` for that precision (``golden.margin_tolerance`` in the manifest, derived by
:func:`derive_tolerances` and explained in ``golden.tolerance_note``). A near-tie may flip on any correct engine
(TensorRT fuses, reorders and rounds differently); it is reported, never counted.

Default thresholds, by precision (override any; ``None`` switches a check off):

======== ============== ========== ============ ================== ===========================================
precision max_top1_drop min_cosine max_rel_diff min_int8_departure why
======== ============== ========== ============ ================== ===========================================
fp32     0.0            0.9999     0.01         -                  same maths; TF32 alone gives ~1e-3 relative
fp16     0.02           0.999      0.05         -                  10-bit mantissa on activations
int8     0.10           0.95       0.5          0.4                >= 90 % of judged top-1 agree with the INT8
                                                                   reference; the outputs must carry INT8's
                                                                   quantization noise (departure below)
best     as int8
======== ============== ========== ============ ================== ===========================================

``max_top1_drop`` is a fraction of the judged inputs (64 golden inputs by default, so one input cannot decide).
``max_rel_diff`` = max |out - reference| / max |reference|. The *INT8 departure* tells an INT8 engine from a float
one: ``|out - fp32| / |int8 - fp32|`` (Frobenius norms over the golden set), how far the outputs are from the FP32
model's, relative to how far the INT8 reference is. Any INT8 implementation carries quantization noise of the
reference's order (the reference itself: 1; ONNX Runtime's fused CPU integer kernels, another rounding of the same
model: 0.81 on the demo, seed 0), a float engine only its rounding (FP32/TF32 about 0.01, FP16 outputs about 0.02
on the demo): an FP16 or FP32 engine gated as INT8 fails. Where quantization barely moves the outputs the two
cannot be told apart by outputs; the check then errs towards passing (a float engine is no less accurate).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from edge_tl.core.bundle import Bundle, utc_now
from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.fsutil import atomic_write_text

#: relative tolerances of a float engine's logits, as a fraction of the median largest |logit| on the golden set
#: (TF32 on Ampere/Orin gives relative errors around 1e-3; FP16's 10-bit mantissa around 1e-3..1e-2)
FLOAT_MARGIN_FRACTION = {"fp32": 1e-3, "fp16": 1e-2}
#: the quantile of the INT8 model's margin shift (against FP32) taken as the INT8 tolerance
INT8_SHIFT_QUANTILE = 0.95


class ParityThresholds(BaseModel):
    max_top1_drop: float | None = Field(None, ge=0, le=1, description="allowed fraction of judged top-1 changes")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="lowest per-sample cosine similarity")
    max_rel_diff: float | None = Field(None, ge=0, description="max |out - reference| / max |reference|")
    min_int8_departure: float | None = Field(
        None, ge=0, description="int8/best: lowest |out - fp32| / |int8 reference - fp32| (a float engine: ~0)")

    @classmethod
    def for_precision(cls, precision: str, **overrides: float | None) -> ParityThresholds:
        if precision not in DEFAULT_THRESHOLDS:
            raise EdgeTLError(f"no parity thresholds for precision '{precision}'",
                              f"choose one of {', '.join(DEFAULT_THRESHOLDS)}")
        base = DEFAULT_THRESHOLDS[precision].model_dump()
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


DEFAULT_THRESHOLDS = {
    "fp32": ParityThresholds(max_top1_drop=0.0, min_cosine=0.9999, max_rel_diff=0.01),
    "fp16": ParityThresholds(max_top1_drop=0.02, min_cosine=0.999, max_rel_diff=0.05),
    "int8": ParityThresholds(max_top1_drop=0.10, min_cosine=0.95, max_rel_diff=0.5, min_int8_departure=0.4),
}
DEFAULT_THRESHOLDS["best"] = DEFAULT_THRESHOLDS["int8"]


def reference_kind(precision: str) -> str:
    """Which golden outputs a precision is compared with: ``int8`` (the INT8 reference) or ``fp32``."""
    return "int8" if precision in ("int8", "best") else "fp32"


class OutputParity(BaseModel):
    name: str
    count: int
    reference: str = Field("fp32", description="fp32: the FP32 golden outputs; int8: the INT8 reference outputs")
    margin_tolerance: float = Field(0.0, description="reference top-1 margins at or below this are near-ties")
    judged: int = Field(0, description="golden inputs whose reference margin is above the tolerance")
    top1_agreement: float = Field(description="share of judged inputs whose top-1 equals the reference's")
    top1_mismatches: list[int] = Field(description="judged golden inputs whose top-1 changed")
    near_tie_changes: list[int] = Field(default_factory=list, description="near-ties that changed (not counted)")
    max_abs_diff: float
    mean_abs_diff: float
    max_rel_diff: float
    cosine_min: float
    cosine_mean: float
    int8_departure: float | None = Field(None, description="see the module doc; None where not measured")
    finite: bool = True


class ParityReport(BaseModel):
    passed: bool
    precision: str
    backend: str
    runner: dict[str, Any] = Field(default_factory=dict)
    bundle: dict[str, Any] = Field(default_factory=dict)
    thresholds: ParityThresholds
    outputs: dict[str, OutputParity] = Field(default_factory=dict)
    failures: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    error: str | None = None
    created: str = Field(default_factory=utc_now)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def summary(self) -> str:
        parts = []
        for o in self.outputs.values():
            part = (f"{o.name} vs {o.reference.upper()} reference: top-1 {o.top1_agreement:.3f} of {o.judged} judged"
                    f" ({len(o.near_tie_changes)} near-tie change(s) not counted), cosine min {o.cosine_min:.5f}, "
                    f"max |diff| {o.max_abs_diff:.4g} (rel {o.max_rel_diff:.4g})")
            if o.int8_departure is not None:
                part += f", INT8 departure {o.int8_departure:.3f}"
            parts.append(part)
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.failures or [self.error or "?"])
        return f"parity {self.precision} on {self.backend} {verdict}" + (f" ({'; '.join(parts)})" if parts else "")

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise CheckFailed(self.summary(), "keep the worst layers in higher precision (edge-tl engine sensitivity "
                                              "BUNDLE, then engine build --keep-worst K) or use a higher precision")


def top1_margins(logits: np.ndarray) -> np.ndarray:
    """Per row: the largest logit minus the second largest (0 for a single-class output)."""
    rows = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    if rows.shape[1] < 2:
        return np.zeros(len(rows))
    top2 = np.sort(rows, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def int8_departure(actual: np.ndarray, int8: np.ndarray, fp32: np.ndarray) -> float | None:
    """``|actual - fp32| / |int8 - fp32|`` (see the module doc); None where INT8 equals FP32 (nothing to tell
    them apart by)."""
    a, q, f = (np.asarray(x, dtype=np.float64).reshape(len(x), -1) for x in (actual, int8, fp32))
    if a.shape != q.shape or f.shape != q.shape or not np.isfinite(a).all():
        return None
    apart = float(np.linalg.norm(f - q))
    if apart <= 1e-6 * max(float(np.linalg.norm(f)), 1e-12):
        return None
    return float(np.linalg.norm(a - f)) / apart


def compare_outputs(name: str, actual: np.ndarray, reference: np.ndarray, *, margin_tolerance: float = 0.0,
                    reference_kind: str = "fp32", fp32: np.ndarray | None = None) -> OutputParity:
    """The parity numbers of one output (rows are samples). ``fp32``: the FP32 golden outputs, given when the
    reference is the INT8 one (for the INT8 departure)."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape:
        raise EdgeTLError(f"output '{name}' has shape {list(actual.shape)}, the reference has "
                          f"{list(reference.shape)}", "check the engine was built from this bundle's model")
    n = reference.shape[0]
    a2, g2 = actual.reshape(n, -1), reference.reshape(n, -1)
    finite = bool(np.isfinite(a2).all())
    a2 = np.nan_to_num(a2, nan=0.0, posinf=0.0, neginf=0.0) if not finite else a2
    diff = np.abs(a2 - g2)
    changed = a2.argmax(axis=1) != g2.argmax(axis=1)
    judged = top1_margins(g2) > margin_tolerance
    mismatches = np.flatnonzero(changed & judged)
    near = np.flatnonzero(changed & ~judged)
    n_judged = int(judged.sum())
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(g2, axis=1)
    cos = np.where(norms > 0, (a2 * g2).sum(axis=1) / np.where(norms > 0, norms, 1.0), 0.0)
    scale = float(np.abs(g2).max()) or 1.0
    departure = int8_departure(a2, g2, fp32) if fp32 is not None and finite else None
    return OutputParity(name=name, count=n, reference=reference_kind, margin_tolerance=float(margin_tolerance),
                        judged=n_judged, top1_agreement=1.0 - len(mismatches) / n_judged if n_judged else 1.0,
                        top1_mismatches=[int(i) for i in mismatches], near_tie_changes=[int(i) for i in near],
                        max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                        max_rel_diff=float(diff.max() / scale), cosine_min=float(cos.min()),
                        cosine_mean=float(cos.mean()), int8_departure=departure, finite=finite)


def judge(out: OutputParity, th: ParityThresholds) -> list[str]:
    fails = []
    if not out.finite:
        fails.append(f"{out.name} has NaN or infinite values")
    drop = 1.0 - out.top1_agreement
    if th.max_top1_drop is not None and drop > th.max_top1_drop + 1e-12:
        fails.append(f"{out.name} top-1 changed on {len(out.top1_mismatches)}/{out.judged} judged golden inputs "
                     f"({drop:.3f} > {th.max_top1_drop})")
    if th.min_cosine is not None and out.cosine_min < th.min_cosine:
        fails.append(f"{out.name} cosine similarity {out.cosine_min:.5f} < {th.min_cosine}")
    if th.max_rel_diff is not None and out.max_rel_diff > th.max_rel_diff:
        fails.append(f"{out.name} max relative difference {out.max_rel_diff:.4g} > {th.max_rel_diff}")
    if (th.min_int8_departure is not None and out.int8_departure is not None
            and out.int8_departure < th.min_int8_departure):
        fails.append(f"{out.name} is {out.int8_departure:.3f} as far from the FP32 outputs as the INT8 reference "
                     f"(< {th.min_int8_departure}): the engine does not compute the INT8 model (a float engine "
                     "gated as INT8?)")
    return fails


def derive_tolerances(fp32: np.ndarray, int8: np.ndarray) -> tuple[dict[str, float], str]:
    """The top-1 margin below which a reference answer is a near-tie, per precision, from the build's own outputs
    (FP32 and INT8 Q/DQ-in-float logits of the same images). Returns (tolerances, how they were derived).

    * fp32 / fp16: a fraction (:data:`FLOAT_MARGIN_FRACTION`) of the median largest |logit|: the rounding a
      correct float engine adds.
    * int8 / best: the :data:`INT8_SHIFT_QUANTILE` quantile of how much quantization moved each image's top-1
      margin (INT8 margin minus the FP32 logits' gap between the same two classes): a device's INT8 kernels
      round differently from Q/DQ in float, by at most one quantization step per tensor, so their shift is of
      the same order or smaller; never below the fp16 tolerance."""
    f = np.asarray(fp32, dtype=np.float64).reshape(len(fp32), -1)
    q = np.asarray(int8, dtype=np.float64).reshape(len(int8), -1)
    if f.shape != q.shape or not len(f) or not (np.isfinite(f).all() and np.isfinite(q).all()):
        raise EdgeTLError("the FP32 and INT8 reference outputs differ in shape or hold NaN/inf",
                          "this is a bug in the build; report it with the run folder")
    scale = float(np.median(np.abs(f).max(axis=1)))
    tol = {p: frac * scale for p, frac in FLOAT_MARGIN_FRACTION.items()}
    rows = np.arange(len(q))
    order = np.argsort(q, axis=1)
    a, b = order[:, -1], order[:, -2] if q.shape[1] > 1 else order[:, -1]
    shift = np.abs((q[rows, a] - q[rows, b]) - (f[rows, a] - f[rows, b]))
    tol["int8"] = max(float(np.quantile(shift, INT8_SHIFT_QUANTILE)), tol["fp16"])
    tol["best"] = tol["int8"]
    note = (f"fp32/fp16: {FLOAT_MARGIN_FRACTION['fp32']:g}/{FLOAT_MARGIN_FRACTION['fp16']:g} of the median "
            f"largest |logit| ({scale:.4g}); int8/best: the {INT8_SHIFT_QUANTILE:.0%} quantile of the INT8 model's "
            f"top-1 margin shift against FP32 over {len(q)} images (golden and validation), at least the fp16 one")
    return {k: round(v, 6) for k, v in tol.items()}, note


def judge_parity(bundle: Bundle, actual: dict[str, np.ndarray], precision: str, thresholds: ParityThresholds,
                 *, backend: str, runner: dict[str, Any] | None = None) -> ParityReport:
    """Judge a runner's outputs on the bundle's golden inputs (``actual``: output name -> N x classes) against the
    bundle's reference for ``precision``: the device's gate (edge_tl.device.engine.parity.check_parity) and the
    build's self-gate both end here."""
    th = thresholds
    kind = reference_kind(precision)
    reference = bundle.golden_reference(precision)
    fp32 = bundle.golden_outputs() if kind == "int8" else None
    tolerance = bundle.margin_tolerance(precision)
    golden = {bundle.manifest.output.name: reference}
    if len(actual) == 1 and len(golden) == 1 and set(actual) != set(golden):
        actual = {next(iter(golden)): next(iter(actual.values()))}  # one output, named differently
    outputs, failures, notes = {}, [], []
    for name, ref in golden.items():
        if name not in actual:
            raise EdgeTLError(f"the runner gave outputs {sorted(actual)}, not the golden '{name}'",
                              "check the engine was built from this bundle's model")
        o = compare_outputs(name, actual[name], ref, margin_tolerance=tolerance, reference_kind=kind, fp32=fp32)
        outputs[name] = o
        failures += judge(o, th)
        if o.near_tie_changes:
            notes.append(f"{name}: {len(o.near_tie_changes)} near-tie(s) changed top-1 (reference margin <= "
                         f"{tolerance:.4g}; not counted)")
        if o.count and o.judged < o.count / 2:
            notes.append(f"{name}: only {o.judged}/{o.count} golden inputs have a reference margin above "
                         f"{tolerance:.4g}: top-1 says little about this model")
    if bundle.manifest.golden.tolerance_note:
        notes.append(f"tolerance: {bundle.manifest.golden.tolerance_note}")
    return ParityReport(passed=not failures, precision=precision, backend=backend, runner=runner or {},
                        bundle={"name": bundle.manifest.name, "bundle_id": bundle.manifest.bundle_id,
                                "golden": int(len(reference)), "reference": kind, "margin_tolerance": tolerance},
                        thresholds=th, outputs=outputs, failures=failures, notes=notes)
