"""Native TensorRT runner: one code path for TensorRT 8.5 (JetPack 5) and 10.x (JetPack 6).

Close to NVIDIA's Python samples (``samples/python/common_runtime.py``): deserialize with ``trt.Runtime``,
name-based I/O (``num_io_tensors`` / ``get_tensor_name`` / ``set_input_shape`` / ``set_tensor_address``),
``execute_async_v3`` on a CUDA stream, and page-locked host buffers. Device memory comes from pycuda or
cuda-python (``cuda.bindings.runtime``, or the older ``cuda.cudart``), whichever is installed. ``infer``
synchronises the stream before it returns, so timing around it covers H2D + compute + D2H.
Everything TensorRT/CUDA is imported lazily: this module imports without them.

Threads: a CUDA context is current per *thread* (pycuda keeps its context stack in thread-local storage, and
``cuCtxPopCurrent`` only pops the calling thread's context; CUDA driver API, "Context Management"). Callers such
as ``edge-tl serve`` activate in one thread, infer on a pool and deactivate in a third, so the runner owns one
thread that does all of it: activate, every inference and deactivate run there, and ``infer`` from any thread
hands its feed to that thread and waits.

The engine comes from a loader (Polygraphy's ``EngineFromBytes`` / ``EngineFromPath`` style): bytes, a path, an
``ICudaEngine`` or a callable returning one of those; it is read and deserialized only when the runner activates,
on the owning thread. This module never imports :mod:`edge_tl.device.engine` (that package builds engines and imports
the runtime, not the other way round); where engines come from a cache, the caller passes the cache's loader.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.importer import has_module, lazy_import, require
from edge_tl.device.runtime.base import BaseRunner, Loader, TensorMeta, resolve

trt = lazy_import("tensorrt", "the native TensorRT backend")

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

_LOGGER = None


def get_logger():
    """One TensorRT logger per process (TensorRT wants a single one): an ``ILogger`` subclass, as Polygraphy's
    ``get_trt_logger`` makes, that sends errors and warnings to Python's logging (INFO/VERBOSE too with
    $EDGE_TL_TRT_VERBOSE) and, inside ``capture()``, keeps the INFO lines (the builder's "Layers Running on
    DLA/GPU" report, read by edge_tl.device.engine.build)."""
    global _LOGGER
    if _LOGGER is None:
        import contextlib
        import logging

        pylog = logging.getLogger("edge_tl.device.tensorrt")

        class EdgeTLTrtLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.verbose = bool(os.environ.get("EDGE_TL_TRT_VERBOSE"))
                self.captured: list[str] | None = None

            def log(self, severity, msg):  # noexcept in TensorRT: never raise from here
                try:
                    if self.captured is not None and severity in (trt.Logger.INFO, trt.Logger.VERBOSE):
                        self.captured.append(msg)
                    if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                        pylog.error("%s", msg)
                    elif severity == trt.Logger.WARNING:
                        pylog.warning("%s", msg)
                    elif self.verbose:
                        pylog.info("%s", msg)
                except Exception:  # noqa: BLE001
                    pass

            @contextlib.contextmanager
            def capture(self):
                self.captured = []
                try:
                    yield self.captured
                finally:
                    self.captured = None

        _LOGGER = EdgeTLTrtLogger()
    return _LOGGER


class EngineFromBytes(Loader):
    """Deserialize engine bytes into an ``ICudaEngine``; a version/GPU mismatch becomes a clear error.

    ``dla_core``: the DLA core a DLA engine runs on. TensorRT takes it from ``IRuntime.DLA_core``, set *before*
    ``deserialize_cuda_engine`` (the engine itself does not choose; TensorRT API docs, ``IRuntime.DLA_core``).
    The runtime is kept with the loader: the engine must not outlive the runtime that made it.
    """

    def __init__(self, data: bytes | Callable[[], bytes], source: str = "engine", dla_core: int | None = None):
        self.data = data
        self.source = source
        self.dla_core = dla_core
        self.runtime = None

    def __call__(self):
        self.runtime = trt.Runtime(get_logger())
        if self.dla_core is not None:
            self.runtime.DLA_core = int(self.dla_core)
        engine = self.runtime.deserialize_cuda_engine(resolve(self.data))
        if engine is None:
            raise EdgeTLError(f"TensorRT {trt.__version__} could not load {self.source} (built by another "
                              "TensorRT version or for another GPU?)", "rebuild it here: edge-tl engine build")
        return engine


class EngineFromPath(EngineFromBytes):
    """Read an engine file (only when called) and deserialize it."""

    def __init__(self, path: str | Path, dla_core: int | None = None):
        self.path = Path(path)
        super().__init__(self._read, source=str(self.path), dla_core=dla_core)

    def _read(self) -> bytes:
        if not self.path.is_file():
            raise EdgeTLError(f"TensorRT engine {self.path} does not exist", "build it with edge-tl engine build")
        return self.path.read_bytes()


class _CudaPython:
    """Device memory and streams through cuda-python's runtime API."""

    name = "cuda-python"

    def __init__(self) -> None:
        self.rt = require("cuda.bindings.runtime") if has_module("cuda.bindings") else require("cuda.cudart")
        self._host: list[int] = []

    def _call(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            text = self.rt.cudaGetErrorString(err)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise EdgeTLError(f"CUDA call failed: {text}", "check the GPU and its driver (nvidia-smi / tegrastats)")
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr))

    def host_empty(self, nbytes: int) -> np.ndarray:
        ptr = int(self._call(self.rt.cudaMallocHost(max(nbytes, 1))))
        self._host.append(ptr)
        return np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))

    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream))

    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream))

    def stream(self) -> Any:
        return self._call(self.rt.cudaStreamCreate())

    def handle(self, stream: Any) -> int:
        return int(stream)

    def sync(self, stream: Any) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream))

    def close(self, stream: Any | None) -> None:
        if stream is not None:
            self.rt.cudaStreamDestroy(stream)
        for ptr in self._host:
            self.rt.cudaFreeHost(ptr)
        self._host = []


