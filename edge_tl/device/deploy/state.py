"""The device's deploy state under ``edge_tl.core.layout.DeviceLayout``: lock, atomic switch, history, records, pruning.

Runs on the device (no torch, no paramiko). Besides the layout's folders it keeps:

    <root>/uploads/<sha16>-<bundle_id>.tar.gz   what the workstation uploaded (resumable; removed after install)
    <root>/history.json                         {"stack": [ids, oldest active first]}: rollback pops the top
    <root>/versions/<id>/deploy.json            the deploy record of that version (when, from where, engine, parity)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edge_tl.core.bundle import utc_now
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_write_text, file_lock
from edge_tl.core.layout import DEFAULT_ROOT, DEPLOY_RECORD, DeviceLayout, root_problem

HISTORY = "history.json"
RECORD = DEPLOY_RECORD
PARITY = "parity.json"
UPLOADS = "uploads"
VERSION_RE = re.compile(r"^[0-9a-f]{16}$")

Notify = Callable[[str], None]


def check_root(layout: DeviceLayout) -> None:
    """Refuse a root that is not an edge-tl root, new or empty (issue 24: nothing edge-tl did not create is
    written over or deleted)."""
    problem = root_problem(layout.root)
    if problem:
        raise EdgeTLError(f"--root {problem}: not an edge-tl deploy root",
                          f"give a new or empty folder, or an existing edge-tl root (default {DEFAULT_ROOT})")


def uploads_dir(layout: DeviceLayout) -> Path:
    return layout.root / UPLOADS


def check_version_id(version: str) -> str:
    """Version ids name folders: only the 16 hex digits a bundle_id has are accepted."""
    if not VERSION_RE.match(version or ""):
        raise EdgeTLError(f"'{version}' is not a bundle id (16 hex digits)", "see `edge-tl deploy status` for the ids")
    return version


# -- the lock --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deploy_lock(layout: DeviceLayout, timeout: float, what: str, notify: Notify | None = None) -> Iterator[None]:
    """Hold ``<root>/.deploy.lock`` (flock) for the block; wait up to ``timeout`` s, then fail with who holds it."""
    check_root(layout)
    layout.root.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> EdgeTLError:
        return EdgeTLError(f"another deploy holds {layout.lock_file} ({holder}) and did not finish within "
                           f"{timeout:g} s", "wait for it to finish and re-run, or raise --lock-timeout")

    waiting = (lambda holder: notify(f"waiting up to {timeout:g} s for another deploy ({holder})")) if notify else None
    with file_lock(layout.lock_file, what, timeout=timeout, busy=busy, waiting=waiting):
        yield


# -- history and records ------------------------------------------------------------------------------------
def read_stack(layout: DeviceLayout) -> list[str]:
    try:
        stack = json.loads((layout.root / HISTORY).read_text()).get("stack", [])
    except (OSError, ValueError, AttributeError):
        stack = []
    return [v for v in stack if isinstance(v, str) and VERSION_RE.match(v)]


def write_stack(layout: DeviceLayout, stack: list[str]) -> None:
    atomic_write_text(layout.root / HISTORY, json.dumps({"stack": stack}, indent=2) + "\n")


def previous_version(layout: DeviceLayout) -> str | None:
    """The version active before the current one that is still on disk (what rollback switches to)."""
    active = layout.active_version()
    for version in reversed(read_stack(layout)):
        if version != active and layout.bundle_dir(version).is_dir():
            return version
    return None


def read_record(layout: DeviceLayout, version: str) -> dict[str, Any]:
    try:
        data = json.loads((layout.version_dir(version) / RECORD).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def update_record(layout: DeviceLayout, version: str, **fields: Any) -> dict[str, Any]:
    record = read_record(layout, version)
    record.update(fields)
    atomic_write_text(layout.version_dir(version) / RECORD, json.dumps(record, indent=2, default=str) + "\n")
    return record


def add_event(layout: DeviceLayout, version: str, event: str, **extra: Any) -> None:
    record = read_record(layout, version)
    events = record.get("events", []) + [{"at": utc_now(), "event": event, **extra}]
    update_record(layout, version, events=events)


def installed_versions(layout: DeviceLayout) -> list[str]:
    """Complete versions on disk (a bundle folder and a record), newest install first."""
    if not layout.versions_dir.is_dir():
        return []
    found = [p.name for p in layout.versions_dir.iterdir()
             if VERSION_RE.match(p.name) and (p / "bundle").is_dir() and (p / RECORD).is_file()]
    return sorted(found, key=lambda v: read_record(layout, v).get("installed_at", ""), reverse=True)


# -- switching ----------------------------------------------------------------------------------------------
def switch(layout: DeviceLayout, version: str | None) -> None:
    """Point ``active`` at ``versions/<version>`` atomically (a new relative link renamed over the old one);
    ``None`` removes the link (nothing active, as before a first deploy)."""
    link = layout.active_link
    if version is None:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        return
    if not layout.bundle_dir(version).is_dir():
        raise EdgeTLError(f"version {version} is not installed under {layout.versions_dir}", "deploy it first")
    tmp = link.with_name(f".active.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(os.path.join(layout.versions_dir.name, version), tmp)
    os.replace(tmp, link)
    dir_fd = os.open(layout.root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename durable before anyone restarts onto it
    finally:
        os.close(dir_fd)


def activate(layout: DeviceLayout, version: str) -> str | None:
    """Switch to ``version`` and push it on the history stack; returns the version that was active."""
    before = layout.active_version()
    switch(layout, version)
    stack = [v for v in read_stack(layout) if v != version] + [version]
    write_stack(layout, stack)
    return before


# -- cleaning up --------------------------------------------------------------------------------------------
def prune(layout: DeviceLayout, keep: int, notify: Notify | None = None) -> list[str]:
    """Delete all but the ``keep`` most recent versions; never the active or the previous one."""
    active, previous = layout.active_version(), previous_version(layout)
    stack = read_stack(layout)
    order = [v for v in reversed(stack)]  # most recently activated first
    order += [v for v in installed_versions(layout) if v not in order]  # then never-activated ones, newest first
    on_disk = set(installed_versions(layout))
    order = [v for v in order if v in on_disk]
    protected = {v for v in (active, previous) if v}
    kept = list(protected)
    for version in order:
        if len(kept) >= max(keep, len(protected)):
            break
        if version not in kept:
            kept.append(version)
    removed = [v for v in order if v not in kept]
    for version in removed:
        shutil.rmtree(layout.version_dir(version), ignore_errors=True)
        if notify:
            notify(f"removed old version {version} (keeping {keep})")
    if removed:
        write_stack(layout, [v for v in stack if v not in removed])
    return removed


def clean_leftovers(layout: DeviceLayout) -> None:
    """Undo what a killed deploy left: staging folders, half-installed versions (record status ``installing``),
    and a version it had moved aside to reinstall. Called only while holding the lock."""
    if not layout.versions_dir.is_dir():
        return
    active = layout.active_version()
    for path in layout.versions_dir.iterdir():
        if path.name.startswith(".staging-"):
            shutil.rmtree(path, ignore_errors=True)
        elif VERSION_RE.match(path.name) and path.name != active:
            if read_record(layout, path.name).get("status", "installing") == "installing":
                shutil.rmtree(path, ignore_errors=True)
    for path in layout.versions_dir.glob(".old-*"):
        version = path.name.split("-")[1]
        if VERSION_RE.match(version) and not layout.version_dir(version).exists():
            os.replace(path, layout.version_dir(version))
        else:
            shutil.rmtree(path, ignore_errors=True)
