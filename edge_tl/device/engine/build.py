"""Build TensorRT engines with the Python API: one code path for TensorRT 8.5 (JetPack 5) and 10.x (JetPack 6).

Close to NVIDIA's samples (``samples/python/common``, Polygraphy's ``backend/trt/loader.py``): parse the ONNX
file, make a builder config (memory pool limit, precision flags, DLA, one optimisation profile, timing cache,
layer precision constraints), ``build_serialized_network``. Polygraphy-style loaders build only when called::

    engine_bytes = BuildEngine(NetworkFromOnnx("model.int8.onnx"), spec)()
    engine = EngineFromPath("model.engine")()

What differs between versions: TensorRT 8.x needs the EXPLICIT_BATCH network flag (10.x has only explicit
batch and deprecates the flag); ``platform_has_fast_fp16/int8`` are asked where the builder still has them
(from the compute capability otherwise). TensorRT is imported lazily through :mod:`edge_tl.core.importer`.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_write_bytes
from edge_tl.core.importer import has_module, lazy_import
from edge_tl.device.engine.spec import BuildSpec, DeviceInfo, check_device_supports
from edge_tl.device.engine.trtexec import find_trtexec, parse_layer_placement, trtexec_version
from edge_tl.device.facts.board import jetson_model
from edge_tl.device.runtime.base import Loader, resolve
from edge_tl.device.runtime.tensorrt import EngineFromBytes, EngineFromPath, get_logger  # one deserialization path

__all__ = ["BuildEngine", "EngineFromBytes", "EngineFromPath", "NetworkFromOnnx", "build_engine_file",
           "detect_device", "get_logger"]

trt = lazy_import("tensorrt", "building and running TensorRT engines")
log = logging.getLogger("edge_tl.device.engine")

def trt_major() -> int:
    return int(str(trt.__version__).split(".")[0])


class NetworkFromOnnx(Loader):
    """Parse an ONNX file into ``(builder, network, parser)`` when called."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __call__(self) -> tuple[Any, Any, Any]:
        if not self.path.is_file():
            raise EdgeTLError(f"model {self.path} does not exist", "give an existing .onnx file or a bundle")
        builder = trt.Builder(get_logger())
        flags = 0 if trt_major() >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, get_logger())
        if not parser.parse_from_file(str(self.path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EdgeTLError(f"TensorRT {trt.__version__} could not parse {self.path.name}: "
                              f"{errors[0] if errors else 'no error reported'}",
                              "check the bundle's opset against this TensorRT (edge-tl doctor BUNDLE)")
        return builder, network, parser


def _layers_by_name(network) -> dict[str, Any]:
    return {network.get_layer(i).name: network.get_layer(i) for i in range(network.num_layers)}


def apply_layer_precisions(network, names: tuple[str, ...], precision: str) -> None:
    """Keep the named layers (ONNX node names) in ``precision`` (fp32|fp16), outputs included."""
    dtype = trt.float32 if precision == "fp32" else trt.float16
    layers = _layers_by_name(network)
    missing = [n for n in names if n not in layers]
    if missing:
        sample = ", ".join(list(layers)[:8])
        raise EdgeTLError(f"layer(s) {', '.join(missing)} are not in the network (it has e.g. {sample})",
                          "give names from `edge-tl engine sensitivity BUNDLE`")
    for name in names:
        layer = layers[name]
        layer.precision = dtype
        for i in range(layer.num_outputs):
            layer.set_output_type(i, dtype)


def create_config(builder, network, spec: BuildSpec):
    """A builder config for ``spec``: flags, DLA, memory pool, profile, constraints (no timing cache)."""
    flags = spec.flags()
    config = builder.create_builder_config()
    if spec.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_mb) << 20)
    if "no_tf32" in flags:
        config.clear_flag(trt.BuilderFlag.TF32)
    if "fp16" in flags:
        config.set_flag(trt.BuilderFlag.FP16)
    if "int8" in flags:  # explicit quantization: the Q/DQ scales are in the model, so no calibrator
        config.set_flag(trt.BuilderFlag.INT8)
    if spec.keep_layers:
        apply_layer_precisions(network, spec.keep_layers, spec.keep_precision)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    if spec.dla_core is not None:
        # DLA runs static shapes only: "the min, opt and max of the profile must be equal" (TensorRT developer
        # guide, "DLA Supported Layers and Restrictions"); with a dynamic batch every layer falls back to the GPU.
        if not spec.profile.min == spec.profile.opt == spec.profile.max:
            raise EdgeTLError(f"--dla {spec.dla_core} with the dynamic batch profile {spec.profile.label()}: DLA runs "
                              "static shapes only", "build DLA engines with one batch size (min = opt = max)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(spec.dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise EdgeTLError(f"input '{tensor.name}' has shape {list(shape)}; only the batch axis may be dynamic",
                              "export with fixed C, H, W")
        if shape and shape[0] < 0:
            lo, opt, hi = spec.profile.shapes(shape[1:])
            profile.set_shape(tensor.name, lo, opt, hi)
            dynamic = True
    if dynamic:
        config.add_optimization_profile(profile)
    return config


