"""The parity gate: run the bundle's golden inputs through any runner and compare with the golden FP32 outputs.

Per output: top-1 agreement rate (argmax equal to the golden argmax), max and mean absolute difference, max
difference relative to the golden outputs' largest magnitude, and cosine similarity per sample (min and mean).

Default thresholds, by precision (override any of them; ``None`` switches a check off):

======== ============== ========== ============ ===========================================================
precision max_top1_drop min_cosine max_rel_diff why
======== ============== ========== ============ ===========================================================
fp32     0.0            0.9999     0.01         same maths; TF32 (on by default on Ampere/Orin in ORT-CUDA)
                                                alone gives relative errors around 1e-3
fp16     0.02           0.999      0.05         10-bit mantissa on activations; only near-ties may flip
int8     0.10           0.95       0.5          the issue's bar: >= 90 % top-1 agreement; cosine 0.95 still
                                                catches a depthwise net whose logits went wrong on the device
best     as int8                                (may run INT8)
======== ============== ========== ============ ===========================================================

``max_top1_drop`` is the allowed fraction of golden inputs whose top-1 differs from the golden FP32 top-1
(0.10 of 32 golden images = 3 flips; of 6, none). ``max_rel_diff`` = max |out - golden| / max |golden|.
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
from edge_tl.device.runtime.base import BaseRunner


class ParityThresholds(BaseModel):
    max_top1_drop: float | None = Field(None, ge=0, le=1, description="allowed fraction of top-1 changes")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="lowest per-sample cosine similarity")
    max_rel_diff: float | None = Field(None, ge=0, description="max |out - golden| / max |golden|")

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
    "int8": ParityThresholds(max_top1_drop=0.10, min_cosine=0.95, max_rel_diff=0.5),
}
DEFAULT_THRESHOLDS["best"] = DEFAULT_THRESHOLDS["int8"]


class OutputParity(BaseModel):
    name: str
    count: int
    top1_agreement: float
    top1_mismatches: list[int] = Field(description="indices of golden inputs whose top-1 changed")
    max_abs_diff: float
    mean_abs_diff: float
    max_rel_diff: float
    cosine_min: float
    cosine_mean: float
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
    error: str | None = None
    created: str = Field(default_factory=utc_now)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def summary(self) -> str:
        parts = [f"{o.name}: top-1 {o.top1_agreement:.3f}, cosine min {o.cosine_min:.5f}, "
                 f"max |diff| {o.max_abs_diff:.4g} (rel {o.max_rel_diff:.4g})" for o in self.outputs.values()]
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.failures or [self.error or "?"])
        return f"parity {self.precision} on {self.backend} {verdict}" + (f" ({'; '.join(parts)})" if parts else "")

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise CheckFailed(self.summary(), "keep the worst layers in higher precision (edge-tl engine sensitivity "
                                              "BUNDLE, then engine build --keep-worst K) or use a higher precision")


def compare_outputs(name: str, actual: np.ndarray, golden: np.ndarray) -> OutputParity:
    """The parity numbers of one output (rows are samples)."""
    actual = np.asarray(actual, dtype=np.float64)
    golden = np.asarray(golden, dtype=np.float64)
    if actual.shape != golden.shape:
        raise EdgeTLError(f"output '{name}' has shape {list(actual.shape)}, golden has {list(golden.shape)}",
                          "check the engine was built from this bundle's model")
    n = golden.shape[0]
    a2, g2 = actual.reshape(n, -1), golden.reshape(n, -1)
    finite = bool(np.isfinite(a2).all())
    a2 = np.nan_to_num(a2, nan=0.0, posinf=0.0, neginf=0.0) if not finite else a2
    diff = np.abs(a2 - g2)
    mismatches = np.nonzero(a2.argmax(axis=1) != g2.argmax(axis=1))[0]
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(g2, axis=1)
    cos = np.where(norms > 0, (a2 * g2).sum(axis=1) / np.where(norms > 0, norms, 1.0), 0.0)
    scale = float(np.abs(g2).max()) or 1.0
    return OutputParity(name=name, count=n, top1_agreement=1.0 - len(mismatches) / n,
                        top1_mismatches=[int(i) for i in mismatches], max_abs_diff=float(diff.max()),
                        mean_abs_diff=float(diff.mean()), max_rel_diff=float(diff.max() / scale),
                        cosine_min=float(cos.min()), cosine_mean=float(cos.mean()), finite=finite)


def judge(out: OutputParity, th: ParityThresholds) -> list[str]:
    fails = []
    if not out.finite:
        fails.append(f"{out.name} has NaN or infinite values")
    drop = 1.0 - out.top1_agreement
    if th.max_top1_drop is not None and drop > th.max_top1_drop + 1e-12:
        fails.append(f"{out.name} top-1 changed on {len(out.top1_mismatches)}/{out.count} golden inputs "
                     f"({drop:.3f} > {th.max_top1_drop})")
    if th.min_cosine is not None and out.cosine_min < th.min_cosine:
        fails.append(f"{out.name} cosine similarity {out.cosine_min:.5f} < {th.min_cosine}")
    if th.max_rel_diff is not None and out.max_rel_diff > th.max_rel_diff:
        fails.append(f"{out.name} max relative difference {out.max_rel_diff:.4g} > {th.max_rel_diff}")
    return fails


def run_golden(runner: BaseRunner, inputs: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Golden inputs through ``runner`` in batches of at most ``batch_size``; outputs concatenated.

    A runner with a static batch (a DLA engine) gets exactly its batch: the last chunk is padded by repeating its
    last input, and the padded rows' outputs are dropped."""
    static = runner.static_batch()
    step = static or batch_size
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(inputs), step):
        chunk = inputs[start:start + step]
        real = len(chunk)
        if static and real < static:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], static - real, axis=0)])
        for name, arr in runner.infer(np.ascontiguousarray(chunk)).items():
            chunks.setdefault(name, []).append(np.asarray(arr)[:real])
    return {name: np.concatenate(parts, axis=0) for name, parts in chunks.items()}


def check_parity(bundle: Bundle, runner: BaseRunner, precision: str, thresholds: ParityThresholds | None = None,
                 *, batch_size: int | None = None) -> ParityReport:
    """Compare ``runner`` on the bundle's golden inputs with the golden FP32 outputs (activates it if needed)."""
    th = thresholds or ParityThresholds.for_precision(precision)
    inputs = bundle.golden_inputs()
    golden = {bundle.manifest.output.name: bundle.golden_outputs()}
    batch = max(1, min(batch_size or bundle.manifest.max_batch, bundle.manifest.max_batch))
    if runner.is_active:
        actual = run_golden(runner, inputs, batch)
        described = runner.describe()
    else:
        with runner:
            actual = run_golden(runner, inputs, batch)
            described = runner.describe()
    if len(actual) == 1 and len(golden) == 1 and set(actual) != set(golden):
        actual = {next(iter(golden)): next(iter(actual.values()))}  # one output, named differently
    outputs, failures = {}, []
    for name, ref in golden.items():
        if name not in actual:
            raise EdgeTLError(f"the runner gave outputs {sorted(actual)}, not the golden '{name}'",
                              "check the engine was built from this bundle's model")
        outputs[name] = compare_outputs(name, actual[name], ref)
        failures += judge(outputs[name], th)
    return ParityReport(passed=not failures, precision=precision, backend=runner.backend, runner=described,
                        bundle={"name": bundle.manifest.name, "bundle_id": bundle.manifest.bundle_id,
                                "golden": int(len(inputs))},
                        thresholds=th, outputs=outputs, failures=failures)
