"""Versions service: CUDA (files under ``root``), TensorRT, ONNX Runtime and other packages (package metadata)."""

from __future__ import annotations

import contextlib
import json
import platform
import re
from importlib import metadata
from pathlib import Path

from edge_tl import __version__
from edge_tl.core.importer import has_module, require

TENSORRT_DISTS = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_lean")


def dist_version(*names: str) -> str | None:
    """The first installed distribution's version among ``names`` (None: none installed)."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def package_version(dist: str, module: str) -> str | None:
    """``dist``'s version when ``module`` imports here; 'installed' when it has no metadata; None: absent."""
    if not has_module(module):
        return None
    return dist_version(dist) or "installed"


class Versions:
    def __init__(self, root: str | Path = "/"):
        self.root = Path(root)

    def cuda(self) -> str | None:
        """CUDA from ``usr/local/cuda/version.json`` (CUDA >= 11) or ``version.txt`` (CUDA 10)."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return json.loads((self.root / "usr/local/cuda/version.json").read_text())["cuda"]["version"]
        with contextlib.suppress(OSError):
            m = re.search(r"(\d+\.\d+(?:\.\d+)?)", (self.root / "usr/local/cuda/version.txt").read_text())
            return m.group(1) if m else None
        return None

    def tensorrt(self) -> str | None:
        trt = dist_version(*TENSORRT_DISTS)
        if trt is None and has_module("tensorrt"):
            try:  # JetPack's python3-libnvinfer has no dist-info: ask the module
                trt = getattr(require("tensorrt", "recording the TensorRT version"), "__version__", None)
            except Exception:  # a broken install must not stop a benchmark
                trt = None
        return trt

    def software(self) -> dict[str, str | None]:
        """TensorRT, CUDA, ONNX Runtime, NumPy, Python and edge-tl versions (None: not installed)."""
        return {"tensorrt": self.tensorrt(), "cuda": self.cuda(),
                "onnxruntime": dist_version("onnxruntime", "onnxruntime-gpu"), "numpy": dist_version("numpy"),
                "python": platform.python_version(), "edge_tl": __version__}