class _PyCuda:
    """Device memory and streams through pycuda, on the device's primary context (shared with TensorRT)."""

    name = "pycuda"

    def __init__(self, device: int = 0) -> None:
        self.drv = require("pycuda.driver", "device memory for the TensorRT backend")
        self.drv.init()
        self.ctx = self.drv.Device(device).retain_primary_context()
        self.ctx.push()
        self._allocs: dict[int, Any] = {}
        self._host: list[np.ndarray] = []

    def malloc(self, nbytes: int) -> int:
        alloc = self.drv.mem_alloc(max(nbytes, 1))
        self._allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        self._allocs.pop(ptr).free()

    def host_empty(self, nbytes: int) -> np.ndarray:
        arr = self.drv.pagelocked_empty(max(nbytes, 1), np.uint8)
        self._host.append(arr)
        return arr

    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.drv.memcpy_htod_async(dst, src, stream)

    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.drv.memcpy_dtoh_async(dst, src, stream)

    def stream(self) -> Any:
        return self.drv.Stream()

    def handle(self, stream: Any) -> int:
        return int(stream.handle)

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def close(self, stream: Any | None) -> None:
        for arr in self._host:  # free page-locked memory while the context is still current
            arr.base.free()
        self._host = []
        self.ctx.pop()


def cuda_api(prefer: str | None = None) -> _PyCuda | _CudaPython:
    """pycuda or cuda-python, whichever is installed (``prefer`` = "pycuda" / "cuda-python" to choose)."""
    if prefer not in (None, "pycuda", "cuda-python"):
        raise EdgeTLError(f"unknown CUDA API '{prefer}'", "choose pycuda or cuda-python")
    if prefer != "cuda-python" and has_module("pycuda"):
        return _PyCuda()
    if prefer != "pycuda" and has_module("cuda"):
        return _CudaPython()
    raise EdgeTLError("neither pycuda nor cuda-python is installed (the TensorRT backend needs one for device memory)",
                      "pip install 'edge-tl[jetson]' (pycuda) or pip install cuda-python")


