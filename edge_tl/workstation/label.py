"""`edge-tl label DIR` (issue 25 item 5): label the pictures the devices captured, in a small local web page.

DIR is what ``edge-tl collect`` wrote (images with JSON sidecars carrying the bundle id, the top-k scores, the reason,
the source and the time; edge_tl.device.capture) or any folder of images. For each image the page shows the model's
suggestion with its score: from the sidecar's ``top_k`` when it has one, else from a ``suggest`` function (the CLI
passes the bundle's classifier, edge_tl.device.infer). Keys: Enter or ``a`` accepts the suggestion, 1..9 picks that
class, ``s`` skips, ``u`` undoes the last decision.

Results go to LABELLED, never into DIR (DIR is only read):

* a decided image is *copied* to ``LABELLED/<class>/<sha256[:16]><ext>`` through a temporary file and a rename;
* every decision is one JSON line appended to ``LABELLED/labels.log.jsonl`` (file, sha256, suggestion, score,
  decision accept/correct/skip/undo, label, time, bundle id when known), written after the copy: the log is the
  truth, a copy without its line is overwritten when the image is decided again;
* undo appends an ``undo`` line, then removes the copy it made; the image is shown again;
* a second run on the same DIR and LABELLED resumes: the images the log has decided (by sha256) are not shown again.

An image that cannot be decoded is shown as an error entry that can only be skipped. The same picture twice in DIR
(the same bytes) is shown once.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_write_bytes, sha256_file

log = logging.getLogger("edge_tl.label")

LOG_NAME = "labels.log.jsonl"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DECISIONS = ("accept", "correct", "skip")
PREVIEW_PX = 480  # the longer side of the picture the page shows (the copy keeps the original bytes)
MAX_SIDECAR_BYTES = 1 << 20

#: the model's top-k for one RGB PIL image, best first: [{"label": str, "score": float}, ...]
Suggest = Callable[[Any], list[dict[str, Any]]]
#: a Grad-CAM map (H x W, values in [0, 1]) of one RGB PIL image for the class index given
Explain = Callable[[Any, int], np.ndarray]


@dataclass
class Entry:
    """One picture of DIR (the first of its content, by name)."""

    path: Path
    name: str  # relative to DIR, as the page and the log show it
    sha256: str
    top_k: list[dict[str, Any]] | None = None  # the sidecar's, best first
    bundle_id: str | None = None  # the sidecar's
    meta: dict[str, Any] = field(default_factory=dict)


def parse_classes(text: str) -> list[str]:
    """``--classes a,b,c`` as a list (checked with :func:`check_classes`)."""
    return check_classes([c.strip() for c in text.split(",")])


def check_classes(classes: list[str]) -> list[str]:
    """The classes, each usable as a folder name; a one-line EdgeTLError otherwise."""
    from edge_tl.core.bundle import unsafe_class_name

    fix = "give class names that are folder names, e.g. --classes cat,dog,other"
    if not classes or any(not c for c in classes):
        raise EdgeTLError("a class name is empty (--classes)", fix)
    if len(set(classes)) != len(classes):
        raise EdgeTLError(f"a class is named twice ({', '.join(classes)})", fix)
    for c in classes:
        why = unsafe_class_name(c)
        if why is None and ("/" in c or "\\" in c or c.startswith(".") or c == LOG_NAME):
            why = "a folder can't be named so (a slash, or a leading dot)"
        if why:
            raise EdgeTLError(f"the class {c!r} can't be a folder of LABELLED: {why}", fix)
    return list(classes)


def check_folders(src: str | Path, out: str | Path) -> tuple[Path, Path]:
    """DIR must be a folder; LABELLED must be outside it (and not hold it) and be empty, absent or one that
    ``edge-tl label`` made (it has a labels.log.jsonl). Returns both, resolved."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise EdgeTLError(f"{src} is not a folder", "give the folder edge-tl collect wrote, or any folder of images")
    rs, ro = src.resolve(), out.resolve()
    if ro == rs or rs in ro.parents:
        raise EdgeTLError(f"--out {out} is inside {src}", "write the labelled copies outside the folder being "
                          "labelled (DIR is only read), e.g. --out labelled/")
    if ro in rs.parents:
        raise EdgeTLError(f"{src} is inside --out {out}", "give an --out folder outside DIR")
    if out.exists() and not out.is_dir():
        raise EdgeTLError(f"--out {out} is a file", "give a folder (created if absent)")
    if out.is_dir() and not (out / LOG_NAME).is_file() and any(out.iterdir()):
        raise EdgeTLError(f"--out {out} is not empty and was not made by edge-tl label (it has no {LOG_NAME})",
                          "give a new or empty folder, or the --out of an earlier edge-tl label to resume")
    return rs, ro


