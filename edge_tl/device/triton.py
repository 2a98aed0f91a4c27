"""`edge-tl export triton BUNDLE --out REPO`: a Triton Inference Server model repository from a bundle.

Writes (atomically: a temporary folder in REPO renamed into place)::

    REPO/<name>/config.pbtxt      Triton's model configuration (text protobuf, schema model_config.proto)
    REPO/<name>/<version>/model.onnx   the bundle's FP32 or INT8 (Q/DQ) ONNX model, for the onnxruntime backend
    REPO/<name>/<version>/model.plan   or, with --engine, a TensorRT engine built on the serving device
    REPO/<name>/labels.txt        the class names (label_filename of the classification output)
    REPO/<name>/edge-tl.json      where it came from (bundle id, precision, file hashes)

The configuration: inputs and outputs from the manifest (the batch axis becomes ``max_batch_size``), dynamic
batching, an instance group, and for ONNX on GPU the TensorRT execution accelerator of Triton's ONNX Runtime
backend with the bundle's precision (``precision_mode`` INT8 runs the Q/DQ model with its own scales, no
calibration table). The bundle is verified against its manifest first; an engine against its sidecar JSON.
A TensorRT engine runs only on the GPU and TensorRT version that built it, so ``model.plan`` is never built here:
build it on the serving device (``edge-tl engine build``) and pass it with ``--engine``.

Field names and enums follow Triton's ``model_config.proto``; where tritonclient is installed the text is parsed
back with its ``model_config_pb2`` before anything is written (the tests always do).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_tl.core.bundle import LABELS, MODEL_FILES, Bundle, TensorSpec, utc_now
from edge_tl.core.errors import CheckFailed, EdgeTLError, InternalError
from edge_tl.core.fsutil import atomic_dir, atomic_write_text, sha256_file
from edge_tl.core.importer import has_module

CONFIG = "config.pbtxt"
PROVENANCE = "edge-tl.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# manifest dtype -> Triton DataType (model_config.proto)
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int8": "TYPE_INT8",
          "uint8": "TYPE_UINT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
          "bool": "TYPE_BOOL"}
# precision -> (ONNX file in the bundle, TensorRT accelerator precision_mode)
PRECISIONS = {"fp32": ("fp32", "FP32"), "fp16": ("fp32", "FP16"), "int8": ("int8", "INT8")}


class Enum(str):
    """A protobuf enum value: written bare (``KIND_GPU``), not quoted."""


@dataclass
class TritonOptions:
    name: str | None = None
    precision: str | None = None  # None: the bundle's default_precision
    max_batch: int | None = None  # None: the manifest's max_batch (an engine's profile max)
    instances: int = 1
    kind: str = "gpu"  # gpu | cpu
    accelerator: str | None = None  # tensorrt | none; None: tensorrt on gpu, none on cpu
    max_queue_delay_us: int = 100
    preferred_batch: list[int] = field(default_factory=list)
    workspace_mb: int | None = None
    trt_cache: str | None = None  # a folder on the Triton host for ONNX Runtime's TensorRT engine cache
    engine: Path | None = None
    version: int = 1


# -- the text format ------------------------------------------------------------------------------------------
def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if any(ord(c) < 0x20 or ord(c) > 0x7E for c in text):
        raise EdgeTLError(f"'{text}' has characters a model configuration cannot hold", "use plain ASCII")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a nested dict: dicts are messages, lists of dicts repeated messages, lists of
    scalars repeated scalars, ``{"key": k, "value": v}`` lists map entries."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines += [f"{pad}{key} {{", to_pbtxt(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


def triton_schema() -> Any:
    """Triton's model_config_pb2 (tritonclient[grpc]: the module needs protobuf, its package grpcio), or None."""
    try:
        from tritonclient.grpc import model_config_pb2
    except Exception:  # not installed, or a protobuf runtime it was not generated for
        return None
    return model_config_pb2


