"""Stand-ins for TensorRT's Python API and for pycuda (tests only) that ENFORCE the rules edge-tl must follow.

TensorRT and CUDA can't run without an NVIDIA GPU, so on such machines edge-tl's build, cache and runner code
runs against these. They are small, but each rule below is one the real libraries enforce; breaking it here
fails the same way it would on an Orin (the source of each rule is in its comment):

* CUDA contexts are per thread (pycuda ``Context.push/pop`` work on "the calling thread's context stack";
  CUDA driver API ``cuCtxPushCurrent``/``cuCtxPopCurrent`` act on "the calling CPU thread"). An explicit
  ``push()`` works from any thread (pycuda's ``context::push`` does not check the thread); only pycuda's *implicit*
  activation, ``scoped_context_activation`` (used when an object such as a device allocation is freed while its
  context is not current), refuses a thread other than the one that created the context, with ``cannot activate
  out-of-thread context`` (pycuda src/cpp/cuda.hpp). Driver calls (memory, streams, copies) need a context current
  *in the calling thread*, else they raise ``invalid device context`` (as seanavery/yolov5-tensorrt#28 shows for
  serve-like threading); TensorRT's ``execute_async_v3`` goes through the CUDA runtime, which uses the device's
  primary context when none is current (CUDA programming guide, "Runtime: Initialization"), so it fails only
  under another device's context.
* DLA has no dynamic shapes: a layer runs on DLA only when the profile's min = opt = max (TensorRT developer
  guide, "DLA Supported Layers and Restrictions"), DLA computes in FP16/INT8 only, and only some layer types are
  supported; without ``GPU_FALLBACK`` a layer that can't run on DLA fails the build.
* A ``Builder`` is expensive (it creates a CUDA context and queries the device); ``Builder.created`` counts them so
  a test can require that a cache hit creates none.
* ``Runtime.DLA_core`` must be set before ``deserialize_cuda_engine`` for a DLA engine to run on that core (TensorRT
  API, ``IRuntime.DLA_core``).

The "engine" is JSON (what the builder was asked) plus the ONNX model; executing it runs the model with ONNX
Runtime on the bytes in the stand-in's device memory, so outputs are real. The real APIs run in the tests
marked ``tensorrt``/``gpu`` wherever TensorRT and a GPU are present.
"""

from __future__ import annotations

import base64
import importlib.machinery
import itertools
import json
import threading
import types
from enum import IntEnum

import numpy as np
import onnx

# -- CUDA (pycuda.driver) ---------------------------------------------------------------------------------


class LogicError(RuntimeError):
    """pycuda._driver.LogicError: what pycuda raises for ``CUDA_ERROR_INVALID_CONTEXT`` and friends."""


_tls = threading.local()
_memory: dict[int, bytearray] = {}
_next_ptr = itertools.count(0x7F0000000000, 0x100000)
_mem_lock = threading.Lock()


def _stack() -> list:
    if not hasattr(_tls, "stack"):
        _tls.stack = []
    return _tls.stack


def _current(what: str):
    """The context current in *this* thread, or the driver's invalid-context error."""
    stack = _stack()
    if not stack:
        raise LogicError(f"{what} failed: invalid device context (no CUDA context is current in thread "
                         f"{threading.current_thread().name})")
    return stack[-1]


class Context:
    """A primary context. push/pop act on the calling thread's stack only; pycuda records the thread that made
    the wrapper (``m_thread``), which only its implicit activation checks."""

    def __init__(self, device: int):
        self.device = device
        self.thread_id = threading.get_ident()

    def push(self) -> None:  # pycuda context::push: cuCtxPushCurrent in the calling thread, no thread check
        _stack().append(self)

    @staticmethod
    def pop() -> None:
        stack = _stack()
        if not stack:
            raise LogicError("cuCtxPopCurrent failed: invalid device context")
        stack.pop()


def _scoped_activation(ctx: Context) -> None:
    """pycuda's scoped_context_activation: fine when ``ctx`` is current here or this thread made it."""
    stack = _stack()
    if (not stack or stack[-1] is not ctx) and threading.get_ident() != ctx.thread_id:
        raise LogicError("cannot activate out-of-thread context")


class Device:
    def __init__(self, i: int):
        self.i = i

    def retain_primary_context(self) -> Context:
        return Context(self.i)

    def name(self) -> str:
        return "Orin (stand-in)"

    def compute_capability(self) -> tuple[int, int]:
        return 8, 7


class DeviceAllocation:
    def __init__(self, nbytes: int):
        self.ctx = _current("cuMemAlloc")
        with _mem_lock:
            self.ptr = next(_next_ptr)
            _memory[self.ptr] = bytearray(nbytes)

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:  # pycuda device_allocation::free activates the allocation's context implicitly
        _scoped_activation(self.ctx)
        with _mem_lock:
            del _memory[self.ptr]


