"""Per-layer latency tables: what ``edge-tl bench --layer-profile`` writes on the device and ``edge-tl build``
reads to prune to a latency target (``prune.target = {latency_ms = X, backend = "table", table = PATH}``).

The format is documented in docs/latency-table.md. In short: a JSON object validated by :class:`LatencyTable`
with the model's identity (:func:`arch_fingerprint` of the ONNX graph the table was measured on: op types,
node names and weight shapes, NOT the weight values, since latency does not depend on them), the runtime
(TensorRT version, or ONNX Runtime), the device, the precision, the statistic (median) and one entry per
runtime layer: its name as the runtime reports it (TensorRT: fused ONNX node names joined by `` + ``) and its
time in milliseconds per inference.

No torch here: the device writes tables, the workstation reads them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_tl.core.errors import EdgeTLError

FORMAT = "edge-tl-latency-table/1"


class LayerTime(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, description="the runtime's layer name (TensorRT: ONNX node names joined by ' + ')")
    ms: float = Field(ge=0, description="time per inference, milliseconds (the table's statistic)")
    op: str | None = Field(None, description="op type when the runtime reports one (ONNX Runtime's profiler)")


class ModelIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="arch_fingerprint() of the ONNX model profiled")
    onnx_sha256: str | None = Field(None, description="sha256 of the ONNX file itself (informative)")
    name: str | None = None
    input_shape: list[int] = Field(min_length=4, max_length=4, description="N, C, H, W of the profiled input")


class LatencyTable(BaseModel):
    """One per-layer profile of one model on one runtime and device."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format: Literal["edge-tl-latency-table/1"] = FORMAT
    model: ModelIdentity
    backend: Literal["tensorrt", "ort-cpu"]
    tensorrt: str | None = Field(None, description="TensorRT version (backend tensorrt), e.g. 10.3.0")
    onnxruntime: str | None = Field(None, description="ONNX Runtime version (backend ort-cpu)")
    device: str = Field(description="GPU / SoC or CPU name")
    precision: Literal["fp32", "fp16", "int8", "best"]
    statistic: Literal["median", "average"] = "median"
    iterations: int = Field(ge=1, description="profiled inferences the statistic is over")
    threads: int | None = Field(None, ge=1, description="CPU threads (ort-cpu)")
    command: list[str] = Field(default_factory=list, description="how it was measured")
    measured_at: str | None = None
    layers: list[LayerTime] = Field(min_length=1)

    def total_ms(self) -> float:
        return float(sum(layer.ms for layer in self.layers))

    def check_for(self, arch_sha256: str, tensorrt: str | None, what: str) -> None:
        """Refuse a table measured on another architecture or another TensorRT (major.minor)."""
        if self.model.arch_sha256 != arch_sha256:
            raise EdgeTLError(
                f"latency table {what} was measured on another model (architecture {self.model.arch_sha256[:12]}, "
                f"this build prunes {arch_sha256[:12]})",
                "profile the unpruned model of this build: build it with prune.enabled = false, then on the device "
                "run edge-tl bench BUNDLE --layer-profile TABLE.json")
        other_trt = _major_minor(self.tensorrt) != _major_minor(tensorrt)
        if self.backend == "tensorrt" and tensorrt is not None and other_trt:
            raise EdgeTLError(f"latency table {what} was measured with TensorRT {self.tensorrt}; this build targets "
                              f"TensorRT {tensorrt}",
                              "re-run edge-tl bench --layer-profile on a device with the target's TensorRT, or set "
                              "the build's target to match the table")


def _major_minor(version: str | None) -> tuple[str, ...]:
    return tuple((version or "").split(".")[:2])


def arch_fingerprint(model: str | Path | bytes) -> str:
    """sha256 of an ONNX graph's structure: node names, op types, inputs/outputs and the SHAPES of its
    initializers (not their values). Two exports of the same architecture with other weights match."""
    import onnx

    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    else:
        proto = onnx.load(str(model), load_external_data=False)
    g = proto.graph
    desc = {
        "nodes": [[n.name, n.op_type, list(n.input), list(n.output)] for n in g.node],
        "init": sorted([i.name, list(i.dims)] for i in g.initializer),
        "inputs": [i.name for i in g.input],
        "outputs": [o.name for o in g.output],
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def load_table(path: str | Path) -> LatencyTable:
    """Read and validate a table; one-line errors for a missing, unreadable or malformed file."""
    path = Path(path)
    fix = "give a table written by edge-tl bench --layer-profile (format: docs/latency-table.md)"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeTLError(f"latency table {path} does not exist", fix) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeTLError(f"latency table {path} is not readable JSON ({exc})", fix) from None
    try:
        return LatencyTable.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise EdgeTLError(f"latency table {path}: {loc}: {err['msg']}", fix) from None


def table_digest(path: str | Path) -> str:
    """sha256 of the table file (the prune stage's cache key includes it)."""
    from edge_tl.core.fsutil import sha256_file

    return sha256_file(path)


def write_table(table: LatencyTable, out: str | Path) -> Path:
    """Write ``table`` as JSON, atomically (temp file, then rename)."""
    from edge_tl.core.fsutil import atomic_write_text

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, table.model_dump_json(indent=2, exclude_none=True) + "\n")
    return out
