"""Stage folders keyed by a hash of their inputs and settings, and the run folder's state.

``<run>/stages/<stage>-<key>/`` is written in a temporary folder and renamed when the stage completes, with
``done.json`` inside; so a folder that exists is finished. A re-run computes every key first: a stage whose
folder exists is skipped, the first one missing is where an interrupted run resumes. ``--force STAGE``
redoes that stage and every stage that depends on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_tl import __version__
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_dir, atomic_write_text, file_lock

# Bump a stage's number when its code changes what it produces: old cache entries then stop matching.
# scratch 2: BatchNorm momentum 0.1 in the from-scratch recipe (train.fit.scratch_phases)
# finetune 2, scratch 3: validation predictions saved (negative-transfer guard), scratch saves its model
# prune 6, qat 2: choices between candidates scored on the decision set (validation + data.val_views copies)
# prune 7: a latency target prunes with both rankings (prune.target.ranking = "auto"); metrics key auto_choice
# prune 8: a recovery that fails its check on the decision set is rerun (prune.recovery_retries, retry_below)
STAGE_VERSIONS = {"data": 1, "finetune": 3, "scratch": 3, "prune": 9, "export": 1, "quantize": 1, "qat": 2}
DEPENDS = {"data": (), "finetune": ("data",), "scratch": ("data",), "prune": ("finetune",), "export": ("prune",),
           "quantize": ("export",), "qat": ("quantize",)}
RUN_FILE = "run.json"
#: the run folder's lock (flock; never deleted, see edge_tl.core.fsutil.file_lock)
LOCK_FILE = ".edge-tl.lock"
DONE = "done.json"


def stage_key(stage: str, settings: dict[str, Any], upstream: list[str]) -> str:
    payload = {"stage": stage, "version": STAGE_VERSIONS[stage], "edge_tl": __version__, "settings": settings,
               "upstream": upstream}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dependents(stage: str) -> set[str]:
    """``stage`` and everything downstream of it."""
    out = {stage}
    changed = True
    while changed:
        changed = False
        for s, deps in DEPENDS.items():
            if s not in out and any(d in out for d in deps):
                out.add(s)
                changed = True
    return out


def file_digest(path: str | Path) -> str:
    from edge_tl.core.fsutil import sha256_file

    return sha256_file(path)


class StageCache:
    def __init__(self, run_dir: Path, force: set[str] | None = None, *, writer: bool = True):
        self.root = run_dir / "stages"
        if not writer:  # a torchrun rank other than 0 reads rank 0's stages and touches nothing
            self.forced, self._redone = set(), set()
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.forced = set()
        for s in force or ():
            self.forced |= dependents(s)
        self._redone: set[str] = set()
        for partial in self.root.glob(".*.partial-*"):  # left by a run that was killed mid-stage
            shutil.rmtree(partial, ignore_errors=True)

    def folder(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key}"

    def is_done(self, stage: str, key: str) -> bool:
        if stage in self.forced and stage not in self._redone:
            return False
        return (self.folder(stage, key) / DONE).is_file()

    @contextmanager
    def writing(self, stage: str, key: str, info: dict[str, Any]) -> Iterator[Path]:
        """A temporary folder for the stage's files; renamed to the stage folder (with done.json) on success."""
        start = time.perf_counter()
        with atomic_dir(self.folder(stage, key), overwrite=True) as tmp:
            yield tmp
            done = {"stage": stage, "key": key, "seconds": round(time.perf_counter() - start, 2), **info}
            atomic_write_text(tmp / DONE, json.dumps(done, indent=2) + "\n")
        self._redone.add(stage)

    def read_json(self, stage: str, key: str, name: str) -> Any:
        return json.loads((self.folder(stage, key) / name).read_text())


class RunFolder:
    """``<out>/`` with run.json: refuses a finished run (unless overwrite) and a folder edge-tl did not make,
    resumes an interrupted one, and is held by one build at a time (``.edge-tl.lock``, an flock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        self._held = contextlib.ExitStack()

    @property
    def state(self) -> dict[str, Any] | None:
        f = self.path / RUN_FILE
        try:
            return json.loads(f.read_text()) if f.is_file() else None
        except json.JSONDecodeError:
            return None

    def _foreign(self) -> bool:
        """A folder with files but no run.json: not an edge-tl run, so nothing in it is ours to write or delete."""
        return self.state is None and any(f.name != LOCK_FILE for f in self.path.iterdir())

    def claim(self, overwrite: bool) -> str:
        """Check the folder may be used and hold its lock (until :meth:`release`); return 'new', 'resume' or
        'overwrite'. A second build on the same folder is refused at once: it would resume the first's
        "running" state and delete its outputs under it."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise EdgeTLError(f"--out {p} is a file", "choose a folder for the run")
        if p.is_dir() and self._foreign():
            raise EdgeTLError(f"output folder {p} already exists and is not an edge-tl run folder (no {RUN_FILE})",
                              "choose another --out: a new or empty folder (edge-tl writes and deletes only in its "
                              "own run folders, even with --overwrite)")
        p.mkdir(parents=True, exist_ok=True)

        def busy(holder: str) -> EdgeTLError:
            return EdgeTLError(f"another build ({holder}) is writing to {p}",
                               "wait for it to finish, or choose another --out")

        self._held.enter_context(file_lock(p / LOCK_FILE, "edge-tl build", busy=busy))
        try:
            return self._decide(overwrite)
        except BaseException:
            self.release()
            raise

    def _decide(self, overwrite: bool) -> str:
        state = self.state  # read again under the lock
        if state is None:
            if self._foreign():  # files appeared between the check and the lock
                raise EdgeTLError(f"output folder {self.path} is not an edge-tl run folder", "choose another --out")
            return "new"
        if state.get("status") == "done":
            if not overwrite:
                raise EdgeTLError(f"output folder {self.path} already holds a finished build",
                                  "choose another --out, or pass --overwrite to rebuild (finished stages are reused)")
            return "overwrite"
        return "resume"

    def release(self) -> None:
        """Let the next build have the folder."""
        self._held.close()

    def mark(self, status: str, *, fresh: bool = False, **info: Any) -> None:
        """Record ``status`` (running, done, failed, interrupted) in run.json; ``fresh`` drops what was there."""
        data = {**({} if fresh else self.state or {}), "status": status, "edge_tl": __version__, **info}
        atomic_write_text(self.path / RUN_FILE, json.dumps(data, indent=2, default=str) + "\n")
