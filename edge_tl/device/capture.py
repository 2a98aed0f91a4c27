"""Field capture (issue 25 item 2): keep the inputs the model is unsure of, for the next model.

Opt-in in ``infer`` (``--capture DIR``) and ``serve`` (``--capture DIR``, /classify). A picture is kept when

* its top-1 score is below ``max_score`` (``low-score``), or
* its top-1 and top-2 scores are closer than ``min_margin`` (``small-margin``), or
* a seeded draw at ``random_rate`` picks it (``random``: an unbiased sample of what the device sees, so the field's
  accuracy can be estimated without the selection's bias),

within caps: at most ``max_per_minute`` pictures a minute and ``max_bytes`` in the folder (what is there counts).
Each picture is the original bytes (a file's or a request's; a camera frame as PNG) plus a JSON sidecar (bundle id,
scores, reason, time, source, the image's sha256), written atomically: the image, then the sidecar, each through a
temporary file and a rename, so a crash leaves at most a ``.tmp-*`` file, which the next start removes (only those:
nothing else in the folder is touched). A sidecar is the commit mark: a collector takes only pictures that have one.

Capture never stops inference: a full disk, a read-only folder or a quota stops *capture*, with one warning, and
``describe()`` says why.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.core.errors import EdgeTLError

log = logging.getLogger("edge_tl.capture")

SIDECAR_SUFFIX = ".json"
TMP_PREFIX = ".tmp-"
IMAGE_EXTS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


@dataclass(frozen=True)
class CapturePolicy:
    max_score: float = 0.6  # top-1 below this: the model is unsure
    min_margin: float = 0.1  # top-1 minus top-2 below this: it hesitates between two classes
    random_rate: float = 0.01  # an unbiased sample of everything else
    max_per_minute: int = 30
    max_bytes: int = 512 << 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, low, high in (("max score", self.max_score, 0.0, 1.0), ("margin", self.min_margin, 0.0, 1.0),
                                       ("random rate", self.random_rate, 0.0, 1.0)):
            if not low <= value <= high:
                raise EdgeTLError(f"capture {name} {value} is outside [{low:g}, {high:g}]",
                                  f"give a capture {name} between {low:g} and {high:g}")
        if self.max_per_minute < 0 or self.max_bytes < 0:
            raise EdgeTLError("capture caps must be >= 0", "e.g. 30 pictures a minute, 512 MiB")


def reason_for(probs: np.ndarray, policy: CapturePolicy, draw: float, unknown: bool = False) -> str | None:
    """Why a picture with these class probabilities is kept (None: not kept). ``draw`` in [0, 1); ``unknown``:
    the bundle's OOD rule called it unknown (edge_tl.core.postprocess), the first reason to keep it."""
    p = np.sort(np.asarray(probs, dtype=np.float64).reshape(-1))[::-1]
    if p.size == 0:
        return None
    if unknown:
        return "unknown"
    if p[0] < policy.max_score:
        return "low-score"
    if p.size > 1 and p[0] - p[1] < policy.min_margin:
        return "small-margin"
    if draw < policy.random_rate:
        return "random"
    return None


