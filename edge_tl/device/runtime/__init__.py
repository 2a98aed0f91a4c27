"""Inference runners. Backends are looked up by name and imported only when asked for.

Backend ids: ``tensorrt`` (native TensorRT), ``ort-trt`` / ``ort-cuda`` / ``ort-cpu`` (ONNX Runtime with that
execution provider), ``torch`` (PyTorch, for baselines; workstation only).
"""

from __future__ import annotations

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.importer import has_module
from edge_tl.device.runtime.base import BaseRunner, Loader, TensorMeta, resolve

__all__ = ["BaseRunner", "Loader", "TensorMeta", "resolve", "BACKENDS", "available_backends", "best_backend",
           "onnxruntime_providers"]

# Preference order for "auto": the fastest that is installed here.
BACKENDS = ("tensorrt", "ort-trt", "ort-cuda", "ort-cpu", "torch")


def onnxruntime_providers() -> tuple[list[str] | None, str | None]:
    """(ONNX Runtime's available providers, None) where it imports; (None, why) where it is absent or fails to
    import. JetPack 6's onnxruntime-gpu wheels are built against NumPy 1.x: beside NumPy 2 ``import onnxruntime``
    raises (ImportError, or AttributeError "_ARRAY_API not found"), and that must not take down the TensorRT path,
    serve --backend auto, the deploy gate or doctor (issue 22, D1)."""
    if not has_module("onnxruntime"):
        return None, "not installed"
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers()), None
    except Exception as exc:  # a broken install: said, never fatal
        return None, f"installed but fails to import ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"


def available_backends() -> list[str]:
    """Backends usable on this machine, best first (cheap checks, no heavy imports beyond ORT's)."""
    found = []
    if has_module("tensorrt") and (has_module("pycuda") or has_module("cuda")):
        found.append("tensorrt")
    providers, _ = onnxruntime_providers()
    if providers is not None:
        if "TensorrtExecutionProvider" in providers:
            found.append("ort-trt")
        if "CUDAExecutionProvider" in providers:
            found.append("ort-cuda")
        found.append("ort-cpu")
    if has_module("torch"):
        found.append("torch")
    return found


def best_backend(exclude: tuple[str, ...] = ("torch",)) -> str:
    for name in available_backends():
        if name not in exclude:
            return name
    raise EdgeTLError("no inference backend is installed", "pip install 'edge-tl[cpu]' (ONNX Runtime)")
