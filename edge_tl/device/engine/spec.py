"""What a TensorRT engine depends on: the device it is built on, the batch profile and the build options.

Shared by the Python-API build (:mod:`edge_tl.device.engine.build`), the trtexec build
(:mod:`edge_tl.device.engine.trtexec`) and the cache (:mod:`edge_tl.device.engine.cache`), so both build paths
mean the same thing by the same words.

Precisions (``--precision``):

- ``fp32``: FP32 only; TF32 is switched off too (TensorRT enables it by default on Ampere, Orin included),
  so an fp32 engine is held to the strict parity thresholds.
- ``fp16``: FP16 allowed (TensorRT still runs a layer in FP32 where that is faster or required).
- ``int8``: explicit quantization from the bundle's Q/DQ model: the INT8 flag, no calibrator; layers outside
  the Q/DQ pairs run in FP32. A model without Q/DQ nodes is refused (it would need calibration).
- ``best``: FP16 and INT8 both allowed (INT8 only where the model is Q/DQ; for a model without Q/DQ nodes
  ``best`` means FP16, and the build says so).

Batch profile: one optimisation profile, ``min = 1``, ``max = `` the bundle's ``max_batch`` and
``opt = max(1, max_batch // 4)`` by default: TensorRT tunes its kernels for ``opt``; a quarter of the
maximum favours the small batches a camera pipeline sends while keeping large batches efficient.
``--opt-batch`` overrides it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from edge_tl.core.errors import EdgeTLError

PRECISIONS = ("fp32", "fp16", "int8", "best")
KEEP_PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class DeviceInfo:
    """Facts about the build device that an engine depends on (and what the builder says it supports).

    ``fast_fp16`` / ``fast_int8`` / ``dla_cores`` are ``None`` where they could not be asked (e.g. trtexec
    without TensorRT's Python bindings); then trtexec's own builder decides and reports.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str = "unknown"
    dla_cores: int | None = None
    fast_fp16: bool | None = None
    fast_int8: bool | None = None
    cuda_version: str | None = None
    source: str = "recorded"
    #: the module (board/SKU) from /proc/device-tree/model: every Orin reports compute capability 8.7, so an AGX
    #: Orin engine would pass as an Orin Nano's by GPU name and cc alone (issue 22, D9). None: not a Jetson
    module: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceInfo:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as exc:
            raise EdgeTLError(f"device facts {sorted(data)} are incomplete ({exc})",
                              "record them with `edge-tl doctor --json` on the device") from exc

    def describe(self) -> str:
        on = f"{self.gpu_name} (compute capability {self.compute_capability})"
        return f"TensorRT {self.tensorrt_version} on {on}" + (f", {self.module}" if self.module else "")


@dataclass(frozen=True)
class BatchProfile:
    """One TensorRT optimisation profile over the batch axis."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise EdgeTLError(f"batch profile min={self.min} opt={self.opt} max={self.max}: "
                              "not 1 <= min <= opt <= max",
                              "choose --max-batch >= 1 and --opt-batch between 1 and it")

    @classmethod
    def for_max_batch(cls, max_batch: int, opt: int | None = None) -> BatchProfile:
        return cls(1, opt if opt is not None else max(1, max_batch // 4), max_batch)

    def label(self) -> str:
        return f"{self.min}-{self.opt}-{self.max}"

    def shapes(self, chw: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return (self.min, *chw), (self.opt, *chw), (self.max, *chw)


@dataclass(frozen=True)
class BuildSpec:
    """Everything a build is asked to do. ``keep_layers`` stay in ``keep_precision`` (see fallback.py)."""

    onnx: Path
    precision: str
    profile: BatchProfile
    dla_core: int | None = None
    workspace_mb: int | None = None
    keep_layers: tuple[str, ...] = ()
    keep_precision: str = "fp32"
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EdgeTLError(f"unknown precision '{self.precision}'", f"choose one of {', '.join(PRECISIONS)}")
        if self.keep_precision not in KEEP_PRECISIONS:
            raise EdgeTLError(f"unknown keep precision '{self.keep_precision}'", "choose fp32 or fp16")
        if self.dla_core is not None and self.dla_core < 0:
            raise EdgeTLError(f"--dla {self.dla_core} is negative", "give a DLA core index (0 or 1 on AGX Orin)")
        if self.dla_core is not None and self.precision == "fp32":
            raise EdgeTLError("DLA runs FP16 or INT8 only, not fp32", "use --precision fp16 with --dla")
        if self.dla_core is not None and self.precision in ("int8", "best"):
            # the bundle's INT8 model is explicitly quantized (Q/DQ), which DLA does not run (TensorRT's "Working
            # with DLA"; NVIDIA/TensorRT#2222): refused rather than built into an engine that silently runs on the
            # GPU or fails (issue 22, D2). INT8 on DLA would need an implicit-quantization calibration cache.
            raise EdgeTLError(f"--dla {self.dla_core} with --precision {self.precision}: DLA does not run explicitly "
                              "quantized (Q/DQ) networks such as the bundle's INT8 model",
                              "use --precision fp16 with --dla (built from model.onnx), or drop --dla for INT8 on "
                              "the GPU")
        if self.workspace_mb is not None and self.workspace_mb <= 0:
            raise EdgeTLError(f"--workspace-mb {self.workspace_mb} must be positive", "give a size in MiB, e.g. 1024")
        for name in self.keep_layers:
            if not name or "," in name or ":" in name:
                raise EdgeTLError(f"layer name {name!r} can't be kept (empty, or has ',' or ':')",
                                  "give node names as listed by `edge-tl engine sensitivity`")

    @property
    def is_qdq(self) -> bool:
        return is_qdq_model(self.onnx)

    def flags(self) -> list[str]:
        """The builder flags this spec means: a subset of fp16, int8, no_tf32, obey_constraints, dla."""
        qdq = self.is_qdq
        if self.precision == "int8" and not qdq:
            raise EdgeTLError(f"--precision int8 needs a Q/DQ model and {self.onnx.name} has no QuantizeLinear nodes",
                              "use the bundle's model.int8.onnx (edge-tl engine build BUNDLE --precision int8)")
        flags = []
        if self.precision in ("fp16", "best") or (self.keep_layers and self.keep_precision == "fp16"):
            flags.append("fp16")
        if self.precision == "int8" or (self.precision == "best" and qdq):
            flags.append("int8")
        if self.precision == "fp32":
            flags.append("no_tf32")
        if self.keep_layers:
            flags.append("obey_constraints")
        if self.dla_core is not None:
            flags.append("dla")
        return flags


def check_device_supports(spec: BuildSpec, device: DeviceInfo) -> None:
    """Refuse what the builder said this platform can't do fast (never silently build fp32 instead)."""
    flags = spec.flags()
    if "fp16" in flags and device.fast_fp16 is False:
        raise EdgeTLError(f"{device.gpu_name} has no fast FP16 (TensorRT's builder says so)",
                          "build with --precision fp32 (or int8 if the GPU has fast INT8)")
    if "int8" in flags and device.fast_int8 is False:
        raise EdgeTLError(f"{device.gpu_name} has no fast INT8 (TensorRT's builder says so)",
                          "build with --precision fp16 or fp32")
    if spec.dla_core is not None and device.dla_cores is not None:
        if device.dla_cores == 0:
            raise EdgeTLError(f"--dla {spec.dla_core}: this device has no DLA cores (TensorRT's builder reports 0; "
                              "Orin Nano has none, AGX Orin and Orin NX have them)", "build for the GPU: drop --dla")
        if spec.dla_core >= device.dla_cores:
            raise EdgeTLError(f"--dla {spec.dla_core}: this device has {device.dla_cores} DLA core(s)",
                              f"choose --dla between 0 and {device.dla_cores - 1}")


@lru_cache(maxsize=32)
def _qdq_cached(path: str, mtime_ns: int, size: int) -> bool:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def is_qdq_model(path: str | Path) -> bool:
    """True when the ONNX model holds QuantizeLinear/DequantizeLinear nodes (explicit quantization)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise EdgeTLError(f"model {path} does not exist", "give an existing .onnx file or a bundle") from exc
    return _qdq_cached(str(path), st.st_mtime_ns, st.st_size)


def onnx_input(path: str | Path) -> tuple[str, tuple[int | str, ...]]:
    """The (single) graph input of an ONNX model: its name and dims (a str for a symbolic dim)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise EdgeTLError(f"{Path(path).name} has {len(inputs)} inputs; edge-tl engines take one image input",
                          "export the classifier with a single NCHW input")
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in inputs[0].type.tensor_type.shape.dim)
    return inputs[0].name, dims
