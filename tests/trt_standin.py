"""A stand-in for the slice of TensorRT's Python API that edge_tl.device.engine.build calls (tests only).

TensorRT can't run without an NVIDIA GPU, so on such machines build.py's logic (flags per precision and
version, profile, DLA, layer constraints, timing cache) is exercised against this recorder instead: the
"parser" reads the real ONNX file (inputs; one layer per node, named like onnx-tensorrt names them), and
``build_serialized_network`` returns JSON describing the config it was given. The real API runs in
tests/test_engine_trt.py's tests marked ``tensorrt`` wherever TensorRT and a GPU are present.
"""

from __future__ import annotations

import json
import types
from enum import IntEnum

import onnx


class BuilderFlag(IntEnum):
    FP16 = 0
    INT8 = 1
    TF32 = 7
    GPU_FALLBACK = 3
    OBEY_PRECISION_CONSTRAINTS = 10


class Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class Layer:
    def __init__(self, name):
        self.name, self.precision, self.num_outputs, self.output_types = name, None, 1, {}

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class Network:
    def __init__(self, flags):
        self.flags, self.inputs, self.layers = flags, [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, i):
        return self.inputs[i]

    def get_layer(self, i):
        return self.layers[i]


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        model = onnx.load(path)
        inits = {i.name for i in model.graph.initializer}
        for inp in model.graph.input:
            if inp.name not in inits:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim)
                self.network.inputs.append(Tensor(inp.name, dims))
        for node in model.graph.node:
            self.network.layers.append(Layer(node.name or f"node_of_{node.output[0]}"))
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
    def __init__(self):
        self.flags = {BuilderFlag.TF32}  # TensorRT enables TF32 by default
        self.pool, self.profiles, self.default_device_type, self.DLA_core, self.cache = {}, [], "GPU", -1, None

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


class Builder:
    fast_fp16, fast_int8, dla = True, True, 0

    def __init__(self, logger):
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
        return json.dumps({
            "network_flags": network.flags, "flags": sorted(f.name for f in config.flags), "pool": config.pool.get(
                "WORKSPACE"), "profiles": [p.shapes for p in config.profiles], "device": config.default_device_type,
            "dla_core": config.DLA_core, "constrained": constrained, "timing_cache": config.cache.data.decode(),
        }).encode()


class Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, data):
        return json.loads(data) if data.startswith(b"{") else None


def make(version: str = "10.3.0.30", *, fast_fp16: bool = True, fast_int8: bool = True, dla: int = 0):
    mod = types.ModuleType("tensorrt")
    builder = type("Builder", (Builder,), {"fast_fp16": fast_fp16, "fast_int8": fast_int8, "dla": dla})
    logger = type("Logger", (), {"WARNING": 2, "VERBOSE": 4, "__init__": lambda self, sev=2: None})
    mod.__dict__.update(
        __version__=version, Logger=logger, Builder=builder, OnnxParser=OnnxParser, Runtime=Runtime,
        BuilderFlag=BuilderFlag, MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0),
        DeviceType=types.SimpleNamespace(DLA="DLA", GPU="GPU"), float32="float32", float16="float16")
    return mod
