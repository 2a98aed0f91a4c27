"""Make a runner for a bundle or a model file, by backend name (see edge_tl.runtime.BACKENDS)."""

from __future__ import annotations

from pathlib import Path

from edge_tl.bundle import Bundle
from edge_tl.errors import EdgeTLError
from edge_tl.runtime import BACKENDS, best_backend
from edge_tl.runtime.base import BaseRunner


def resolve_model(model: Bundle | str | Path, precision: str | None) -> tuple[Path, str, Bundle | None]:
    """(onnx path, precision, bundle or None) for a bundle (dir or .tar.gz) or a bare .onnx file."""
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
    return bundle.model_path(precision), precision, bundle


def create_runner(model: Bundle | str | Path, backend: str = "auto", precision: str | None = None, *,
                  threads: int | None = None, engine_dir: str | Path | None = None,
                  build_engine: bool = True, qdq: str = "kernels") -> BaseRunner:
    """A runner (not yet activated) for ``model``.

    ``precision`` picks the bundle's model (fp32 -> model.onnx, int8 -> model.int8.onnx; default: the
    bundle's ``default_precision``). For ``tensorrt`` it is also the engine's build precision
    (fp16/best are TensorRT-only). ``engine_dir`` is where TensorRT engines are cached. ``qdq`` applies to
    ``ort-cpu`` only: ``"float"`` evaluates a Q/DQ model as written (accuracy as TensorRT computes it, the same on
    every CPU), ``"kernels"`` with ONNX Runtime's CPU integer kernels (what ORT CPU latency measures).
    """
    if backend == "auto":
        backend = best_backend()
    if backend not in BACKENDS:
        raise EdgeTLError(f"unknown backend '{backend}'", f"choose auto or one of: {', '.join(BACKENDS)}")
    if backend == "torch" and not isinstance(model, Bundle) and Path(model).suffix == ".pt2":
        from edge_tl.runtime.torch_runner import make_torch_runner

        return make_torch_runner(model, threads=threads)  # a build run's PyTorch program, not a bundle
    onnx_precision = "int8" if precision == "int8" else ("fp32" if precision in ("fp16", "best") else precision)
    if backend == "tensorrt" and precision == "best":
        onnx_precision = None
    path, onnx_precision, bundle = resolve_model(model, onnx_precision)
    if backend.startswith("ort-"):
        from edge_tl.runtime.onnxrt import OnnxRuntimeRunner

        return OnnxRuntimeRunner.from_path(path, backend=backend, intra_op_threads=threads,
                                           qdq=qdq if backend == "ort-cpu" else "kernels")
    if backend == "tensorrt":
        from edge_tl.runtime.tensorrt import make_tensorrt_runner

        return make_tensorrt_runner(path, precision or onnx_precision, engine_dir=engine_dir, build=build_engine,
                                    max_batch=bundle.manifest.max_batch if bundle else 32)
    from edge_tl.runtime.torch_runner import make_torch_runner

    return make_torch_runner(path, threads=threads)
