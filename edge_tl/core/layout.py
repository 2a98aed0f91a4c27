"""Where deployed models live on a device (shared by deploy, engine, infer and serve).

    <root>/                      default /opt/edge-tl (deploy --root)
      versions/<bundle_id>/
        bundle/                  the unpacked bundle, verified against its manifest
        engine/                  engines built on this device (+ their sidecar JSON)
        parity.json              the parity gate's result on this device
      active -> versions/<id>    symlink; switched by creating a new link and renaming it over this one
      .deploy.lock               held (flock) by one deploy at a time
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("/opt/edge-tl")
#: what only an edge-tl root holds (any one of them marks a folder as one)
ROOT_MARKERS = ("versions", "active", ".deploy.lock", "history.json", "uploads")
#: system folders that are never a deploy root, whatever they hold (a fleet's edge_tl_root of / or /etc)
SYSTEM_DIRS = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/mnt", "/media", "/opt",
                         "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var"})


def system_dir(root: str | Path) -> bool:
    """Whether ``root`` is a system folder (or a user's home) that edge-tl must never use as its root."""
    text = os.path.normpath(str(root))
    home = os.path.normpath(os.path.expanduser("~"))
    return text in SYSTEM_DIRS or text == home or os.path.dirname(text) == "/home"


def root_problem(root: str | Path) -> str | None:
    """Why ``root`` can't be a deploy root, or None: a system folder, a file, or a folder with files but none of
    an edge-tl root's (deploy writes versions, links and uploads there and deletes old versions: never in a
    folder it did not make)."""
    path = Path(root)
    if system_dir(path) or system_dir(path.resolve()):
        return f"{root} is a system folder"
    if path.exists() and not path.is_dir():
        return f"{root} is a file"
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if names and not names & set(ROOT_MARKERS):
            shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
            return f"{root} holds files that are not edge-tl's ({shown})"
    return None


@dataclass(frozen=True)
class DeviceLayout:
    root: Path = DEFAULT_ROOT

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def active_link(self) -> Path:
        return self.root / "active"

    @property
    def lock_file(self) -> Path:
        return self.root / ".deploy.lock"

    def version_dir(self, version: str) -> Path:
        return self.versions_dir / version

    def bundle_dir(self, version: str) -> Path:
        return self.version_dir(version) / "bundle"

    def engine_dir(self, version: str) -> Path:
        return self.version_dir(version) / "engine"

    def active_version(self) -> str | None:
        """The active version id, or None when nothing is active (read the link once: it may switch)."""
        try:
            target = os.readlink(self.active_link)
        except (FileNotFoundError, OSError):
            return None
        return Path(target).name

    def active(self) -> ActiveVersion | None:
        """The active version with its bundle and engine folders, or None when nothing is active: the one lookup
        of "the deployed model" (``infer --root``, ``serve --root`` and its hot reload)."""
        version = self.active_version()
        if version is None:
            return None
        return ActiveVersion(version, self.bundle_dir(version), self.engine_dir(version),
                             _gated_precision(self.version_dir(version) / DEPLOY_RECORD))

    def active_bundle_dir(self) -> Path | None:
        active = self.active()
        return active.bundle_dir if active else None


#: the deploy record of a version (written by edge_tl.device.deploy.state)
DEPLOY_RECORD = "deploy.json"


def _gated_precision(record: Path) -> str | None:
    """The precision the deploy gate checked for this version (``deploy --precision``), None when unknown."""
    import json

    try:
        value = json.loads(record.read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ActiveVersion:
    """What the ``active`` link points to (read once), and the precision its deploy gate checked: what serve and
    infer --root run (issue 22, D4: serve ran the manifest's default while the gate checked --precision)."""

    version: str
    bundle_dir: Path
    engine_dir: Path
    precision: str | None = None