def validate_with_triton(text: str) -> Any:
    """Parse ``text`` with Triton's own ModelConfig message (tritonclient); returns it. Unknown fields, wrong
    types and bad enum values raise. InternalError: this text came from us."""
    from google.protobuf import text_format

    model_config_pb2 = triton_schema()
    if model_config_pb2 is None:
        raise EdgeTLError("Triton's model-config schema (tritonclient.grpc.model_config_pb2) cannot be imported",
                          "pip install 'tritonclient[grpc]'")
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise InternalError(f"the generated {CONFIG} does not parse as Triton's ModelConfig: {exc}") from exc


# -- checks -------------------------------------------------------------------------------------------------
def _tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    dtype = DTYPES.get(spec.dtype)
    if dtype is None:
        raise EdgeTLError(f"tensor '{spec.name}' has dtype {spec.dtype}, which has no Triton type here",
                          f"supported: {', '.join(DTYPES)}")
    shape = spec.shape[1:] if batched else spec.shape
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in shape]
    return {"name": spec.name, "data_type": Enum(dtype), "dims": dims}


def _onnx_io(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Names -> rank of the graph's real inputs (not initializers) and outputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    rank = lambda v: len(v.type.tensor_type.shape.dim)  # noqa: E731
    return ({v.name: rank(v) for v in model.graph.input if v.name not in inits},
            {v.name: rank(v) for v in model.graph.output})


def _check_io(bundle: Bundle, onnx_path: Path) -> None:
    m = bundle.manifest
    ins, outs = _onnx_io(onnx_path)
    want_in, want_out = {m.input.name: len(m.input.shape)}, {m.output.name: len(m.output.shape)}
    if ins != want_in or outs != want_out:
        raise CheckFailed(f"{onnx_path.name} has inputs {ins} and outputs {outs}, the manifest says {want_in} and "
                          f"{want_out}", "rebuild the bundle")


def _check_engine(bundle: Bundle, engine: Path) -> dict[str, Any]:
    """The engine's sidecar (written by `edge-tl engine build`), after checking the engine against it."""
    if not engine.is_file():
        raise EdgeTLError(f"engine {engine} does not exist", "build it on the serving device: edge-tl engine build")
    sidecar = engine.with_name(engine.name + ".json")
    try:
        side = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        raise EdgeTLError(f"{sidecar.name} (the record edge-tl engine build writes beside {engine.name}) is missing "
                          "or unreadable, so the engine cannot be verified",
                          "pass the engine edge-tl engine build wrote, with its .json") from None
    if side.get("engine_sha256") != sha256_file(engine):
        raise CheckFailed(f"{engine.name} does not match the sha256 in {sidecar.name}", "rebuild the engine")
    key = side.get("key") or {}
    ours = {a.sha256 for rel, a in bundle.manifest.artifacts.items() if rel in MODEL_FILES.values()}
    if key.get("onnx_sha256") not in ours:
        raise CheckFailed(f"{engine.name} was built from another model than bundle {bundle.manifest.bundle_id}'s",
                          "build the engine from this bundle: edge-tl engine build BUNDLE")
    return side


# -- the export ----------------------------------------------------------------------------------------------
def model_config(bundle: Bundle, opts: TritonOptions, *, name: str, precision: str, max_batch: int,
                 plan: bool) -> dict[str, Any]:
    m = bundle.manifest
    batched = bool(m.input.shape) and m.input.shape[0] == "batch" and bool(m.output.shape) \
        and m.output.shape[0] == "batch"
    output = _tensor(m.output, batched)
    if len(m.classes) and output["dims"] == [len(m.classes)]:
        output["label_filename"] = LABELS  # Triton's classification extension reads the names from it
    config: dict[str, Any] = {
        "name": name,
        **({"platform": "tensorrt_plan"} if plan else {"backend": "onnxruntime"}),
        "max_batch_size": max_batch if batched else 0,
        "version_policy": {"specific": {"versions": [opts.version]}},
        "input": [_tensor(m.input, batched)],
        "output": [output],
    }
    if batched:
        config["dynamic_batching"] = {
            **({"preferred_batch_size": opts.preferred_batch} if opts.preferred_batch else {}),
            "max_queue_delay_microseconds": opts.max_queue_delay_us}
    config["instance_group"] = [{"count": opts.instances, "kind": Enum(f"KIND_{opts.kind.upper()}")}]
    if not plan and opts.accelerator == "tensorrt":
        params = [{"key": "precision_mode", "value": PRECISIONS[precision][1]}]
        if opts.workspace_mb:
            params.append({"key": "max_workspace_size_bytes", "value": str(opts.workspace_mb << 20)})
        if opts.trt_cache:
            params += [{"key": "trt_engine_cache_enable", "value": "true"},
                       {"key": "trt_engine_cache_path", "value": opts.trt_cache}]
        config["optimization"] = {"execution_accelerators": {
            "gpu_execution_accelerator": [{"name": "tensorrt", "parameters": params}]}}
    return config


#: upper bounds on the sizes (an int32/int64 field of model_config.proto, or far beyond any Jetson): a larger value
#: is a typo, and 2^40 as max_batch_size overflowed into an internal error
LIMITS = {"--max-batch": 4096, "--instances": 64, "--max-queue-delay-us": 60_000_000, "--workspace-mb": 1 << 20,
          "--version": 2**63 - 1}


def _check_sizes(opts: TritonOptions, max_batch: int) -> None:
    for flag, value in (("--max-batch", max_batch), ("--instances", opts.instances),
                        ("--max-queue-delay-us", opts.max_queue_delay_us), ("--workspace-mb", opts.workspace_mb),
                        ("--version", opts.version)):
        if value is not None and value > LIMITS[flag]:
            raise EdgeTLError(f"{flag} {value} is above {LIMITS[flag]}", f"give {flag} {LIMITS[flag]} or less")
    above = [b for b in opts.preferred_batch if not 1 <= b <= max_batch]
    if above:
        raise EdgeTLError(f"--preferred-batch {','.join(map(str, above))} is outside 1..{max_batch} (the max batch "
                          "size): Triton refuses such a configuration", f"give sizes of {max_batch} or less")


def _resolve(bundle: Bundle, opts: TritonOptions) -> tuple[str, str, int, dict[str, Any] | None]:
    name, precision, max_batch, side = _resolve_options(bundle, opts)
    _check_sizes(opts, max_batch)
    return name, precision, max_batch, side


def _resolve_options(bundle: Bundle, opts: TritonOptions) -> tuple[str, str, int, dict[str, Any] | None]:
    m = bundle.manifest
    name = opts.name or m.name
    if not NAME_RE.match(name):
        raise EdgeTLError(f"'{name}' is not a usable Triton model name (it names a folder)",
                          "pass --name with letters, digits, '_', '.' or '-'")
    if opts.kind not in ("gpu", "cpu"):
        raise EdgeTLError(f"--kind {opts.kind} is not gpu or cpu", "choose gpu or cpu")
    if opts.instances < 1 or opts.version < 1 or opts.max_queue_delay_us < 0:
        raise EdgeTLError("--instances and --version must be at least 1, --max-queue-delay-us at least 0",
                          "fix the option")
    side = None
    if opts.engine is not None:
        side = _check_engine(bundle, Path(opts.engine))
        key = side.get("key") or {}
        precision = key.get("precision") or "?"
        if opts.precision and opts.precision != precision:
            raise EdgeTLError(f"--precision {opts.precision} was asked for, but the engine is {precision}",
                              "leave out --precision with --engine, or build the engine in that precision")
        if opts.kind != "gpu":
            raise EdgeTLError("a TensorRT engine runs on the GPU only, not --kind cpu", "use --kind gpu")
        if opts.accelerator == "tensorrt":
            raise EdgeTLError("--accelerator tensorrt is for ONNX models; an engine already is TensorRT",
                              "leave out --accelerator with --engine")
        try:
            profile_max = int(str(key.get("batch_profile", "")).split("-")[-1])
        except ValueError:
            profile_max = m.max_batch
        max_batch = opts.max_batch or profile_max
        if max_batch > profile_max:
            raise EdgeTLError(f"--max-batch {max_batch} is larger than the engine's batch profile "
                              f"({key.get('batch_profile')})", f"use --max-batch {profile_max} or less, or rebuild")
        return name, precision, max_batch, side
    precision = opts.precision or m.default_precision
    if precision not in PRECISIONS:
        raise EdgeTLError(f"--precision {precision} is not one of {', '.join(PRECISIONS)}", "choose one of them")
    accel = opts.accelerator or ("tensorrt" if opts.kind == "gpu" else "none")
    if accel not in ("tensorrt", "none"):
        raise EdgeTLError(f"--accelerator {accel} is not tensorrt or none", "choose tensorrt or none")
    if accel == "tensorrt" and opts.kind == "cpu":
        raise EdgeTLError("the TensorRT accelerator runs on the GPU, not with --kind cpu",
                          "use --kind gpu, or --accelerator none")
    if precision == "fp16" and accel != "tensorrt":
        raise EdgeTLError("--precision fp16 needs the TensorRT accelerator (ONNX Runtime's CUDA and CPU providers "
                          "would run the FP32 model)", "use --accelerator tensorrt, or --precision fp32")
    opts.accelerator = accel
    max_batch = opts.max_batch or m.max_batch
    if max_batch < 1:
        raise EdgeTLError(f"--max-batch {max_batch} must be at least 1", "fix the option")
    return name, precision, max_batch, None


def export_triton(bundle_path: str | Path, repo: str | Path, opts: TritonOptions | None = None, *,
                  overwrite: bool = False, extract_to: Path | None = None) -> dict[str, Any]:
    """Write the model repository entry; returns what was written (paths, precision, validated)."""
    import tempfile

    opts = opts or TritonOptions()
    with tempfile.TemporaryDirectory(prefix="edge-tl-triton-") as tmp:
        bundle = Bundle.open(bundle_path, extract_to=extract_to or Path(tmp) / "bundle")
        bundle.verify()  # every artifact against its sha256 before anything is used
        name, precision, max_batch, side = _resolve(bundle, opts)
        plan = side is not None
        source = Path(opts.engine) if plan else bundle.model_path(PRECISIONS[precision][0])
        if not plan:
            _check_io(bundle, source)
        config = model_config(bundle, opts, name=name, precision=precision, max_batch=max_batch, plan=plan)
        text = to_pbtxt(config) + "\n"
        validated = has_module("tritonclient") and triton_schema() is not None
        if validated:
            validate_with_triton(text)
        final = Path(repo) / name
        with atomic_dir(final, overwrite=overwrite) as staging:
            vdir = staging / str(opts.version)
            vdir.mkdir()
            target = vdir / ("model.plan" if plan else "model.onnx")
            shutil.copyfile(source, target)
            if sha256_file(target) != (side["engine_sha256"] if plan else sha256_file(source)):
                raise CheckFailed(f"the copy of {source.name} does not match it", "check the disk and re-run")
            if "label_filename" in config["output"][0]:
                shutil.copyfile(bundle.file(LABELS), staging / LABELS)
            atomic_write_text(staging / CONFIG, text)
            prov = {"exported": utc_now(), "bundle_id": bundle.manifest.bundle_id, "bundle": bundle.manifest.name,
                    "precision": precision, "source": source.name, "sha256": sha256_file(target),
                    "engine_key": (side or {}).get("key"), "config_validated_with_tritonclient": validated}
            atomic_write_text(staging / PROVENANCE, json.dumps(prov, indent=2) + "\n")
    return {"model_dir": str(final), "config": str(final / CONFIG), "model": str(final / str(opts.version) /
            target.name), "name": name, "precision": precision, "max_batch_size": config["max_batch_size"],
            "platform": "tensorrt_plan" if plan else "onnxruntime", "accelerator": None if plan else opts.accelerator,
            "validated": validated}