def _display(name: str) -> str:
    """A file name as valid UTF-8 text (bytes that aren't are shown as U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _top_k(meta: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The sidecar's top-k (edge_tl.device.capture, edge-tl infer's records), best first, or None."""
    rows = meta.get("top_k")
    if not isinstance(rows, list):
        return None
    out = []
    for r in rows:
        if isinstance(r, dict) and isinstance(r.get("label"), str) and isinstance(r.get("score"), (int, float)):
            out.append({"label": r["label"], "score": float(r["score"])})
    return sorted(out, key=lambda r: -r["score"]) or None


def scan(src: Path) -> tuple[list[Entry], list[str]]:
    """The images under ``src`` (recursive, hidden files and folders left out, sorted by name), one per content,
    each with its sidecar's suggestion; and one line per file that could not be read."""
    problems: list[str] = []
    paths: list[Path] = []
    for top, dirs, names in os.walk(src, onerror=lambda e: problems.append(f"{e.filename}: cannot be listed")):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [Path(top) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    by_sha: dict[str, dict[str, Any]] = {}
    for side in src.rglob("*.json"):
        meta = _read_json(side) if not any(p.startswith(".") for p in side.relative_to(src).parts) else None
        if meta and isinstance(meta.get("sha256"), str):
            by_sha.setdefault(meta["sha256"], meta)
    entries: list[Entry] = []
    seen: set[str] = set()
    for path in sorted(paths, key=lambda p: str(p.relative_to(src))):
        name = _display(str(path.relative_to(src)))
        try:
            digest = sha256_file(path)
        except OSError as exc:
            problems.append(f"{name}: cannot be read ({exc.strerror or exc}); left out")
            continue
        if digest in seen:
            continue
        seen.add(digest)
        meta = by_sha.get(digest)
        if meta is None:  # a sidecar without sha256: by name (collect's X.png.json, capture's X.json)
            for side in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
                cand = _read_json(side) if side.is_file() else None
                if cand and cand.get("sha256") in (None, digest):
                    meta = cand
                    break
        meta = meta or {}
        bid = meta.get("bundle_id")
        entries.append(Entry(path, name, digest, _top_k(meta), bid if isinstance(bid, str) else None, meta))
    return entries, problems


def read_log(out: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Replay LABELLED/labels.log.jsonl: the decision in force for each sha256, and the order they were made in
    (the last is what undo takes back). A line cut short by a crash is left out."""
    decided: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    path = out / LOG_NAME
    if not path.is_file():
        return decided, order
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                sha, decision = rec["sha256"], rec["decision"]
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    log.warning("%s line %d is not a decision (cut short?); left out", path, n)
                continue
            if decision == "undo":
                decided.pop(sha, None)
                if sha in order:
                    del order[len(order) - 1 - order[::-1].index(sha)]
            elif decision in DECISIONS:
                decided[sha] = rec
                order.append(sha)
    return decided, order


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LabelSession:
    """The labelling state of DIR into LABELLED. Thread-safe (the web server calls it from its threads)."""

    def __init__(self, src: str | Path, out: str | Path, classes: list[str], *, suggest: Suggest | None = None,
                 bundle_id: str | None = None, explain: Explain | None = None):
        self.src, self.out = check_folders(src, out)
        self.classes = check_classes(list(classes))
        self.suggest = suggest
        self.bundle_id = bundle_id
        self.explain = explain
        entries, self.problems = scan(self.src)
        if not entries:
            raise EdgeTLError(f"{src} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                              "give the folder edge-tl collect wrote, or a folder of images")
        self.entries = {e.sha256: e for e in entries}
        self.order = [e.sha256 for e in entries]
        self.out.mkdir(parents=True, exist_ok=True)
        self.decided, self.history = read_log(self.out)
        self._lock = threading.Lock()
        self._front: str | None = None  # an undone image: shown next
        self._cache: dict[str, dict[str, Any]] = {}  # sha -> decoded image, preview, suggestion (current only)

    # ---- state -------------------------------------------------------------------------------------------------
    @property
    def pending(self) -> list[str]:
        return [s for s in self.order if s not in self.decided]

    def current(self) -> str | None:
        if self._front is not None and self._front in self.entries and self._front not in self.decided:
            return self._front
        return next((s for s in self.order if s not in self.decided), None)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return self._state()

    def _state(self) -> dict[str, Any]:
        total = len(self.order)
        done = sum(1 for s in self.order if s in self.decided)
        counts = {c: 0 for c in self.classes}
        for rec in self.decided.values():
            if rec.get("label") in counts:
                counts[rec["label"]] += 1
        sha = self.current()
        cur = None
        if sha is not None:
            view = self._view(sha)
            e = self.entries[sha]
            cur = {"sha256": sha, "file": e.name, "error": view["error"], "suggestion": view["suggestion"],
                   "score": view["score"], "top_k": view["top_k"], "suggested_by": view["suggested_by"],
                   "suggestion_known": view["suggestion"] in self.classes, "cam": view["cam"] is not None}
        return {"classes": self.classes, "total": total, "decided": done, "remaining": total - done,
                "counts": counts, "skipped": sum(1 for r in self.decided.values() if r["decision"] == "skip"),
                "can_undo": bool(self.history), "current": cur, "out": str(self.out)}

    def _view(self, sha: str) -> dict[str, Any]:
        """Decode the picture once and work out its suggestion (and Grad-CAM); only the current one is kept."""
        if sha in self._cache:
            return self._cache[sha]
        e = self.entries[sha]
        view: dict[str, Any] = {"error": None, "image": None, "top_k": e.top_k, "suggested_by": None, "cam": None}
        try:
            view["image"] = _decode(e.path)
        except EdgeTLError as exc:
            view["error"] = exc.one_line()
        if e.top_k:
            view["suggested_by"] = "sidecar" + (f" (bundle {e.bundle_id})" if e.bundle_id else "")
        elif view["image"] is not None and self.suggest is not None:
            try:
                view["top_k"] = [{"label": str(r["label"]), "score": float(r["score"])}
                                 for r in self.suggest(view["image"])]
                view["suggested_by"] = "model" + (f" (bundle {self.bundle_id})" if self.bundle_id else "")
            except Exception as exc:  # noqa: BLE001 - no suggestion for this picture; labelling goes on
                view["error_suggest"] = f"no suggestion: {exc}"
                log.warning("%s: no suggestion (%s)", e.name, exc)
        top = (view["top_k"] or [None])[0]
        view["suggestion"] = top["label"] if top else None
        view["score"] = round(top["score"], 6) if top else None
        if self.explain is not None and view["image"] is not None and view["suggestion"] in self.classes:
            try:
                view["cam"] = self.explain(view["image"], self.classes.index(view["suggestion"]))
            except Exception as exc:  # noqa: BLE001 - the overlay is a help, not a requirement
                log.warning("%s: no Grad-CAM (%s)", e.name, exc)
        self._cache = {sha: view}
        return view

    # ---- pictures ----------------------------------------------------------------------------------------------
    def preview(self, sha: str) -> bytes:
        """The picture as a PNG at most PREVIEW_PX on its longer side (what the page shows)."""
        with self._lock:
            if sha not in self.entries:
                raise KeyError(sha)
            view = self._view(sha) if sha == self.current() else {"image": _try_decode(self.entries[sha].path)}
            if view["image"] is None:
                raise KeyError(sha)
            return _png(_fit(view["image"]))

    def cam(self, sha: str) -> bytes:
        """The Grad-CAM map of the suggested class over the picture, as a PNG (KeyError when there is none)."""
        with self._lock:
            if sha != self.current():
                raise KeyError(sha)
            view = self._view(sha)
            if view["cam"] is None:
                raise KeyError(sha)
            return _png(overlay(_fit(view["image"]), view["cam"]))

    # ---- decisions ---------------------------------------------------------------------------------------------
    def decide(self, sha: str, decision: str, label: str | None = None) -> dict[str, Any]:
        """accept (the suggestion), correct (to ``label``) or skip the current picture ``sha``; returns the new
        state. EdgeTLError when ``sha`` is not the current picture or the decision can't be taken."""
        with self._lock:
            if sha != self.current():
                raise EdgeTLError("that picture is not the one to label now (decided already?)", "reload the page")
            if decision not in DECISIONS:
                raise EdgeTLError(f"unknown decision {decision!r}", "accept, correct or skip")
            view, e = self._view(sha), self.entries[sha]
            if view["error"] and decision != "skip":
                raise EdgeTLError(f"{e.name} cannot be decoded", "skip it")
            if decision == "accept":
                label = view["suggestion"]
                if label not in self.classes:
                    raise EdgeTLError("there is no suggestion among the classes to accept", "pick a class by number")
            elif decision == "correct":
                if label not in self.classes:
                    raise EdgeTLError(f"{label!r} is not one of the classes", f"one of {', '.join(self.classes)}")
            else:
                label = None
            rec = {"file": e.name, "sha256": sha, "suggestion": view["suggestion"], "score": view["score"],
                   "decision": decision, "label": label, "time": _now(),
                   "bundle_id": self.bundle_id if view["top_k"] and not e.top_k else e.bundle_id}
            if label is not None:
                rel = f"{label}/{sha[:16]}{e.path.suffix.lower()}"
                atomic_write_bytes(self.out / rel, e.path.read_bytes())
                rec["copy"] = rel
            self._append(rec)  # after the copy: a line in the log is a copy on disk
            self.decided[sha] = rec
            self.history.append(sha)
            if self._front == sha:
                self._front = None
            return self._state()

    def undo(self) -> dict[str, Any]:
        """Take back the last decision in force (this run's or an earlier one's): an ``undo`` line, then its copy
        is removed, and the picture is shown again."""
        with self._lock:
            if not self.history:
                raise EdgeTLError("nothing to undo", "decide a picture first")
            sha = self.history[-1]
            prev = self.decided[sha]
            self._append({"file": prev.get("file"), "sha256": sha, "suggestion": prev.get("suggestion"),
                          "score": prev.get("score"), "decision": "undo", "label": prev.get("label"),
                          "undoes": prev["decision"], "time": _now(), "bundle_id": prev.get("bundle_id")})
            self.history.pop()
            del self.decided[sha]
            copy = prev.get("copy")
            if isinstance(copy, str):
                target = (self.out / copy).resolve()
                if self.out in target.parents:  # a log line never points outside LABELLED
                    target.unlink(missing_ok=True)
            self._front = sha
            return self._state()

    def _append(self, rec: dict[str, Any]) -> None:
        with open(self.out / LOG_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ---- images ------------------------------------------------------------------------------------------------------
def _decode(path: Path) -> Any:
    """The picture as 8-bit RGB (edge_tl.core.preprocess.to_rgb, as infer and serve read it), or EdgeTLError."""
    from PIL import Image

    from edge_tl.core.preprocess import image_size_problem, to_rgb

    try:
        with Image.open(path) as img:
            problem = image_size_problem(img.width, img.height)
            if problem:
                raise EdgeTLError(problem)
            img.load()
            rgb = to_rgb(img)
            return rgb.copy() if rgb is img else rgb
    except EdgeTLError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise EdgeTLError(f"cannot decode image: {type(exc).__name__}: {exc}") from None


def _try_decode(path: Path) -> Any:
    try:
        return _decode(path)
    except EdgeTLError:
        return None


def _fit(image: Any) -> Any:
    """Scaled so its longer side is PREVIEW_PX: small pictures (a 32-pixel capture) are enlarged, pixel by pixel."""
    from PIL import Image

    scale = PREVIEW_PX / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def overlay(image: Any, cam: np.ndarray, alpha: float = 0.45) -> Any:
    """A Grad-CAM map (values in [0, 1]) over an RGB PIL image, in a blue-to-red colour scale."""
    from PIL import Image

    m = Image.fromarray((np.clip(np.asarray(cam, dtype=np.float32), 0, 1) * 255).astype(np.uint8))
    m = np.asarray(m.resize(image.size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    heat = np.stack([np.clip(1.5 - abs(4 * m - k), 0, 1) for k in (3, 2, 1)], axis=-1)  # jet: red, green, blue
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    return Image.fromarray((255 * ((1 - alpha) * rgb + alpha * heat)).round().astype(np.uint8))


# ---- the web page ------------------------------------------------------------------------------------------------
def create_app(session: LabelSession) -> Any:
    """The FastAPI app: the page, the state, the pictures, the decisions."""
    from edge_tl.core.importer import require

    fastapi = require("fastapi", "edge-tl label")
    responses = require("fastapi.responses", "edge-tl label")
    app = fastapi.FastAPI(title="edge-tl label", docs_url=None, redoc_url=None, openapi_url=None)
    JSON, Resp = responses.JSONResponse, responses.Response

    def answer(fn: Callable[[], dict[str, Any]]) -> Any:
        try:
            return JSON(fn())
        except EdgeTLError as exc:
            return JSON({"error": exc.one_line(), "state": session.state()}, status_code=409)

    @app.get("/")
    def page() -> Any:
        return responses.HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    @app.get("/api/state")
    def state() -> Any:
        return answer(session.state)

    @app.get("/api/image/{sha}")
    def image(sha: str) -> Any:
        try:
            return Resp(session.preview(sha), media_type="image/png")
        except KeyError:
            return JSON({"error": "no such picture"}, status_code=404)

    @app.get("/api/cam/{sha}")
    def cam(sha: str) -> Any:
        try:
            return Resp(session.cam(sha), media_type="image/png")
        except KeyError:
            return JSON({"error": "no Grad-CAM for this picture"}, status_code=404)

    @app.post("/api/decide")
    def decide(body: dict[str, Any]) -> Any:
        return answer(lambda: session.decide(str(body.get("sha256")), str(body.get("decision")),
                                             body.get("label") if isinstance(body.get("label"), str) else None))

    @app.post("/api/undo")
    def undo() -> Any:
        return answer(session.undo)

    return app


class LabelServer:
    """uvicorn serving :func:`create_app` on a socket bound here (``port`` 0: a free one; ``url`` says which)."""

    def __init__(self, session: LabelSession, host: str = "127.0.0.1", port: int = 0):
        from edge_tl.core.importer import require

        uvicorn = require("uvicorn", "edge-tl label")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise EdgeTLError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                              "choose another --port (0: any free one) or --host") from None
        bound = self.sock.getsockname()[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/"
        config = uvicorn.Config(create_app(session), log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve until Ctrl-C/SIGTERM (or :meth:`stop`); ``on_ready(url)`` once it listens."""
        if on_ready is not None:
            def wait() -> None:
                while not self.server.started and not self.server.should_exit:
                    time.sleep(0.02)
                if self.server.started:
                    on_ready(self.url)
            threading.Thread(target=wait, daemon=True).start()
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def stop(self) -> None:
        self.server.should_exit = True


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edge-tl label</title>
<style>
body{font:15px system-ui,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{padding:8px 16px;background:#223;color:#fff;display:flex;gap:24px;align-items:baseline}
#msg{color:#fc6}
main{display:flex;gap:20px;padding:16px;flex-wrap:wrap}
#pics{display:flex;gap:12px}
#pics img{max-width:480px;max-height:480px;image-rendering:pixelated;background:#ddd;border:1px solid #bbb}
#side{min-width:280px;max-width:440px}
#file{font-family:monospace;word-break:break-all;margin-bottom:8px}
#suggestion{font-size:20px;margin:8px 0}
#error{color:#b00;font-weight:bold;white-space:pre-wrap}
#classes button{display:block;width:100%;text-align:left;margin:3px 0;padding:6px 8px;font-size:15px}
#classes button.suggested{border:2px solid #2a2}
.keys button{margin:8px 6px 0 0;padding:6px 10px}
kbd{background:#eee;border:1px solid #999;border-radius:3px;padding:0 4px;font-size:13px}
#done{padding:24px;font-size:20px}
</style></head>
<body>
<header><b>edge-tl label</b><span id="progress">loading...</span><span id="msg"></span></header>
<main id="work" hidden>
  <div id="pics"><img id="img" alt="the picture"><img id="cam" alt="Grad-CAM of the suggestion" hidden></div>
  <div id="side">
    <div id="file"></div>
    <div id="suggestion"></div>
    <div id="error"></div>
    <div id="classes"></div>
    <div class="keys">
      <button id="accept"><kbd>Enter</kbd>/<kbd>a</kbd> accept</button>
      <button id="skip"><kbd>s</kbd> skip</button>
      <button id="undo"><kbd>u</kbd> undo</button>
    </div>
  </div>
</main>
<div id="done" hidden>Done: every picture is decided. <span id="summary"></span>
  <div class="keys"><button id="undo2"><kbd>u</kbd> undo the last decision</button></div></div>
<script>
"use strict";
let st = null, busy = false;
const $ = (id) => document.getElementById(id);
async function call(method, url, body) {
  busy = true;
  try {
    const r = await fetch(url, {method, headers: {"Content-Type": "application/json"},
                                body: body ? JSON.stringify(body) : undefined});
    const data = await r.json();
    if (!r.ok) { $("msg").textContent = data.error || ("HTTP " + r.status); render(data.state || st); }
    else { $("msg").textContent = ""; render(data); }
  } catch (e) { $("msg").textContent = "the label server does not answer: " + e; }
  finally { busy = false; }
}
function render(s) {
  if (!s) return;
  st = s;
  const c = s.current;
  $("progress").textContent = s.decided + " / " + s.total + " decided, " + s.remaining + " left";
  document.body.dataset.decided = s.decided;
  document.body.dataset.current = c ? c.sha256 : "";
  $("work").hidden = !c; $("done").hidden = !!c;
  $("undo").disabled = $("undo2").disabled = !s.can_undo;
  if (!c) {
    $("summary").textContent = Object.entries(s.counts).map(([k, v]) => k + ": " + v).join(", ") +
      (s.skipped ? ", skipped: " + s.skipped : "") + ". The copies and labels.log.jsonl are in " + s.out + ".";
    return;
  }
  $("file").textContent = c.file;
  if (c.error) { $("img").removeAttribute("src"); $("img").hidden = true; }
  else { $("img").hidden = false; $("img").src = "/api/image/" + c.sha256; }
  $("cam").hidden = !c.cam;
  if (c.cam) $("cam").src = "/api/cam/" + c.sha256; else $("cam").removeAttribute("src");
  $("error").textContent = c.error ? c.error + "\\nThis picture can only be skipped (s)." : "";
  $("suggestion").textContent = c.suggestion === null ? "no suggestion" :
    "suggestion: " + c.suggestion + " (" + (100 * c.score).toFixed(1) + "%)" +
    (c.suggestion_known ? "" : ", not one of the classes") + (c.suggested_by ? " from the " + c.suggested_by : "");
  $("accept").disabled = !!c.error || !c.suggestion_known;
  const box = $("classes");
  box.textContent = "";
  s.classes.forEach((name, i) => {
    const b = document.createElement("button");
    b.textContent = (i < 9 ? (i + 1) + "  " : "") + name;
    b.dataset.cls = name;
    b.disabled = !!c.error;
    if (name === c.suggestion) b.className = "suggested";
    b.onclick = () => decide("correct", name);
    box.appendChild(b);
  });
}
function decide(decision, label) {
  if (busy || !st || !st.current) return;
  call("POST", "/api/decide", {sha256: st.current.sha256, decision, label: label || null});
}
function undo() { if (!busy && st && st.can_undo) call("POST", "/api/undo"); }
$("accept").onclick = () => decide("accept");
$("skip").onclick = () => decide("skip");
$("undo").onclick = $("undo2").onclick = undo;
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.altKey || e.metaKey || !st) return;
  const c = st.current;
  if (e.key === "u") undo();
  else if (!c) return;
  else if (e.key === "Enter" || e.key === "a") { if (!c.error && c.suggestion_known) decide("accept"); }
  else if (e.key === "s") decide("skip");
  else if (/^[1-9]$/.test(e.key)) { const i = Number(e.key) - 1; if (!c.error && i < st.classes.length)
    decide("correct", st.classes[i]); }
  else return;
  e.preventDefault();
});
call("GET", "/api/state");
</script>
</body></html>
"""
