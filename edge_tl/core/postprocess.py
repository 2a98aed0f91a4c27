"""Postprocessing that travels with the model: what turns the network's logits into the scores users see.

One :class:`PostprocessConfig` is written to every bundle (schema 2 on) as ``postprocess.json``, an artifact
like ``preprocess.json`` (hashed, part of the bundle id), and read by every runtime through
``Bundle.postprocess``: ``edge-tl infer`` and ``edge-tl serve``'s ``/classify`` report
``softmax(logits / temperature)``. The temperature is fitted by the build on the validation split
(temperature scaling, Guo et al., ICML 2017: minimise the negative log-likelihood of the shipped model's
logits; see edge_tl.workstation.calibrate), so a score of 0.9 means right about 90% of the time. It changes
no prediction (the arg-max is the same) and no raw output: the KServe v2 ``/infer`` endpoint and the parity
gate keep returning and comparing logits.

It also carries the out-of-distribution (OOD) rule, when the build fitted one: a score of how much an input looks
like the training classes (``energy``: logsumexp of the logits, Liu et al., NeurIPS 2020; ``max_logit``:
Hendrycks et al., ICML 2022; ``msp``: the top calibrated probability, Hendrycks & Gimpel, ICLR 2017) and a
threshold fitted on validation so that ``in_distribution_kept`` of the validation images pass. An input scoring
below it is answered "unknown" by ``infer`` and ``/classify`` (its scores and top-k are still given): a softmax
of 0.999 says nothing about a picture of no class, since the softmax must sum to 1 over the known classes.

A bundle of schema 1 (built before calibration existed) has no ``postprocess.json``: it is read with
temperature 1 (plain softmax, ``fitted_on`` null), which is what those bundles always meant. NumPy and
pydantic only: the device reads it without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_tl.core.drift import DriftReference
from edge_tl.core.errors import EdgeTLError

POSTPROCESS_SCHEMA_VERSION = 3  # 2: the OOD rule (``ood``) and the drift reference (``drift``), absent in 1;
#                                 3: the drift reference's threshold per signal (2: one for all, still read)
OOD_SCORES = ("energy", "max_logit", "msp")


class OODRule(BaseModel):
    """An input is "unknown" when ``score(logits) < threshold`` (higher scores look more like the classes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    score: Literal["energy", "max_logit", "msp"]
    threshold: float
    in_distribution_kept: float = Field(gt=0, le=1, description="share of the validation images at or above the "
                                        "threshold (what it was fitted to keep)")
    fitted_on: str


def ood_scores(logits: np.ndarray, score: str, temperature: float = 1.0) -> np.ndarray:
    """Per-row in-distribution score of (N, C) logits: higher looks more like the training classes."""
    x = np.asarray(logits, dtype=np.float64)
    if score == "energy":  # -E(x) = logsumexp(f(x)) at T = 1 (Liu et al. 2020)
        m = x.max(axis=-1, keepdims=True)
        return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]
    if score == "max_logit":
        return x.max(axis=-1)
    if score == "msp":
        return softmax(x / temperature).max(axis=-1).astype(np.float64)
    raise EdgeTLError(f"unknown OOD score {score!r}", f"use one of {', '.join(OOD_SCORES)}")


class PostprocessConfig(BaseModel):
    """Scores = ``softmax(logits / temperature)`` over the classes, row by row."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: int = POSTPROCESS_SCHEMA_VERSION
    temperature: float = Field(1.0, gt=0, description="logits are divided by this before the softmax (finite, > 0)")
    fitted_on: str | None = Field(None, description="what the temperature was fitted on; null: not fitted "
                                  "(temperature 1, plain softmax)")
    ood: OODRule | None = Field(None, description="the out-of-distribution rule; null: none (every input gets a "
                                "class, as before schema 2)")
    drift: DriftReference | None = Field(None, description="the validation reference serve's drift check compares "
                                         "with (edge_tl.core.drift); null: none")

    @property
    def calibrated(self) -> bool:
        return self.fitted_on is not None

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of a (N, C) logits array: ``softmax(logits / temperature)``."""
        return softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    def ood_score(self, logits: np.ndarray) -> np.ndarray | None:
        """The OOD rule's score of each row (None without a rule)."""
        return None if self.ood is None else ood_scores(logits, self.ood.score, self.temperature)

    def unknown(self, logits: np.ndarray) -> np.ndarray | None:
        """Whether each row is "unknown" (scores below the OOD threshold); None without a rule."""
        score = self.ood_score(logits)
        return None if score is None else score < self.ood.threshold

    def ood_fields(self, logits_row: np.ndarray) -> dict[str, object]:
        """What infer's record and /classify's answer add for one input: ``ood_score`` and ``unknown`` (nothing
        without a rule)."""
        if self.ood is None:
            return {}
        score = float(self.ood_score(np.asarray(logits_row).reshape(1, -1))[0])
        return {"ood_score": round(score, 6), "unknown": bool(score < self.ood.threshold)}

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {"temperature": self.temperature, "calibrated": self.calibrated}
        if self.ood is not None:
            out["ood"] = {"score": self.ood.score, "threshold": self.ood.threshold}
        return out

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
