"""`edge-tl infer`: classify images, videos, cameras and streams with a bundle, one JSON line per picture.

Each record (one line of JSON)::

    {"source": "photos/a.jpg", "frame": null, "timestamp": "2025-01-01T12:00:00.123Z",
     "top_k": [{"label": "cat", "index": 3, "score": 0.91}, ...], "latency_ms": 4.2, "infer_ms": 3.1,
     "model_version": "<bundle_id>"}

``score`` is the bundle's calibrated probability, ``softmax(logits / temperature)`` with the temperature of its
``postprocess.json`` (1 for bundles built before calibration; edge_tl.core.postprocess). A bundle with an
out-of-distribution rule adds ``ood_score`` and ``unknown`` (true: the picture looks like none of the classes; its
top-k is still given). ``frame`` is the frame
index for videos and streams; ``latency_ms`` covers preprocessing and inference,
``infer_ms`` the runner alone. A picture that cannot be read gives ``{"source", "frame", "timestamp",
"error", "model_version"}`` instead, and processing goes on. Preprocessing is the bundle's own
``preprocess.json`` (``Bundle.preprocessor``); the backend is the best one installed unless chosen.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from edge_tl.core.bundle import Bundle
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.layout import DeviceLayout
from edge_tl.core.postprocess import softmax  # noqa: F401  (re-exported: plain softmax, temperature 1)
from edge_tl.device.capture import Capturer
from edge_tl.device.engine.cache import EngineCache
from edge_tl.device.runners import create_runner
from edge_tl.device.runtime.base import BaseRunner
from edge_tl.device.sources import Item, SourceSpec, open_source, parse_source


def top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The k best classes of one row of probabilities, best first."""
    k = max(1, min(int(k), probs.shape[-1]))
    idx = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i] if i < len(labels) else str(i), "index": int(i), "score": round(float(probs[i]), 6)}
            for i in idx]


def iso_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def resolve_bundle(bundle: str | Path | None, root: str | Path | None
                   ) -> tuple[Bundle, Path | None, str | None]:
    """The bundle named by --bundle, or the active deployed one under --root (with its engine folder and the
    precision its deploy gate checked)."""
    if (bundle is None) == (root is None):
        raise EdgeTLError("give exactly one of --bundle and --root", "--bundle DIR for a bundle, --root DIR for "
                          "the model deployed there")
    if bundle is not None:
        return Bundle.open(bundle), None, None
    active = DeviceLayout(Path(root)).active()
    if active is None or not active.bundle_dir.is_dir():
        raise EdgeTLError(f"no active model under {root}", "deploy one first (edge-tl deploy), or pass --bundle")
    return Bundle.open(active.bundle_dir), active.engine_dir, active.precision


@dataclass
class Classifier:
    """A bundle's preprocessing + an activated runner + its labels."""

    bundle: Bundle
    runner: BaseRunner
    version: str = field(init=False)

    def __post_init__(self) -> None:
        self.version = self.bundle.manifest.bundle_id
        self.input_name = self.bundle.manifest.input.name
        self.output_name = self.bundle.manifest.output.name

    @classmethod
    def load(cls, bundle: Bundle, backend: str = "auto", precision: str | None = None, *,
             threads: int | None = None, engine_dir: Path | None = None) -> Classifier:
        runner = create_runner(bundle, backend=backend, precision=precision, threads=threads,
                               engines=EngineCache(engine_dir))
        runner.activate()
        return cls(bundle, runner)

    def preprocess(self, image: Any) -> np.ndarray:
        pre = self.bundle.preprocessor
        return pre.from_bgr(image) if isinstance(image, np.ndarray) else pre(image)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.runner.infer({self.input_name: batch})[self.output_name]

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """The bundle's calibrated probabilities: softmax(logits / temperature) (edge_tl.core.postprocess)."""
        return self.bundle.postprocess.scores(logits)

    def classify(self, images: Sequence[Any], k: int = 5) -> list[list[dict[str, Any]]]:
        batch = np.stack([self.preprocess(img) for img in images])
        probs = self.scores(self.logits(batch))
        return [top_k(p, self.bundle.labels, k) for p in probs]

    def close(self) -> None:
        self.runner.deactivate()


