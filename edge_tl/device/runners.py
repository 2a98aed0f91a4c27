"""Make a runner for any model kind: a bundle (dir or .tar.gz), an .onnx file, a TensorRT engine
(.engine/.plan/.trt) or a PyTorch program from a build run (.pt2), by backend name (see
edge_tl.device.runtime.BACKENDS).

This factory sits above :mod:`edge_tl.device.engine` (a TensorRT runner for an ONNX model gets its engine
from the engine cache) and is the one place that tells model kinds apart: ``edge-tl bench``, ``engine check``,
``infer`` and ``serve`` all come here.
"""

from __future__ import annotations

from pathlib import Path

from edge_tl.core import importer
from edge_tl.core.bundle import Bundle
from edge_tl.core.errors import EdgeTLError
from edge_tl.device.engine.cache import EngineCache, engine_dla_core
from edge_tl.device.runtime import BACKENDS, best_backend
from edge_tl.device.runtime.base import BaseRunner
from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner
from edge_tl.device.runtime.tensorrt import ENGINE_SUFFIXES, EngineSource, make_tensorrt_runner

__all__ = ["DEFAULT_MAX_BATCH", "ENGINE_SUFFIXES", "PT2_SUFFIX", "create_runner", "model_kind", "resolve_model"]

PT2_SUFFIX = ".pt2"  #: a torch.export program from a build run (the PyTorch baseline; needs the workstation extra)
DEFAULT_MAX_BATCH = 32  #: the TensorRT profile's max batch for a bare .onnx file (a bundle gives its own)
#: the bundle model an engine of a TensorRT-only precision is built from (best = INT8 where it can, else FP16/32)
_ONNX_FOR = {"fp16": "fp32", "best": "int8"}


def model_kind(path: str | Path) -> str:
    """``engine``, ``pt2``, ``onnx`` or ``bundle`` (a folder or .tar.gz), from the file name."""
    suffix = Path(path).suffix
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    if suffix == PT2_SUFFIX:
        return "pt2"
    return "onnx" if suffix == ".onnx" else "bundle"


def _only_backend(path: Path, backend: str, allowed: str, what: str) -> None:
    if backend not in ("auto", allowed):
        raise EdgeTLError(f"{path} is {what}; backend '{backend}' cannot run it", f"use --backend {allowed} (or auto)")


def resolve_model(model: Bundle | str | Path, precision: str | None) -> tuple[Path, str, Bundle | None]:
    """(onnx path, precision, bundle or None) for a bundle (dir or .tar.gz) or a bare .onnx file.

    ``precision`` (default: the bundle's ``default_precision``, or ``int8`` for a ``*.int8.onnx`` file, else
    ``fp32``) comes back as given; it picks the bundle's model: model.int8.onnx for int8 and best, model.onnx for
    fp32 and fp16."""
    if isinstance(model, Bundle):
        bundle = model
    else:
        path = Path(model)
        if path.suffix == ".onnx":
            if not path.is_file():
                raise EdgeTLError(f"model {path} does not exist", "give an existing .onnx file or a bundle")
            return path, precision or ("int8" if path.name.endswith(".int8.onnx") else "fp32"), None
        bundle = Bundle.open(path)
    precision = precision or bundle.manifest.default_precision
    return bundle.model_path(_ONNX_FOR.get(precision, precision)), precision, bundle


def create_runner(model: Bundle | str | Path, backend: str = "auto", precision: str | None = None, *,
                  threads: int | None = None, engines: EngineSource | None = None,
                  qdq: str = "kernels") -> BaseRunner:
    """A runner (not yet activated) for ``model``.

    ``precision`` picks the bundle's model (fp32 -> model.onnx, int8 -> model.int8.onnx; default: the
    bundle's ``default_precision``). For ``tensorrt`` it is also the engine's build precision
    (fp16/best are TensorRT-only). ``engines`` gives a TensorRT runner the engine for an ONNX model (default:
    ``EngineCache()``, built for this device on first use and cached in the default folder). ``qdq`` applies to
    ``ort-cpu`` only: ``"float"`` evaluates a Q/DQ model as written (accuracy as TensorRT computes it, the same on
    every CPU), ``"kernels"`` with ONNX Runtime's CPU integer kernels (what ORT CPU latency measures).
    """
    if not isinstance(model, Bundle):
        kind = model_kind(model)
        if kind == "engine":
            _only_backend(Path(model), backend, "tensorrt", "a TensorRT engine")
            return make_tensorrt_runner(model, precision, dla_core=engine_dla_core(Path(model)))
        if kind == "pt2":  # a build run's PyTorch program, not a bundle
            _only_backend(Path(model), backend, "torch", "a PyTorch program")
            torch_runner = importer.require_workstation("edge_tl.workstation.torch_runner", "running a .pt2 program")
            return torch_runner.make_torch_runner(model, threads=threads)
    if backend == "auto":
        backend = best_backend()
    if backend not in BACKENDS:
        raise EdgeTLError(f"unknown backend '{backend}'", f"choose auto or one of: {', '.join(BACKENDS)}")
    if precision in ("fp16", "best") and backend != "tensorrt":  # never run fp32 while reporting fp16
        raise EdgeTLError(f"--precision {precision} is TensorRT-only; backend {backend} runs the bundle's fp32 or int8 "
                          "model", "use --backend tensorrt, or --precision fp32 / int8")
    onnx_precision = "int8" if precision == "int8" else ("fp32" if precision in ("fp16", "best") else precision)
    if backend == "tensorrt" and precision == "best":
        onnx_precision = None
    path, onnx_precision, bundle = resolve_model(model, onnx_precision)
    if backend.startswith("ort-"):
        return OnnxRuntimeRunner.from_path(path, backend=backend, intra_op_threads=threads,
                                           qdq=qdq if backend == "ort-cpu" else "kernels")
    if backend == "tensorrt":
        return make_tensorrt_runner(path, precision or onnx_precision, engines=engines or EngineCache(),
                                    max_batch=bundle.manifest.max_batch if bundle else DEFAULT_MAX_BATCH)
    torch_runner = importer.require_workstation("edge_tl.workstation.torch_runner", "the torch backend")
    return torch_runner.make_torch_runner(path, threads=threads)
