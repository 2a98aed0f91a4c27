"""The bundle: what `edge-tl build` hands to the device side. Documented in docs/bundle.md.

A bundle is a directory (and a ``.tar.gz`` of it) holding::

    manifest.json        this schema (Manifest), with every other file's sha256 and size
    model.onnx           FP32, dynamic batch axis, simplified and checked
    model.int8.onnx      INT8 Q/DQ (explicit quantization: symmetric, per-channel weights)
    labels.txt           one class name per line, in output order
    preprocess.json      edge_tl.core.preprocess.PreprocessConfig
    golden/inputs.npy    N x C x H x W float32, already preprocessed
    golden/outputs.npy   N x num_classes float32: model.onnx's outputs for those inputs (ONNX Runtime CPU)
    golden/images/*.png  the N source images, so a device can check preprocessing too
    golden/golden.json   per image: file, label index, label name

This module needs only NumPy and pydantic: the device reads bundles without torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_tl import __version__
from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.fsutil import atomic_dir, atomic_write_text, make_tarball, safe_extract, sha256_file
from edge_tl.core.preprocess import PreprocessConfig, Preprocessor

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
FP32_MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"
LABELS = "labels.txt"
PREPROCESS = "preprocess.json"
GOLDEN_INPUTS = "golden/inputs.npy"
GOLDEN_OUTPUTS = "golden/outputs.npy"
GOLDEN_INDEX = "golden/golden.json"
MODEL_FILES = {"fp32": FP32_MODEL, "int8": INT8_MODEL}

Precision = Literal["fp32", "int8"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Artifact(_Model):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TargetInfo(_Model):
    """The device software the bundle is built for (see edge_tl.core.targets)."""

    name: str = Field(description="e.g. jetpack6")
    jetpack: str
    tensorrt: str
    max_opset: int
    opset: int = Field(description="the opset model.onnx was exported with (<= max_opset)")


class TensorSpec(_Model):
    name: str
    shape: list[int | str] = Field(description="'batch' marks the dynamic axis")
    dtype: str = "float32"


class StageMetrics(BaseModel):
    """One pipeline stage's numbers; stages may add more keys (``extra='allow'``)."""

    model_config = ConfigDict(extra="allow")

    top1: float | None = Field(None, description="top-1 accuracy on the test split, 0..1")
    macs: int | None = None
    params: int | None = None
    file_bytes: int | None = None
    cpu_latency_ms: float | None = Field(None, description="median, batch 1, ONNX Runtime CPU (torch for finetune)")


class DataSummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    source: str
    split_mode: Literal["folders", "stratified"]
    counts: dict[str, dict[str, int]] = Field(description="split -> class -> images")
    file_list_sha256: str
    skipped: list[dict[str, str]] = Field(default_factory=list, description="files not used and why")