class TensorRTRunner(BaseRunner):
    """Runs a TensorRT engine on one owning thread (see the module docstring).

    ``engine``: bytes, a path, or a loader/callable returning an ``ICudaEngine``, bytes or a path (called at
    activation, on the owning thread)."""

    backend = "tensorrt"

    def __init__(self, engine: bytes | str | Path | Callable[[], Any], name: str | None = None,
                 cuda: str | None = None):
        super().__init__(name)
        self._engine_src = engine
        self._cuda_pref = cuda
        self.engine_path: Path | None = None
        self.dla_core: int | None = None
        self.cuda = None
        self.engine = self.context = None
        self._stream = None
        self._loader: Any = None
        self._owner: ThreadPoolExecutor | None = None
        self._owner_ident: int | None = None
        self._owner_ns = 0
        self.last_handoff_ns = 0

    # -- the owning thread --------------------------------------------------------------------------------
    def _on_owner(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._owner is None:
            raise EdgeTLError(f"runner {self.name} is not active", "activate it first")
        if threading.get_ident() == self._owner_ident:
            return fn(*args)
        return self._owner.submit(fn, *args).result()

    def _mark_owner(self) -> None:
        self._owner_ident = threading.get_ident()

    def activate_impl(self) -> None:
        self._owner = ThreadPoolExecutor(1, thread_name_prefix=f"trt-{self.name}")
        try:
            self._owner.submit(self._mark_owner).result()
            self._on_owner(self._activate_here)
        except BaseException:
            try:
                self._on_owner(self._release_here)
            finally:
                self._owner.shutdown(wait=True)
                self._owner = self._owner_ident = None
            raise

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter_ns()
        out = self._on_owner(self._infer_timed, feed)
        # what the hop to the owning thread and back cost this call (bench reports it; issue 22, D7)
        self.last_handoff_ns = max(0, time.perf_counter_ns() - start - self._owner_ns)
        return out

    def _infer_timed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter_ns()
        try:
            return self._infer_here(feed)
        finally:
            self._owner_ns = time.perf_counter_ns() - start

    def deactivate_impl(self) -> None:
        if self._owner is None:
            return
        try:
            self._on_owner(self._release_here)
        finally:
            self._owner.shutdown(wait=True)
            self._owner = self._owner_ident = None

    # -- what runs on the owning thread ------------------------------------------------------------------
    def _load_engine(self):
        src = self._engine_src
        if isinstance(src, (bytes, bytearray, memoryview)):
            self._loader = EngineFromBytes(bytes(src))
        elif isinstance(src, (str, Path)):
            self._loader = EngineFromPath(src)
        elif callable(src):
            self._loader = src
        else:
            raise EdgeTLError(f"cannot load a TensorRT engine from {type(src).__name__}", "pass bytes or a path")
        got = self._loader()
        if isinstance(got, (bytes, bytearray, memoryview)):
            self._loader = EngineFromBytes(bytes(got))
            got = self._loader()
        elif isinstance(got, (str, Path)):
            self._loader = EngineFromPath(got)
            got = self._loader()
        path = getattr(self._loader, "path", None)
        self.engine_path = Path(path) if path is not None else None
        self.dla_core = getattr(self._loader, "dla_core", None)
        return got

    def _activate_here(self) -> None:
        require("tensorrt", "the native TensorRT backend")
        self.cuda = cuda_api(self._cuda_pref)  # pycuda: pushes the primary context on this (the owning) thread
        self.engine = self._load_engine()
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._dtype = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # ICudaEngine.get_tensor_shape gives -1 for a dynamic dimension even where the profile pins it (min = max,
        # a DLA engine): only the profile, or the execution context once set, gives the value (issue 22, D3)
        self._fixed: dict[str, tuple[int, ...]] = {}
        for n in self._inputs:  # size every buffer for the profile's largest shapes
            shape = tuple(self.engine.get_tensor_shape(n))
            if -1 in shape:
                lo, _opt, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0))
                shape = hi
                if lo == hi:
                    self._fixed[n] = hi
            else:
                self._fixed[n] = shape
            self.context.set_input_shape(n, shape)
        self._shape = {n: tuple(self.context.get_tensor_shape(n)) for n in names}
        self._stream = self.cuda.stream()
        self._dev: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        for n in names:
            nbytes = int(np.prod(self._shape[n])) * self._dtype[n].itemsize
            self._dev[n] = self.cuda.malloc(nbytes)
            self._host[n] = self.cuda.host_empty(nbytes)
            self.context.set_tensor_address(n, self._dev[n])

    def _infer_here(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if set(feed) != set(self._inputs):
            raise EdgeTLError(f"the engine takes inputs {self._inputs}, got {sorted(feed)}",
                              "name the inputs as the engine does")
        cuda, stream = self.cuda, self._stream
        for n in self._inputs:
            arr = np.ascontiguousarray(feed[n], dtype=self._dtype[n])
            if arr.shape != self._shape[n]:
                fixed = self._fixed.get(n)
                if fixed is not None:
                    raise EdgeTLError(f"input {n} shape {arr.shape}: this engine takes only {fixed} (static shape, "
                                      "as DLA engines are)", f"feed batches of {fixed[0]}")
                if not self.context.set_input_shape(n, arr.shape):
                    lo, _opt, hi = self.engine.get_tensor_profile_shape(n, 0)
                    raise EdgeTLError(f"input {n} shape {arr.shape} is outside the engine's profile "
                                      f"{tuple(lo)}..{tuple(hi)}", "use a batch size within the profile")
                self._shape[n] = arr.shape
            host = self._host[n][:arr.nbytes].view(self._dtype[n]).reshape(arr.shape)
            np.copyto(host, arr)
            cuda.htod(self._dev[n], host, stream)
        outs = {}
        for n in self._outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            nbytes = int(np.prod(shape)) * self._dtype[n].itemsize
            outs[n] = self._host[n][:nbytes].view(self._dtype[n]).reshape(shape)
        if not self.context.execute_async_v3(cuda.handle(stream)):
            raise EdgeTLError("TensorRT execute_async_v3 failed", "re-run with --debug; check the engine and inputs")
        for n in self._outputs:
            cuda.dtoh(outs[n], self._dev[n], stream)
        cuda.sync(stream)
        return {n: a.copy() for n, a in outs.items()}

    def _release_here(self) -> None:
        self.context = None  # release TensorRT's objects before the memory they point into
        try:
            if self.cuda is not None:
                for ptr in getattr(self, "_dev", {}).values():
                    self.cuda.free(ptr)
                self._host = {}
                stream, self._stream = self._stream, None
                self.cuda.close(stream)  # pycuda: pops the context this thread pushed
        finally:
            self._dev, self._host, self._stream = {}, {}, None
            self.context = self.engine = self._loader = None
            self.cuda = None

    # -- metadata ----------------------------------------------------------------------------------------
    def get_input_metadata_impl(self) -> list[TensorMeta]:
        return [TensorMeta(n, self._fixed[n] if n in self._fixed else
                           tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(n)),
                           self._dtype[n].name) for n in self._inputs]

    def describe_impl(self) -> dict[str, Any]:
        return {"tensorrt": trt.__version__, "cuda_api": getattr(self.cuda, "name", None) or self._cuda_pref,
                "engine": str(self.engine_path) if self.engine_path else None, "dla_core": self.dla_core}