def _file_bytes(item: Item) -> Callable[[], bytes | None]:
    def read() -> bytes | None:
        path = Path(item.source)
        return path.read_bytes() if item.frame is None and path.is_file() else None
    return read


def records(classifier: Classifier, items: Iterator[Item], k: int = 5,
            capture: Capturer | None = None) -> Iterator[dict[str, Any]]:
    """One record per item (see the module docstring); with ``capture`` the unsure ones are kept
    (edge_tl.device.capture) and their record says why (``captured``)."""
    for item in items:
        rec: dict[str, Any] = {"source": item.source, "frame": item.frame, "timestamp": iso_time(item.timestamp)}
        if item.error is None:
            try:
                start = time.perf_counter()
                x = classifier.preprocess(item.image)[None]
                t_inf = time.perf_counter()
                logits = classifier.logits(x)
                probs = classifier.scores(logits)[0]
                end = time.perf_counter()
                rec["top_k"] = top_k(probs, classifier.bundle.labels, k)
                ood = classifier.bundle.postprocess.ood_fields(logits[0])  # ood_score, unknown (with a rule)
                rec.update(ood)
                rec["latency_ms"] = round((end - start) * 1e3, 3)
                rec["infer_ms"] = round((end - t_inf) * 1e3, 3)
                if capture is not None:
                    why = capture.consider(probs, source=item.source, data=_file_bytes(item), image=item.image,
                                           frame=item.frame, ood=ood)
                    if why:
                        rec["captured"] = why
            except EdgeTLError as exc:  # e.g. an image too small for the crop: that picture only
                rec["error"] = exc.one_line()
        else:
            rec["error"] = item.error
        rec["model_version"] = classifier.version
        yield rec


@dataclass
class InferSummary:
    classified: int = 0
    errors: int = 0
    reconnects: int = 0
    temperature: float = 1.0  # the scores' temperature (the bundle's postprocess.json)
    calibrated: bool = False  # False: the bundle has no fitted temperature (plain softmax)
    training_problems: list[str] = field(default_factory=list)  # the build found the model no better than guessing
    capture: dict[str, Any] | None = None  # what --capture kept (edge_tl.device.capture.Capturer.describe)


def run_infer(source: str | SourceSpec, *, bundle: str | Path | None = None, root: str | Path | None = None,
              backend: str = "auto", precision: str | None = None, k: int = 5, every: int = 1,
              max_fps: float | None = None, out: IO[str] | None = None, max_reconnects: int = 10,
              threads: int | None = None, on_record: Callable[[dict[str, Any]], None] | None = None,
              capture: Any = None) -> InferSummary:
    """Classify SOURCE, writing one JSON line per picture to ``out`` (stdout by default). ``capture``: a folder
    (or (folder, CapturePolicy)) to keep the pictures the model is unsure of (edge_tl.device.capture)."""
    if k < 1:
        raise EdgeTLError(f"--top-k must be >= 1 (got {k})", "use e.g. --top-k 5")
    # a bad SOURCE fails before the model loads
    spec = source if isinstance(source, SourceSpec) else parse_source(source)
    b, engine_dir, gated = resolve_bundle(bundle, root)
    precision = precision or gated
    out = out or sys.stdout
    capturer = None
    if capture is not None:
        from edge_tl.device.capture import CapturePolicy

        folder, policy = capture if isinstance(capture, tuple) else (capture, CapturePolicy())
        capturer = Capturer(folder, policy, b.manifest.bundle_id, b.labels)
    classifier = Classifier.load(b, backend, precision, threads=threads, engine_dir=engine_dir)
    summary = InferSummary(temperature=b.postprocess.temperature, calibrated=b.postprocess.calibrated,
                           training_problems=b.manifest.training_problems())
    try:
        items = open_source(spec, every=every, max_fps=max_fps, max_reconnects=max_reconnects)
        for rec in records(classifier, items, k, capture=capturer):
            out.write(json.dumps(rec) + "\n")
            out.flush()
            if "error" in rec:
                summary.errors += 1
                summary.reconnects += rec["error"].startswith("stream lost")
            else:
                summary.classified += 1
            if on_record:
                on_record(rec)
    finally:
        classifier.close()
    summary.capture = capturer.describe() if capturer else None
    return summary