class GoldenInfo(_Model):
    count: int
    inputs: str = GOLDEN_INPUTS
    outputs: str = GOLDEN_OUTPUTS
    index: str = GOLDEN_INDEX


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    edge_tl_version: str = __version__
    created: str = Field(description="UTC, ISO 8601")
    bundle_id: str = Field("", description="first 16 hex of the sha256 over the artifacts' hashes")
    name: str
    target: TargetInfo
    backbone: str
    weights: str
    input: TensorSpec
    output: TensorSpec
    max_batch: int = Field(32, ge=1, description="largest batch the engine profile must accept")
    classes: list[str]
    default_precision: Precision = "int8"
    software: dict[str, str] = Field(default_factory=dict)
    seed: int
    data: DataSummary
    stages: dict[str, StageMetrics] = Field(description="finetune, prune, quantize")
    export: dict[str, Any] = Field(default_factory=dict)
    golden: GoldenInfo
    artifacts: dict[str, Artifact] = Field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The few facts `deploy status` and `serve` show."""
        return {
            "name": self.name,
            "bundle_id": self.bundle_id,
            "backbone": self.backbone,
            "created": self.created,
            "classes": len(self.classes),
            "top1": {k: v.top1 for k, v in self.stages.items()},
        }


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _artifact_table(root: Path) -> dict[str, Artifact]:
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            table[rel] = Artifact(sha256=sha256_file(path), bytes=path.stat().st_size)
    return table


def bundle_id_of(artifacts: dict[str, Artifact]) -> str:
    """The bundle id: the first 16 hex digits of a SHA-256 over the sorted (path, sha256) artifact table."""
    h = hashlib.sha256()
    for rel, art in sorted(artifacts.items()):
        h.update(f"{rel}\0{art.sha256}\n".encode())
    return h.hexdigest()[:16]


def write_bundle(staging: Path, manifest: Manifest, out_dir: Path, *, overwrite: bool = False,
                 tarball: bool = True) -> Path:
    """Seal a staged bundle: hash every file, write manifest.json, move it to ``out_dir`` atomically,
    then write ``out_dir.tar.gz`` (also atomically). ``staging`` is consumed.
    """
    for required in (FP32_MODEL, LABELS, PREPROCESS, GOLDEN_INPUTS, GOLDEN_OUTPUTS):
        if not (staging / required).is_file():
            raise EdgeTLError(f"bundle is missing {required}", "this is a bug in the build pipeline")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for item in staging.iterdir():
            item.rename(tmp / item.name)
        artifacts = _artifact_table(tmp)
        sealed = manifest.model_copy(update={"artifacts": artifacts, "bundle_id": bundle_id_of(artifacts)})
        atomic_write_text(tmp / MANIFEST, sealed.model_dump_json(indent=2) + "\n")
    if tarball:
        make_tarball(out_dir, out_dir.with_name(out_dir.name + ".tar.gz"))
    return out_dir


class Bundle:
    """A bundle on disk, read lazily. ``Bundle.open`` takes a directory or a ``.tar.gz``."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, *, extract_to: str | Path | None = None) -> Bundle:
        path = Path(path)
        if not path.exists():
            raise EdgeTLError(f"bundle {path} does not exist", "give the folder or .tar.gz that edge-tl build wrote")
        if path.is_file():
            if not path.name.endswith((".tar.gz", ".tgz", ".tar")):
                raise EdgeTLError(f"{path} is neither a bundle folder nor a .tar.gz", "give the bundle folder")
            dest = Path(extract_to) if extract_to else Path(tempfile.mkdtemp(prefix="edge-tl-bundle-"))
            path = safe_extract(path, dest)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise EdgeTLError(f"{path} has no {MANIFEST}, so it is not an edge-tl bundle",
                              "give the folder that edge-tl build wrote")
        try:
            data = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise EdgeTLError(f"{mpath} is not valid JSON ({exc})", "re-copy or rebuild the bundle") from exc
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise EdgeTLError(f"{mpath} has schema_version {version}, this edge-tl reads {SCHEMA_VERSION}",
                              f"use the edge-tl version that built it ({data.get('edge_tl_version', '?')})")
        try:
            manifest = Manifest.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise EdgeTLError(f"{mpath}: '{loc}' {err['msg']}", "re-copy or rebuild the bundle") from exc
        return cls(path, manifest)

    # -- contents -----------------------------------------------------------------------------------
    def file(self, rel: str) -> Path:
        return self.root / rel

    def model_path(self, precision: str = "fp32") -> Path:
        if precision not in MODEL_FILES:
            raise EdgeTLError(f"unknown model precision '{precision}'", f"choose one of {sorted(MODEL_FILES)}")
        path = self.root / MODEL_FILES[precision]
        if not path.is_file():
            raise EdgeTLError(f"bundle {self.root} has no {MODEL_FILES[precision]}", "rebuild the bundle")
        return path

    @cached_property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.load(self.root / PREPROCESS)

    @cached_property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.preprocess)

    @cached_property
    def labels(self) -> list[str]:
        return [line for line in (self.root / LABELS).read_text().splitlines() if line]

    def golden_inputs(self) -> np.ndarray:
        return np.load(self.root / self.manifest.golden.inputs, allow_pickle=False)

    def golden_outputs(self) -> np.ndarray:
        return np.load(self.root / self.manifest.golden.outputs, allow_pickle=False)

    def golden_index(self) -> list[dict[str, Any]]:
        path = self.root / self.manifest.golden.index
        return json.loads(path.read_text()) if path.is_file() else []

    # -- integrity ----------------------------------------------------------------------------------
    def verify(self) -> None:
        """Check every artifact's size and sha256 against the manifest; raise CheckFailed on any mismatch."""
        problems = []
        for rel, art in self.manifest.artifacts.items():
            path = self.root / rel
            if not path.is_file():
                problems.append(f"{rel} is missing")
            elif path.stat().st_size != art.bytes or sha256_file(path) != art.sha256:
                problems.append(f"{rel} does not match its sha256")
        extra = set(_artifact_table(self.root)) - set(self.manifest.artifacts)
        problems += [f"{rel} is not in the manifest" for rel in sorted(extra)]
        if not self.manifest.artifacts:
            problems.append("the manifest lists no artifacts")
        if problems:
            raise CheckFailed(f"bundle {self.root} failed verification: {'; '.join(problems)}",
                              "re-copy the bundle; if it persists, rebuild it")

    def __repr__(self) -> str:
        return f"Bundle({self.root}, {self.manifest.name}, id={self.manifest.bundle_id})"