#: Where engines for ONNX models come from: ``source(onnx_path, precision, max_batch)`` returns a loader of an
#: ``ICudaEngine`` (edge_tl.device.engine.cache.EngineCache is one: built for this device and cached).
EngineSource = Callable[[Path, str, int], Callable[[], Any]]


def make_tensorrt_runner(onnx_or_engine_path: str | Path, precision: str | None, engines: EngineSource | None = None,
                         max_batch: int = 32, dla_core: int | None = None) -> TensorRTRunner:
    """A TensorRT runner (not yet activated) for an engine file (``dla_core``: the DLA core it was built for, set
    on the runtime before deserializing), or for an ONNX model whose engine comes from ``engines`` (the
    caller's engine cache)."""
    path = Path(onnx_or_engine_path)
    if not path.is_file():
        raise EdgeTLError(f"model {path} does not exist", "give an .onnx, an .engine/.plan, or a bundle")
    require("tensorrt", "the native TensorRT backend")
    if not (has_module("pycuda") or has_module("cuda")):
        cuda_api()  # raises the install hint
    if path.suffix in ENGINE_SUFFIXES:
        return TensorRTRunner(EngineFromPath(path, dla_core=dla_core), name=f"tensorrt-{precision or 'fp32'}")
    if path.suffix != ".onnx":
        raise EdgeTLError(f"{path} is neither an .onnx model nor a TensorRT engine", "give an .onnx or .engine file")
    if engines is None:
        raise EdgeTLError(f"{path.name} is an ONNX model and no engine cache was given to build its engine",
                          "build the engine with edge-tl engine build (or trtexec) and pass the .engine file")
    return TensorRTRunner(engines(path, precision or "fp32", max_batch), name=f"tensorrt-{precision or 'fp32'}")