class Capturer:
    """Thread-safe (serve calls it from its inference threads)."""

    def __init__(self, folder: str | Path, policy: CapturePolicy, bundle_id: str, labels: list[str]):
        self.folder = Path(folder)
        self.policy = policy
        self.bundle_id = bundle_id
        self.labels = labels
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(policy.seed)
        self._minute: list[float] = []
        self.kept: dict[str, int] = {}
        self.skipped_rate = 0
        self.stopped: str | None = None  # why capture stopped (disk full, quota, not writable)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for leftover in self.folder.glob(TMP_PREFIX + "*"):  # a crash's half-written files: ours
                leftover.unlink(missing_ok=True)
            self.bytes = sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())
        except OSError as exc:
            raise EdgeTLError(f"cannot use the capture folder {self.folder} ({exc.strerror or exc})",
                              "give a writable folder to --capture") from exc

    def describe(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "policy": asdict(self.policy), "kept": dict(self.kept),
                "skipped_by_rate_cap": self.skipped_rate, "bytes": self.bytes, "stopped": self.stopped}

    def decide(self, probs: np.ndarray, ood: dict[str, Any] | None = None) -> str | None:
        """The cheap half, for the request's path: why this picture would be kept (None: not kept, or capture has
        stopped, or the per-minute cap is reached). A picture decided on takes its place under the per-minute cap
        at once; :meth:`keep` writes it (or gives the place back if it cannot). No I/O."""
        with self._lock:
            if self.stopped:
                return None
            reason = reason_for(probs, self.policy, float(self._rng.random()), bool((ood or {}).get("unknown")))
            if reason is None:
                return None
            now = time.monotonic()
            self._minute = [t for t in self._minute if now - t < 60.0]
            if len(self._minute) >= self.policy.max_per_minute:
                self.skipped_rate += 1
                return None
            self._minute.append(now)
            return reason

    def consider(self, probs: np.ndarray, *, source: str, data: bytes | Callable[[], bytes | None] | None = None,
                 image: Any = None, frame: int | None = None, ood: dict[str, Any] | None = None) -> str | None:
        """Keep this picture if the policy says so (and the caps allow); returns the reason it was kept, else
        None. ``data``: the original encoded bytes (or a function that reads them, called only for a kept
        picture); without them ``image`` (PIL, or a BGR array from OpenCV) is saved as PNG. ``ood``: the bundle's
        ``ood_score``/``unknown`` for this picture (recorded in the sidecar; unknown pictures are kept first).
        Never raises for an I/O problem: capture stops, inference goes on. (:meth:`decide` then :meth:`keep`;
        serve calls them apart, so that only the pictures kept leave the request's thread.)"""
        reason = self.decide(probs, ood)
        if reason is None:
            return None
        return self.keep(reason, probs, source=source, data=data, image=image, frame=frame, ood=ood)

    def keep(self, reason: str, probs: np.ndarray, *, source: str,
             data: bytes | Callable[[], bytes | None] | None = None, image: Any = None, frame: int | None = None,
             ood: dict[str, Any] | None = None) -> str | None:
        """Write a picture :meth:`decide` kept (the slow half: encode, hash, two atomic writes with fsync). Returns
        the reason, or None where it was not written (then its place under the per-minute cap is given back). The
        lock is not held while encoding or writing: serve's request path (:meth:`decide`) never waits on a disk."""
        with self._lock:
            if self.stopped:
                return self._give_back()
        try:
            raw = data() if callable(data) else data
            blob, ext = (raw, _ext_of(raw)) if raw is not None else (_png(image), ".png")
        except Exception as exc:  # noqa: BLE001 - an image that can't be encoded is not worth stopping for
            log.warning("capture: cannot encode %s (%s)", source, exc)
            with self._lock:
                return self._give_back()
        with self._lock:
            if self.stopped:
                return self._give_back()
            if self.bytes + len(blob) > self.policy.max_bytes:
                self._stop(f"the capture folder reached its quota ({self.policy.max_bytes} bytes)")
                return self._give_back()
            self.bytes += len(blob)  # its share of the quota, taken before it is written
        digest = hashlib.sha256(blob).hexdigest()
        stamp = time.time()
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(stamp))}-{digest[:12]}"
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        order = np.argsort(-p, kind="stable")[:5]
        sidecar = {"image": name + ext, "sha256": digest, "bytes": len(blob), "reason": reason,
                   "bundle_id": self.bundle_id, "source": source, "frame": frame,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)),
                   "top_k": [{"label": self.labels[i] if i < len(self.labels) else str(i), "index": int(i),
                              "score": round(float(p[i]), 6)} for i in order], **(ood or {})}
        meta = (json.dumps(sidecar, indent=1) + "\n").encode()
        try:
            self._write(name + ext, blob)
            self._write(name + SIDECAR_SUFFIX, meta)  # last: the commit mark
        except OSError as exc:
            (self.folder / (name + ext)).unlink(missing_ok=True)
            with self._lock:
                self.bytes -= len(blob)
                self._stop(f"writing to {self.folder} failed ({exc.strerror or exc})")
                return self._give_back()
        with self._lock:
            self.bytes += len(meta)
            self.kept[reason] = self.kept.get(reason, 0) + 1
        return reason

    def _give_back(self) -> None:
        """A picture decided on but not written: its place under the per-minute cap is free again (any of the
        places: they differ only by when they leave the window). Call with the lock held."""
        if self._minute:
            self._minute.pop()
        return None

    def _write(self, name: str, blob: bytes) -> None:
        tmp = self.folder / f"{TMP_PREFIX}{name}"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _stop(self, why: str) -> None:
        self.stopped = why
        log.warning("capture stopped: %s; inference goes on", why)


def _ext_of(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return IMAGE_EXTS.get(img.format or "", ".bin")


def _png(image: Any) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):  # OpenCV frames are BGR
        image = Image.fromarray(np.ascontiguousarray(image[:, :, ::-1]))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