class HostAllocation:
    """pycuda's page-locked allocation: the ``.base`` of what ``pagelocked_empty`` returns, with ``free()``."""

    def __init__(self, n: int, dtype):
        self.ctx = _current("cuMemHostAlloc")
        self._buf = np.zeros(n, dtype)
        self.__array_interface__ = self._buf.__array_interface__
        self.freed = False

    def free(self) -> None:
        _current("cuMemFreeHost")
        self.freed = True


class Stream:
    def __init__(self):
        self.ctx = _current("cuStreamCreate")
        self.handle = id(self)
        STREAMS[self.handle] = self

    def synchronize(self) -> None:
        if _current("cuStreamSynchronize") is not self.ctx:
            raise LogicError("cuStreamSynchronize failed: invalid resource handle")


STREAMS: dict[int, Stream] = {}


def _check_stream(stream: Stream, what: str) -> None:
    if _current(what) is not stream.ctx:
        raise LogicError(f"{what} failed: invalid resource handle")


def pagelocked_empty(n: int, dtype) -> np.ndarray:
    return np.asarray(HostAllocation(n, dtype))


def memcpy_htod_async(dst: int, src: np.ndarray, stream: Stream) -> None:
    _check_stream(stream, "cuMemcpyHtoDAsync")
    data = np.ascontiguousarray(src).tobytes()
    _memory[int(dst)][:len(data)] = data


def memcpy_dtoh_async(dst: np.ndarray, src: int, stream: Stream) -> None:
    _check_stream(stream, "cuMemcpyDtoHAsync")
    raw = np.frombuffer(bytes(_memory[int(src)][:dst.nbytes]), dtype=dst.dtype).reshape(dst.shape)
    np.copyto(dst, raw)


def make_cuda() -> tuple[types.ModuleType, types.ModuleType]:
    """(pycuda, pycuda.driver) modules, to put in ``sys.modules``."""
    _memory.clear()
    STREAMS.clear()
    pkg = types.ModuleType("pycuda")
    pkg.__spec__ = importlib.machinery.ModuleSpec("pycuda", None, is_package=True)
    pkg.__path__ = []
    drv = types.ModuleType("pycuda.driver")
    drv.__spec__ = importlib.machinery.ModuleSpec("pycuda.driver", None)
    drv.__dict__.update(init=lambda: None, Device=Device, Context=Context, mem_alloc=DeviceAllocation,
                        pagelocked_empty=pagelocked_empty, memcpy_htod_async=memcpy_htod_async,
                        memcpy_dtoh_async=memcpy_dtoh_async, Stream=Stream, LogicError=LogicError)
    pkg.driver = drv
    return pkg, drv


def live_allocations() -> int:
    return len(_memory)


# -- TensorRT ---------------------------------------------------------------------------------------------


class BuilderFlag(IntEnum):
    FP16 = 0
    INT8 = 1
    TF32 = 7
    GPU_FALLBACK = 3
    OBEY_PRECISION_CONSTRAINTS = 10


class TensorIOMode(IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(IntEnum):
    FLOAT = 0


# Layer types DLA runs (TensorRT developer guide, "DLA Supported Layers and Restrictions", by ONNX op);
# anything else (Flatten's Shuffle here, for one) falls back to the GPU or fails the build.
DLA_OPS = {"Conv", "ConvTranspose", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "MaxPool", "AveragePool",
           "GlobalAveragePool", "BatchNormalization", "Add", "Sub", "Mul", "Concat", "Softmax", "Gemm"}
# Not QuantizeLinear / DequantizeLinear: DLA does not run explicitly quantized networks (TensorRT's "Working with
# DLA"; NVIDIA/TensorRT#2222) -- the stand-in listed them and so hid issue 22's D2


class Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class Layer:
    def __init__(self, name, op):
        self.name, self.op, self.precision, self.num_outputs, self.output_types = name, op, None, 1, {}

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class Network:
    def __init__(self, flags):
        self.flags, self.inputs, self.outputs, self.layers, self.onnx = flags, [], [], [], b""

    num_inputs = property(lambda self: len(self.inputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, i):
        return self.inputs[i]

    def get_layer(self, i):
        return self.layers[i]


def _dims(value_info) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim)


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        model = onnx.load(path)
        self.network.onnx = model.SerializeToString()
        inits = {i.name for i in model.graph.initializer}
        for inp in model.graph.input:
            if inp.name not in inits:
                self.network.inputs.append(Tensor(inp.name, _dims(inp)))
        self.network.outputs = [Tensor(o.name, _dims(o)) for o in model.graph.output]
        for node in model.graph.node:
            self.network.layers.append(Layer(node.name or f"node_of_{node.output[0]}", node.op_type))
        if any(n.op_type == "NoSuchOp" for n in model.graph.node):
            self.errors.append("No importer registered for op: NoSuchOp")
        return not self.errors

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i):
        return self.errors[i]


class Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class TimingCache:
    def __init__(self, data):
        self.data = bytes(data) or b"fresh"

    def serialize(self):
        return self.data + b"+1"


class Config:
    unsupported: frozenset[str] = frozenset()  # tests: op types a DLA generation lacks

    def __init__(self, network=None):
        self.flags = {BuilderFlag.TF32}  # TensorRT enables TF32 by default
        self.pool, self.profiles, self.default_device_type, self.DLA_core, self.cache = {}, [], "GPU", -1, None
        self.network = network

    def set_memory_pool_limit(self, pool, size):
        self.pool[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        return TimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def _static(self) -> bool:
        return all(lo == hi for p in self.profiles for lo, _opt, hi in p.shapes.values())

    def can_run_on_DLA(self, layer) -> bool:  # noqa: N802 - TensorRT's name
        """DLA: static shapes only, FP16/INT8 only, supported layer types only (see the module docstring)."""
        return (self._static() and bool({BuilderFlag.FP16, BuilderFlag.INT8} & self.flags)
                and layer.op in DLA_OPS and layer.op not in self.unsupported)


class ILogger:
    """tensorrt.ILogger: subclassed in Python (``ILogger.__init__(self)``, ``log(severity, msg)``), as Polygraphy's
    get_trt_logger does; severities are tensorrt.Logger's INTERNAL_ERROR 0 .. VERBOSE 4."""

    def __init__(self):
        pass

    def log(self, severity, msg):  # pragma: no cover - overridden
        pass


def _placement_report(layers, on_dla) -> list[str]:
    """The builder's INFO report of where layers run, as TensorRT 8.x prints it (tests/data/trtexec/
    trt8x_dla_layers.txt, recorded from a real build): consecutive DLA layers fused into one
    ``{ForeignNode[first...last]}``, each GPU layer as ``TYPE: name``."""
    dla, gpu, run = [], [], []
    for layer in layers:
        if layer.name in on_dla:
            run.append(layer.name)
            continue
        if run:
            dla.append(run)
            run = []
        gpu.append(f"{layer.op.upper()}: {layer.name}")
    if run:
        dla.append(run)
    nodes = ["{ForeignNode[" + (r[0] if len(r) == 1 else f"{r[0]}...{r[-1]}") + "]}" for r in dla]
    return (["---------- Layers Running on DLA ----------"] + [f"[DlaLayer] {n}" for n in nodes]
            + ["---------- Layers Running on GPU ----------"] + [f"[GpuLayer] {g}" for g in gpu])


class Builder:
    fast_fp16, fast_int8, dla = True, True, 0
    created = 0  # every Builder ever made in this stand-in (a cache hit must make none)

    def __init__(self, logger):
        self.logger = logger
        type(self).created += 1
        self.platform_has_fast_fp16, self.platform_has_fast_int8 = self.fast_fp16, self.fast_int8
        self.num_DLA_cores = self.dla

    def create_network(self, flags):
        return Network(flags)

    def create_builder_config(self):
        return Config()

    def create_optimization_profile(self):
        return Profile()

    def build_serialized_network(self, network, config):
        constrained = {layer.name: str(layer.precision) for layer in network.layers if layer.precision is not None}
        on_dla = []
        if config.default_device_type == "DLA":
            on_dla = [layer.name for layer in network.layers if config.can_run_on_DLA(layer)]
            if len(on_dla) < network.num_layers and BuilderFlag.GPU_FALLBACK not in config.flags:
                return None  # "layer ... cannot run on DLA and GPU fallback is not enabled"
            for line in _placement_report(network.layers, set(on_dla)):  # INFO lines, to the builder's logger
                self.logger.log(3, line)
        inputs = []
        for t in network.inputs:
            prof = next((p.shapes[t.name] for p in config.profiles if t.name in p.shapes), None)
            inputs.append({"name": t.name, "shape": list(t.shape), "profile": prof})
        return json.dumps({
            "standin_engine": 1, "network_flags": network.flags, "flags": sorted(f.name for f in config.flags),
            "pool": config.pool.get("WORKSPACE"), "profiles": [p.shapes for p in config.profiles],
            "device": config.default_device_type, "dla_core": config.DLA_core, "dla_layers": on_dla,
            "constrained": constrained, "timing_cache": config.cache.data.decode(), "inputs": inputs,
            "outputs": [{"name": t.name, "shape": list(t.shape)} for t in network.outputs],
            "onnx": base64.b64encode(network.onnx).decode(),
        }).encode()


class Runtime:
    def __init__(self, logger):
        self.DLA_core = -1

    def deserialize_cuda_engine(self, data):
        try:
            desc = json.loads(bytes(data))
        except ValueError:
            return None  # not an engine of this "TensorRT version": the real API returns None too
        if not isinstance(desc, dict) or desc.get("standin_engine") != 1:
            return None
        return Engine(desc, self.DLA_core if desc["device"] == "DLA" else None)


class Engine:
    def __init__(self, desc, dla_core):
        self.desc, self.dla_core = desc, dla_core
        self.inputs = {t["name"]: t for t in desc["inputs"]}
        self.outputs = {t["name"]: t for t in desc["outputs"]}
        self.names = list(self.inputs) + list(self.outputs)
        self._session = None

    def __getitem__(self, key):  # the build description, for tests
        return self.desc[key]

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return DataType.FLOAT

    def get_tensor_shape(self, name):
        # the network's shape, -1 for every dynamic dimension, even where the profile pins it (min = max):
        # NvInferRuntime.h, ICudaEngine::getTensorShape ("-1 in place of each dynamic runtime dimension"); only
        # IExecutionContext::getTensorShape gives the value once the input shape is set (issue 22, D3)
        t = self.inputs.get(name) or self.outputs[name]
        return tuple(t["shape"])

    def get_tensor_profile_shape(self, name, index):
        return tuple(tuple(s) for s in self.inputs[name]["profile"])

    def create_execution_context(self):
        _current("IExecutionContext creation")
        return ExecutionContext(self)

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            self._session = ort.InferenceSession(base64.b64decode(self.desc["onnx"]),
                                                 providers=["CPUExecutionProvider"])
        return self._session


class ExecutionContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self.ctx = _current("createExecutionContext")

    def set_input_shape(self, name, shape):
        prof = self.engine.inputs[name]["profile"]
        shape = tuple(shape)
        if prof is None:
            ok = shape == tuple(self.engine.inputs[name]["shape"])
        else:
            lo, _opt, hi = prof
            ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))
        if ok:
            self.shapes[name] = shape
        return ok

    def get_tensor_shape(self, name):
        if name in self.engine.inputs:
            return self.shapes.get(name, self.engine.get_tensor_shape(name))
        batch = next(iter(self.shapes.values()))[0]
        return (batch, *self.engine.outputs[name]["shape"][1:])

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle):
        # TensorRT enqueues through the CUDA runtime: the context current in the calling thread, or the device's
        # primary context when none is (all contexts here are primary); another device's context fails
        stack = _stack()
        if stack and stack[-1].device != self.ctx.device:
            raise LogicError("enqueueV3: invalid device context")
        _check_stream(STREAMS[stream_handle], "enqueueV3")
        feed = {}
        for name in self.engine.inputs:
            shape = self.shapes[name]
            n = int(np.prod(shape)) * 4
            feed[name] = np.frombuffer(bytes(_memory[self.addresses[name]][:n]), np.float32).reshape(shape)
        outs = self.engine.session().run(list(self.engine.outputs), feed)
        for name, arr in zip(self.engine.outputs, outs, strict=True):
            data = np.ascontiguousarray(arr, np.float32).tobytes()
            _memory[self.addresses[name]][:len(data)] = data
        return True


