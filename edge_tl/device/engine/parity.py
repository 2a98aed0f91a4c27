"""The parity gate on the device: run the bundle's golden inputs through any runner and judge the outputs against
the bundle's reference (:mod:`edge_tl.core.parity` holds the maths, the thresholds and the report, shared with
the build's self-gate).

For int8/best the reference is the INT8 model's outputs with Q/DQ evaluated in float, stored in the bundle at
build time; for fp32/fp16 the FP32 outputs. Top-1 changes count only where the reference's top-1 margin is above
the build's tolerance for that precision (near-ties are reported, not counted). See edge_tl.core.parity for the
default thresholds and why.
"""

from __future__ import annotations

import numpy as np

from edge_tl.core.bundle import Bundle
from edge_tl.core.parity import (
    DEFAULT_THRESHOLDS,
    OutputParity,
    ParityReport,
    ParityThresholds,
    compare_outputs,
    judge,
    judge_parity,
)
from edge_tl.device.runtime.base import BaseRunner

__all__ = ["DEFAULT_THRESHOLDS", "OutputParity", "ParityReport", "ParityThresholds", "check_parity",
           "compare_outputs", "judge", "judge_parity", "run_golden"]


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
    """Compare ``runner`` on the bundle's golden inputs with the bundle's reference for ``precision`` (activates
    the runner if needed)."""
    th = thresholds or ParityThresholds.for_precision(precision)
    bundle.golden_reference(precision)  # an old bundle without an INT8 reference is refused before anything runs
    inputs = bundle.golden_inputs()
    batch = max(1, min(batch_size or bundle.manifest.max_batch, bundle.manifest.max_batch))
    if runner.is_active:
        actual = run_golden(runner, inputs, batch)
        described = runner.describe()
    else:
        with runner:
            actual = run_golden(runner, inputs, batch)
            described = runner.describe()
    return judge_parity(bundle, actual, precision, th, backend=runner.backend, runner=described)