def dla_placement(config, network) -> dict[str, Any]:
    """Which layers the builder config can put on the DLA before the build (``IBuilderConfig.can_run_on_DLA``)
    and which would fall back to the GPU: ``{"dla_core", "dla_layers", "gpu_layers", "gpu_layer_names"}``. What
    the build actually did is added after it as ``built`` (the builder's own report, parsed as trtexec's is)."""
    on_dla, on_gpu = [], []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        (on_dla if config.can_run_on_DLA(layer) else on_gpu).append(layer.name)
    return {"dla_core": int(config.DLA_core), "dla_layers": len(on_dla), "gpu_layers": len(on_gpu),
            "gpu_layer_names": on_gpu[:50]}


def _load_timing_cache(config, path: Path | None):
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


class BuildEngine(Loader):
    """Build a serialized engine (bytes) from a network loader and a :class:`BuildSpec`, when called.

    The timing cache at ``spec.timing_cache`` is read before and written back (atomically) after the build.
    """

    def __init__(self, network_loader, spec: BuildSpec, device: DeviceInfo | None = None):
        self.network_loader = network_loader
        self.spec = spec
        self.device = device

    def __call__(self) -> bytes:
        builder, network, _parser = resolve(self.network_loader)
        if self.device is not None:
            check_device_supports(self.spec, self.device)
        check_device_supports(self.spec, builder_facts(builder))
        config = create_config(builder, network, self.spec)
        self.placement = None
        if self.spec.dla_core is not None:
            self.placement = dla_placement(config, network)
            if self.placement["dla_layers"] == 0:
                raise EdgeTLError(f"--dla {self.spec.dla_core}: no layer of {self.spec.onnx.name} can run on the DLA "
                                  f"({self.spec.precision}); the engine would run entirely on the GPU",
                                  "drop --dla (build for the GPU), or use int8/fp16 with DLA-supported layers")
            if self.placement["gpu_layers"]:
                log.warning("DLA core %s runs %d layer(s) of %s; %d fall back to the GPU (first: %s)",
                            self.spec.dla_core, self.placement["dla_layers"], self.spec.onnx.name,
                            self.placement["gpu_layers"], ", ".join(self.placement["gpu_layer_names"][:5]))
        _load_timing_cache(config, self.spec.timing_cache)
        with get_logger().capture() as lines:  # the builder's INFO report of where the layers ran
            serialized = builder.build_serialized_network(network, config)
        if self.placement is not None and serialized is not None:
            self.placement["built"] = built = parse_layer_placement("\n".join(lines))
            if built["reported"] and built["dla_nodes"] == 0:
                raise EdgeTLError(f"--dla {self.spec.dla_core}: TensorRT ran no layer of {self.spec.onnx.name} on "
                                  "the DLA (its build report lists every layer on the GPU)",
                                  "drop --dla (build for the GPU), or use fp16 with DLA-supported layers")
        if serialized is None:
            raise EdgeTLError(f"TensorRT could not build an engine from {self.spec.onnx.name} "
                              f"({self.spec.precision}, profile {self.spec.profile.label()})",
                              "re-run with EDGE_TL_TRT_VERBOSE=1 to see TensorRT's log, or try --via trtexec")
        if self.spec.timing_cache is not None:
            atomic_write_bytes(self.spec.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        return bytes(memoryview(serialized))


def build_engine_file(spec: BuildSpec, out: Path, final: Path | None = None) -> dict[str, Any]:
    """The cache's default build function: build with the API and write ``out`` (atomically)."""
    loader = BuildEngine(NetworkFromOnnx(spec.onnx), spec)
    data = loader()
    atomic_write_bytes(out, data)
    info: dict[str, Any] = {"via": "api", "tensorrt_version": str(trt.__version__)}
    if loader.placement is not None:
        info["dla"] = loader.placement
    return info


# -- device facts ---------------------------------------------------------------------------------------
def _fast_from_cc(cc: str) -> tuple[bool | None, bool | None]:
    """Fast FP16 / INT8 by compute capability (CUDA's tables) where the builder no longer says."""
    try:
        major, minor = (int(x) for x in cc.split(".")[:2])
    except ValueError:
        return None, None
    fp16 = (major, minor) in ((5, 3), (6, 0), (6, 2)) or major >= 7
    int8 = (major, minor) >= (6, 1)
    return fp16, int8


def builder_facts(builder) -> DeviceInfo:
    name, cc = gpu_name_and_cc()
    fp16 = getattr(builder, "platform_has_fast_fp16", None)
    int8 = getattr(builder, "platform_has_fast_int8", None)
    if fp16 is None or int8 is None:
        fp16, int8 = _fast_from_cc(cc)
    return DeviceInfo(tensorrt_version=str(trt.__version__), gpu_name=name, compute_capability=cc,
                      dla_cores=int(builder.num_DLA_cores), fast_fp16=bool(fp16) if fp16 is not None else None,
                      fast_int8=bool(int8) if int8 is not None else None, source="tensorrt",
                      module=jetson_model("/"))


def gpu_name_and_cc(root: str | Path = "/") -> tuple[str, str]:
    """GPU name and compute capability: cuda-python, pycuda, nvidia-smi, else the Jetson model (cc unknown)."""
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return name.strip("\x00 "), f"{props.major}.{props.minor}"
    except Exception:  # noqa: BLE001 - any failure here just means: ask the next source
        pass
    try:
        import pycuda.driver as cuda

        cuda.init()
        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        return dev.name(), f"{major}.{minor}"
    except Exception:  # noqa: BLE001
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.splitlines()[0]
            name, cc = (x.strip() for x in out.split(",", 1))
            return name, cc
        except (subprocess.SubprocessError, OSError, IndexError, ValueError):
            pass
    return jetson_model(root) or "unknown GPU", "unknown"


def detect_device(*, via: str = "api", trtexec: str | Path | None = None, root: str | Path = "/",
                  builder: bool = True) -> DeviceInfo:
    """This machine's facts for the engine key, asked of TensorRT's builder (``via='api'``), or, for trtexec
    without the Python bindings (JetPack 5 with another Python), the version from trtexec's banner.

    ``builder=False``: only what the engine key needs (TensorRT version, GPU name and compute capability), without
    creating a ``trt.Builder`` (seconds and hundreds of MB on an Orin Nano): what a cache lookup uses."""
    if (via == "api" or has_module("tensorrt")) and not builder:
        name, cc = gpu_name_and_cc(root)
        return DeviceInfo(tensorrt_version=str(trt.__version__), gpu_name=name, compute_capability=cc,
                          source="tensorrt", module=jetson_model(root))
    if via == "api" or has_module("tensorrt"):
        return builder_facts(trt.Builder(get_logger()))
    exe = find_trtexec(trtexec)
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60, check=False)
    version = trtexec_version(proc.stdout + proc.stderr)
    if version is None:
        raise EdgeTLError(f"could not tell the TensorRT version of {exe}", "install TensorRT's Python bindings")
    name, cc = gpu_name_and_cc(root)
    return DeviceInfo(tensorrt_version=version, gpu_name=name, compute_capability=cc, source="trtexec",
                      module=jetson_model(root))


def load_device_facts(path: str | Path) -> DeviceInfo:
    """Recorded facts (``edge-tl doctor --json`` writes them under ``device``), for another machine's key."""
    data = json.loads(Path(path).read_text())
    return DeviceInfo.from_dict(data.get("device", data))
