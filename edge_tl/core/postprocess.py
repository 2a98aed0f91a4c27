"""Postprocessing that travels with the model: what turns the network's logits into the scores users see.

One :class:`PostprocessConfig` is written to every bundle (schema 2 on) as ``postprocess.json``, an artifact
like ``preprocess.json`` (hashed, part of the bundle id), and read by every runtime through
``Bundle.postprocess``: ``edge-tl infer`` and ``edge-tl serve``'s ``/classify`` report
``softmax(logits / temperature)``. The temperature is fitted by the build on the validation split
(temperature scaling, Guo et al., ICML 2017: minimise the negative log-likelihood of the shipped model's
logits; see edge_tl.workstation.calibrate), so a score of 0.9 means right about 90% of the time. It changes
no prediction (the arg-max is the same) and no raw output: the KServe v2 ``/infer`` endpoint and the parity
gate keep returning and comparing logits.

A bundle of schema 1 (built before calibration existed) has no ``postprocess.json``: it is read with
temperature 1 (plain softmax, ``fitted_on`` null), which is what those bundles always meant. NumPy and
pydantic only: the device reads it without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_tl.core.errors import EdgeTLError

POSTPROCESS_SCHEMA_VERSION = 1


class PostprocessConfig(BaseModel):
    """Scores = ``softmax(logits / temperature)`` over the classes, row by row."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: int = POSTPROCESS_SCHEMA_VERSION
    temperature: float = Field(1.0, gt=0, description="logits are divided by this before the softmax (finite, > 0)")
    fitted_on: str | None = Field(None, description="what the temperature was fitted on; null: not fitted "
                                  "(temperature 1, plain softmax)")

    @property
    def calibrated(self) -> bool:
        return self.fitted_on is not None

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of a (N, C) logits array: ``softmax(logits / temperature)``."""
        return softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    def summary(self) -> dict[str, object]:
        return {"temperature": self.temperature, "calibrated": self.calibrated}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PostprocessConfig:
        """Read and validate ``postprocess.json``; a one-line EdgeTLError names the bad field."""
        path = Path(path)
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError as exc:
            raise EdgeTLError(f"{path} does not exist", "point at a bundle built by `edge-tl build`") from exc
        except json.JSONDecodeError as exc:
            raise EdgeTLError(f"{path} is not valid JSON ({exc})", "rebuild the bundle") from exc
        except ValueError as exc:  # pydantic's ValidationError: name the first bad field in one line
            errors = getattr(exc, "errors", None)
            if callable(errors) and errors():
                err = errors()[0]
                what = f"'{'.'.join(str(p) for p in err['loc']) or 'value'}' {err['msg']} (got {err.get('input')!r})"
            else:
                what = str(exc).splitlines()[0]
            raise EdgeTLError(f"{path} is not a valid postprocess.json: {what}",
                              "the temperature must be a finite number > 0; rebuild the bundle") from exc


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a (N, C) array, computed stably in float64, returned as float32."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
