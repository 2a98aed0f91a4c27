"""One helper for optional, heavy imports (after Polygraphy's ``mod/importer.py``).

``lazy_import("tensorrt")`` returns a proxy that imports the module on first attribute access, and turns
an ImportError into an :class:`EdgeTLError` that names the package and how to install it. Nothing heavy is
imported when edge-tl itself is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

from edge_tl.core.errors import EdgeTLError

# How to get each optional package, shown in the error when it's missing.
INSTALL_HINTS: dict[str, str] = {
    "torch": "install the workstation extra: pip install 'edge-tl[workstation,cpu]'",
    "torchvision": "install the workstation extra: pip install 'edge-tl[workstation,cpu]'",
    "torch_pruning": "install the workstation extra: pip install 'edge-tl[workstation,cpu]'",
    "onnxslim": "install the workstation extra: pip install 'edge-tl[workstation,cpu]'",
    "timm": "install the workstation extra: pip install 'edge-tl[workstation,cpu]'",
    "sklearn": "install the workstation extra: pip install 'edge-tl[workstation,cpu]'",
    "captum": "install the workstation extra: pip install 'edge-tl[workstation,cpu]' (or set report.explain = false)",
    "onnxruntime": "install ONNX Runtime: pip install 'edge-tl[cpu]' (or the Jetson wheel of onnxruntime-gpu)",
    "tensorrt": "TensorRT's Python bindings come with JetPack: sudo apt install python3-libnvinfer "
    "(in a venv, create it with --system-site-packages)",
    "pycuda": "pip install 'edge-tl[jetson]' (or pip install cuda-python)",
    "cuda": "pip install cuda-python (or pycuda)",
    "jtop": "pip install 'edge-tl[jetson]' and start the jtop service (sudo systemctl start jtop)",
    "pynvml": "pip install nvidia-ml-py",
    "matplotlib": "pip install 'edge-tl[plots]'",
    "cv2": "pip install 'edge-tl[serve]' (opencv-python-headless; on Jetson use the JetPack OpenCV)",
    "fastapi": "pip install 'edge-tl[serve]'",
    "uvicorn": "pip install 'edge-tl[serve]'",
    "prometheus_client": "pip install 'edge-tl[serve]'",
    "paramiko": "pip install 'edge-tl[deploy]'",
    "ansible_runner": "pip install 'edge-tl[fleet]'",
}


def has_module(name: str) -> bool:
    """True when ``name`` can be imported here (checked without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(name: str, purpose: str | None = None) -> ModuleType:
    """Import ``name`` now, or raise an EdgeTLError that says what it was needed for and how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.split(".")[0]
        why = f" (needed for {purpose})" if purpose else ""
        hint = INSTALL_HINTS.get(top, f"pip install {top}")
        raise EdgeTLError(f"Python package '{top}' is not installed{why}: {exc}", hint) from exc


def require_workstation(module: str, purpose: str) -> ModuleType:
    """Import a module of :mod:`edge_tl.workstation` when a command needs it (the CLI's build command, the
    torch backend), or raise a one-line EdgeTLError when the workstation extra (torch …) is not installed.

    Code that also runs on the device names the workstation's modules here by string, so importing it never
    pulls in the training stack (tests/test_no_torch.py; import-linter's contracts see no import edge)."""
    if not module.startswith("edge_tl.workstation."):
        raise ValueError(f"{module} is not a module of edge_tl.workstation")
    for top in ("torch", "torchvision"):
        if not has_module(top):
            raise EdgeTLError(f"{purpose} needs the workstation's training stack, and '{top}' is not installed",
                              INSTALL_HINTS[top])
    return require(module, purpose)


class LazyModule:
    """A module proxy: the import happens on first attribute access."""

    def __init__(self, name: str, purpose: str | None = None):
        self._name = name
        self._purpose = purpose
        self._module: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._module is None:
            self._module = require(self._name, self._purpose)
        return self._module

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_") and attr != "__version__":
            raise AttributeError(attr)
        return getattr(self._load(), attr)

    @property
    def available(self) -> bool:
        return self._module is not None or has_module(self._name)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded"
        return f"<LazyModule {self._name} ({state})>"


def lazy_import(name: str, purpose: str | None = None) -> LazyModule:
    return LazyModule(name, purpose)