def make(version: str = "10.3.0.30", *, fast_fp16: bool = True, fast_int8: bool = True, dla: int = 0):
    mod = types.ModuleType("tensorrt")
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    builder = type("Builder", (Builder,), {"fast_fp16": fast_fp16, "fast_int8": fast_int8, "dla": dla, "created": 0})
    logger = type("Logger", (), {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4,
                                 "__init__": lambda self, sev=2: None})
    mod.__dict__.update(
        __version__=version, Logger=logger, ILogger=ILogger, Builder=builder, OnnxParser=OnnxParser, Runtime=Runtime,
        BuilderFlag=BuilderFlag, MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0), TensorIOMode=TensorIOMode,
        DataType=DataType, nptype=lambda dt: np.float32,
        DeviceType=types.SimpleNamespace(DLA="DLA", GPU="GPU"), float32="float32", float16="float16")
    return mod


def install(monkeypatch, **kw) -> types.ModuleType:
    """Put the TensorRT and pycuda stand-ins where edge-tl imports them from; returns the tensorrt module."""
    import sys

    from edge_tl.device.engine import build
    from edge_tl.device.runtime import tensorrt as rt

    mod = make(**kw)
    pkg, drv = make_cuda()
    for name, m in (("tensorrt", mod), ("pycuda", pkg), ("pycuda.driver", drv)):
        monkeypatch.setitem(sys.modules, name, m)
    monkeypatch.setattr(build, "trt", mod)
    monkeypatch.setattr(rt, "trt", mod)
    monkeypatch.setattr(rt, "_LOGGER", None)
    return mod
