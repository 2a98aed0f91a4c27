"""Facts about the machine we run on, read from files so tests can point ``root`` at a recorded tree.

Jetson: ``/proc/device-tree/model`` (module name, NUL-terminated) and ``/etc/nv_tegra_release``
(first line, e.g. ``# R36 (release), REVISION: 4.0, GCID: ..., BOARD: generic, EABI: aarch64, ...``).
"""

from __future__ import annotations

import re
from pathlib import Path

from edge_tl.core.host import cpu_name

# L4T release -> JetPack (NVIDIA's JetPack archive / release notes).
L4T_TO_JETPACK = {
    "32.7": "4.6", "35.1": "5.0.2", "35.2": "5.1", "35.3": "5.1.1", "35.4": "5.1.2", "35.5": "5.1.3",
    "35.6": "5.1.4", "36.2": "6.0 DP", "36.3": "6.0", "36.4": "6.1/6.2", "38.2": "7.0", "39.2": "7.2",
}

_RELEASE_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_bytes().decode(errors="replace")
    except OSError:
        return None


def jetson_model(root: str | Path = "/") -> str | None:
    """The module's model string, e.g. 'NVIDIA Jetson AGX Orin Developer Kit', or None off-Jetson."""
    text = _read(Path(root), "proc/device-tree/model")
    return text.strip("\x00\n ") if text else None


def l4t_release(root: str | Path = "/") -> str | None:
    """L4T release as 'R36.4.0', or None when /etc/nv_tegra_release is absent or unreadable."""
    text = _read(Path(root), "etc/nv_tegra_release")
    m = _RELEASE_RE.search(text or "")
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def jetpack_version(l4t: str | None) -> str | None:
    if not l4t:
        return None
    major_minor = ".".join(l4t.lstrip("R").split(".")[:2])
    return L4T_TO_JETPACK.get(major_minor)


def is_jetson(root: str | Path = "/") -> bool:
    return l4t_release(root) is not None or "jetson" in (jetson_model(root) or "").lower()


class Board:
    """Which module this is, and its L4T / JetPack release."""

    def __init__(self, root: str | Path = "/"):
        self.root = Path(root)

    def model(self) -> str | None:
        return jetson_model(self.root)

    def l4t(self) -> str | None:
        return l4t_release(self.root)

    def jetpack(self, l4t: str | None = None) -> str | None:
        return jetpack_version(l4t or self.l4t())

    def is_jetson(self) -> bool:
        return is_jetson(self.root)

    def cpu_name(self) -> str | None:
        return cpu_name(self.root)
