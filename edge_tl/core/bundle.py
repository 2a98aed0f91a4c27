"""The bundle: what `edge-tl build` hands to the device side. Documented in docs/bundle.md.

A bundle is a directory (and a ``.tar.gz`` of it) holding::

    manifest.json        this schema (Manifest), with every other file's sha256 and size
    model.onnx           FP32, dynamic batch axis, simplified and checked
    model.int8.onnx      INT8 Q/DQ (explicit quantization: symmetric, per-channel weights)
    labels.txt           one class name per line, in output order (for people: the manifest's ``classes``
                         is what every command reads)
    preprocess.json      edge_tl.core.preprocess.PreprocessConfig
    postprocess.json     edge_tl.core.postprocess.PostprocessConfig: the temperature of the scores (schema 2 on)
    golden/inputs.u8.npy N x H x W x 3 uint8: the golden images resized and cropped (steps 1-3 of preprocessing);
                         normalized on reading (``Bundle.golden_inputs``). Schema 1-2: golden/inputs.npy, float32
                         N x C x H x W, already preprocessed
    golden/outputs.npy   N x num_classes float32: model.onnx's outputs for those inputs (ONNX Runtime CPU)
    golden/outputs.int8.npy  N x num_classes float32: model.int8.onnx's outputs, Q/DQ evaluated in float: the
                         reference of the INT8 parity gate (schema 3 on; see edge_tl.core.parity)
    golden/images/*.png  the first few source images, so a device can check preprocessing too
    golden/golden.json   per image: label index, label name, split, file (where its PNG is kept)
    signature.json       (optional) an Ed25519 signature of the manifest's digest (edge_tl.core.signing)

From schema 4 the bundle id is the first 16 hex digits of the manifest's digest (a SHA-256 over its canonical JSON,
``edge_tl.core.signing.manifest_digest``), and the manifest lists every other file's hash: editing any byte of any
file, or any field of the manifest (its classes, its metrics), changes the id, and every open checks it. Schemas
1-3 computed the id over the artifact hashes only (the manifest's other fields were not covered).

This module needs only NumPy and pydantic: the device reads bundles without torch.

``Bundle.open`` verifies every artifact against the manifest's sha256 (for every command that opens one), after
refusing manifest paths that leave the bundle. A ``.tar.gz`` is unpacked once into a cache keyed by the
archive's sha256 (``$EDGE_TL_BUNDLE_CACHE``, else ``$XDG_CACHE_HOME/edge-tl/bundles``), so nothing is left in
the temp folder.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_tl import __version__
from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.fsutil import (
    atomic_dir,
    atomic_write_text,
    chmod_default,
    chmod_tree,
    make_tarball,
    safe_extract,
    sha256_file,
)
from edge_tl.core.postprocess import PostprocessConfig
from edge_tl.core.preprocess import PreprocessConfig, Preprocessor
from edge_tl.core.signing import SIGNATURE, SignatureStatus, check_signature, manifest_digest, sign_folder, trusted_keys

#: 2: postprocess.json (the calibrated temperature of the scores). Schema 1 bundles are still read: no
#: postprocess.json there, so temperature 1 (plain softmax), what they always meant.
#: 3: the golden set as uint8 crops (64 by default), the INT8 reference outputs and the margin tolerances of the
#: parity gate (edge_tl.core.parity). Schema 1-2 bundles are still read; their INT8 gate is refused (no reference).
#: 4: the bundle id covers the whole manifest (issue 24); bundles may carry signature.json (edge_tl.core.signing).
SCHEMA_VERSION = 4
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)
MANIFEST_COVERED_FROM = 4  # the schema from which the bundle id covers the whole manifest

MANIFEST = "manifest.json"
FP32_MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"
LABELS = "labels.txt"
PREPROCESS = "preprocess.json"
POSTPROCESS = "postprocess.json"
GOLDEN_INPUTS = "golden/inputs.u8.npy"
GOLDEN_INPUTS_FLOAT = "golden/inputs.npy"  # schema 1-2
GOLDEN_OUTPUTS = "golden/outputs.npy"
GOLDEN_INT8_OUTPUTS = "golden/outputs.int8.npy"
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
    count: int = Field(ge=1)
    inputs: str = GOLDEN_INPUTS_FLOAT
    outputs: str = GOLDEN_OUTPUTS
    outputs_int8: str | None = Field(None, description="the INT8 reference outputs (schema 3 on)")
    index: str = GOLDEN_INDEX
    margin_tolerance: dict[str, float] = Field(
        default_factory=dict, description="precision -> reference top-1 margin at or below which an input is a "
                                          "near-tie the parity gate does not count (edge_tl.core.parity)")
    tolerance_note: str = ""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    edge_tl_version: str = __version__
    created: str = Field(description="UTC, ISO 8601")
    bundle_id: str = Field("", description="schema 4 on: first 16 hex of the manifest's digest (its canonical JSON "
                           "without bundle_id, which lists every file's sha256); schema 1-3: of the artifacts' "
                           "hashes only")
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

    def training_problems(self) -> list[str]:
        """Why the shipped model's training failed (the build's ``chance_check`` of the pruned model, or of the
        fine-tuned one where nothing was recovered: ``passed`` false), as lines for people; empty when training
        worked (or an old bundle recorded nothing)."""
        for stage in ("prune", "finetune"):  # the shipped model is the pruned one; unpruned, the fine-tuned one
            m = self.stages.get(stage)
            check = (m.model_extra or {}).get("chance_check") if m is not None else None
            if not isinstance(check, dict):
                continue
            if check.get("passed") is not False:
                return []
            try:
                why = (f"validation top-1 {float(check['val_top1']):.1%} is no better than guessing "
                       f"({float(check['baseline']):.1%}, p = {float(check['p_value']):.2g})")
            except (KeyError, TypeError, ValueError):
                why = "no better than guessing"
            return [f"{stage}: {why}"]
        return []

    def summary(self) -> dict[str, Any]:
        """The few facts `deploy status` and `serve` show."""
        return {
            "name": self.name,
            "bundle_id": self.bundle_id,
            "backbone": self.backbone,
            "created": self.created,
            "classes": len(self.classes),
            "top1": {k: v.top1 for k, v in self.stages.items()},
            "training_failed": bool(self.training_problems()),
        }


def refuse_failed_training(manifest: Manifest, allow: bool, flag: str = "--allow-failed-training") -> str | None:
    """Refuse to deploy a bundle whose training failed (the build's chance check), unless ``allow``; with it, the
    warning line to print and record (None when training worked)."""
    problems = manifest.training_problems()
    if not problems:
        return None
    what = f"bundle {manifest.name} ({manifest.bundle_id}): training failed ({'; '.join(problems)})"
    if not allow:
        raise EdgeTLError(f"{what}; its answers are no better than guessing",
                          f"fix the data or the recipe and rebuild, or pass {flag} to deploy it anyway")
    return f"WARNING: {what}; deployed anyway ({flag})"


def unsafe_class_name(name: str) -> str | None:
    """Why ``name`` can't be a class name (it would break a line-based file or a terminal), or None."""
    import unicodedata

    if not name.strip():
        return "it is empty"
    for i, ch in enumerate(name):
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Zl", "Zp"):
            return f"it holds the control character {ch!r}"
        # invisible format characters: zero-width spaces, bidi overrides/isolates (a name that shows as another,
        # CVE-2021-42574's trick), BOMs. Zero-width (non-)joiners stay where a script needs them: between letters
        if cat == "Cf" and not (ch in "\u200c\u200d" and 0 < i < len(name) - 1
                                and unicodedata.category(name[i - 1])[0] in "LMS"
                                and unicodedata.category(name[i + 1])[0] in "LMS"):
            return f"it holds the invisible character U+{ord(ch):04X} ({unicodedata.name(ch, 'format character')})"
    return None


def lookalike_classes(names: list[str]) -> tuple[str, str] | None:
    """Two class names that read the same (equal after Unicode NFKC normalisation and case folding: 'Cat' and
    'cat', 'ﬁsh' and 'fish', a full-width 'Ａ' and 'A'), or None."""
    import unicodedata

    seen: dict[str, str] = {}
    for name in names:
        key = unicodedata.normalize("NFKC", name).casefold().strip()
        if key in seen:
            return seen[key], name
        seen[key] = name
    return None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _symlinks(root: Path) -> list[str]:
    """Every symbolic link under ``root`` (to a file or a folder, dangling or not), not followed: what a link
    points to is outside what the manifest's hashes cover."""
    import os

    found = []
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            if os.path.islink(os.path.join(top, name)):
                found.append(Path(os.path.relpath(os.path.join(top, name), root)).as_posix())
    return sorted(found)


def _artifact_table(root: Path, *, hashes: bool = True) -> dict[str, Artifact | None]:
    table: dict[str, Artifact | None] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in (MANIFEST, SIGNATURE):
            table[rel] = Artifact(sha256=sha256_file(path), bytes=path.stat().st_size) if hashes else None
    return table


# -- the .tar.gz cache ----------------------------------------------------------------------------------
CACHE_KEEP = 8  # unpacked archives kept (least recently used go first)


def bundle_cache_dir() -> Path:
    env = os.environ.get("EDGE_TL_BUNDLE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "edge-tl" / "bundles"


def _cached_root(entry: Path) -> Path | None:
    if (entry / MANIFEST).is_file():
        return entry
    subdirs = [p for p in entry.iterdir() if p.is_dir()] if entry.is_dir() else []
    return subdirs[0] if len(subdirs) == 1 and (subdirs[0] / MANIFEST).is_file() else None


def _extract_cached(archive: Path) -> tuple[Path, Path]:
    """Unpack ``archive`` once into the cache (keyed by its sha256) and return the bundle folder there.

    Where the cache can't be written, it is unpacked into a temporary folder removed when the process exits.
    Returns (bundle folder, cache entry)."""
    digest = sha256_file(archive)
    cache = bundle_cache_dir()
    entry = cache / digest
    found = _cached_root(entry)
    if found is not None:
        os.utime(entry)
        return found, entry
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.partial-", dir=cache))
    except OSError:
        tmp = Path(tempfile.mkdtemp(prefix="edge-tl-bundle-"))
        atexit.register(shutil.rmtree, tmp, True)
        try:
            return safe_extract(archive, tmp), tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        chmod_default(tmp, directory=True)
        rel = safe_extract(archive, tmp).relative_to(tmp)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process put it there first (or left a broken one): use ours under a new name
            if _cached_root(entry) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return _cached_root(entry), entry  # type: ignore[return-value]
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune_cache(cache, keep=entry)
    return entry / rel, entry


def _prune_cache(cache: Path, keep: Path) -> None:
    try:
        entries = sorted((p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".") and p != keep),
                         key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in entries[CACHE_KEEP - 1:]:
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 3600:  # one opened in the last hour may still be in use
                shutil.rmtree(old, ignore_errors=True)


def bundle_id_of(artifacts: dict[str, Artifact]) -> str:
    """The bundle id: the first 16 hex digits of a SHA-256 over the sorted (path, sha256) artifact table."""
    h = hashlib.sha256()
    for rel, art in sorted(artifacts.items()):
        h.update(f"{rel}\0{art.sha256}\n".encode())
    return h.hexdigest()[:16]


def seal_manifest(root: Path, manifest: Manifest) -> dict[str, Any]:
    """Hash every file of the bundle folder ``root``, set the bundle id and write manifest.json; returns the
    manifest as written (a dict). Schema 4 on: the id is the manifest digest's first 16 hex digits."""
    artifacts = _artifact_table(root)
    sealed = manifest.model_copy(update={"artifacts": artifacts, "bundle_id": bundle_id_of(artifacts)})
    data = json.loads(sealed.model_dump_json())
    if sealed.schema_version >= MANIFEST_COVERED_FROM:
        data["bundle_id"] = manifest_digest(data)[:16]
    atomic_write_text(root / MANIFEST, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return data


def write_bundle(staging: Path, manifest: Manifest, out_dir: Path, *, overwrite: bool = False,
                 tarball: bool = True, check: Callable[[Path], None] | None = None,
                 sign_key: Any = None) -> Path:
    """Seal a staged bundle: hash every file, write manifest.json, move it to ``out_dir`` atomically,
    then write ``out_dir.tar.gz`` (also atomically). ``staging`` is consumed.

    ``check`` is called with the sealed bundle's folder before it is moved into place (the build's parity
    self-gate): if it raises, nothing is written and ``out_dir`` is left as it was. ``sign_key`` (an Ed25519
    private key, edge_tl.core.signing.load_private_key) signs the sealed manifest into signature.json.
    """
    for required in (FP32_MODEL, LABELS, PREPROCESS, manifest.golden.inputs, manifest.golden.outputs):
        if not (staging / required).is_file():
            raise EdgeTLError(f"bundle is missing {required}", "this is a bug in the build pipeline")
    if not (staging / POSTPROCESS).is_file():  # not calibrated: say so in the bundle (temperature 1)
        PostprocessConfig().save(staging / POSTPROCESS)
    PostprocessConfig.load(staging / POSTPROCESS)  # a bad temperature is refused before anything is sealed
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for item in staging.iterdir():
            item.rename(tmp / item.name)
        chmod_tree(tmp)  # 0644/0755 under the usual umask, whatever the stages' temp files were born with
        data = seal_manifest(tmp, manifest)
        if sign_key is not None:
            sign_folder(tmp, manifest_digest(data), sign_key)
        if check is not None:
            check(tmp)
    if tarball:
        make_tarball(out_dir, out_dir.with_name(out_dir.name + ".tar.gz"))
    return out_dir


class Bundle:
    """A bundle on disk, read lazily. ``Bundle.open`` takes a directory or a ``.tar.gz``."""

    def __init__(self, root: Path, manifest: Manifest, raw: dict[str, Any] | None = None):
        self.root = root
        self.manifest = manifest
        self.raw = raw if raw is not None else json.loads(manifest.model_dump_json())  # manifest.json as read
        self._verified = False

    @classmethod
    def open(cls, path: str | Path, *, extract_to: str | Path | None = None, verify: bool = True) -> Bundle:
        """Open a bundle folder or ``.tar.gz``; with ``verify`` (the default) every artifact is checked
        against the manifest's sha256 before anything in it is used (CheckFailed, exit 3, on a mismatch).

        A ``.tar.gz`` is unpacked into ``extract_to`` (the caller's folder) or into the bundle cache."""
        path = Path(path)
        if not path.exists():
            raise EdgeTLError(f"bundle {path} does not exist", "give the folder or .tar.gz that edge-tl build wrote")
        if path.is_file():
            if not path.name.endswith((".tar.gz", ".tgz", ".tar")):
                raise EdgeTLError(f"{path} is neither a bundle folder nor a .tar.gz", "give the bundle folder")
            if extract_to:
                path = safe_extract(path, Path(extract_to))
            else:
                path, entry = _extract_cached(path)
                try:
                    return cls._open_dir(path, verify=verify)
                except BaseException:  # a bad archive leaves nothing behind in the cache either
                    shutil.rmtree(entry, ignore_errors=True)
                    raise
        return cls._open_dir(path, verify=verify)

    @classmethod
    def _open_dir(cls, path: Path, *, verify: bool) -> Bundle:
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise EdgeTLError(f"{path} has no {MANIFEST}, so it is not an edge-tl bundle",
                              "give the folder that edge-tl build wrote")
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EdgeTLError(f"{mpath} is not valid JSON ({exc})", "re-copy or rebuild the bundle") from exc
        except OSError as exc:
            raise EdgeTLError(f"cannot read {mpath} ({exc.strerror or exc})", "check the file's permissions") from exc
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version not in READABLE_SCHEMA_VERSIONS:
            made_by = data.get("edge_tl_version", "?") if isinstance(data, dict) else "?"
            raise EdgeTLError(f"{mpath} has schema_version {version}, this edge-tl reads "
                              f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}",
                              f"use the edge-tl version that built it ({made_by})")
        try:
            manifest = Manifest.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise EdgeTLError(f"{mpath}: '{loc}' {err['msg']}", "re-copy or rebuild the bundle") from exc
        bundle = cls(path, manifest, data)
        bundle.check_paths()
        if verify:
            bundle.verify()
            bundle.check_consistency()
        return bundle

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
    def postprocess(self) -> PostprocessConfig:
        """How logits become scores (the calibrated temperature). A schema 1 bundle has none: temperature 1."""
        if POSTPROCESS not in self.manifest.artifacts and self.manifest.schema_version < 2:
            return PostprocessConfig()
        return PostprocessConfig.load(self.root / POSTPROCESS)

    @property
    def labels(self) -> list[str]:
        """The class names in output order: the manifest's ``classes`` (labels.txt is a copy for people)."""
        return list(self.manifest.classes)

    def _golden_array(self, rel: str, what: str, dtype: str, shape: tuple[int | None, ...]) -> np.ndarray:
        """A golden array, checked: dtype, shape (None: any size) and finite values; one-line errors."""
        path = self.root / rel
        fix = "rebuild the bundle (edge-tl build), or re-copy it if it was damaged on the way"
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise EdgeTLError(f"bundle {self.root}: cannot read the golden {what} {rel} ({exc})", fix) from exc
        want = "x".join("N" if d is None else str(d) for d in shape)
        if arr.dtype != np.dtype(dtype) or arr.ndim != len(shape) or any(
                d is not None and a != d for a, d in zip(arr.shape, shape, strict=False)):
            raise EdgeTLError(f"bundle {self.root}: the golden {what} {rel} are {arr.dtype} "
                              f"{'x'.join(map(str, arr.shape))}, not {dtype} {want}", fix)
        if len(arr) != self.manifest.golden.count:
            raise EdgeTLError(f"bundle {self.root}: the golden {what} {rel} hold {len(arr)} rows, the manifest says "
                              f"{self.manifest.golden.count}", fix)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise EdgeTLError(f"bundle {self.root}: the golden {what} {rel} hold NaN or infinite values", fix)
        return arr

    def golden_crops(self) -> np.ndarray | None:
        """The golden images after resize and crop (N x H x W x 3 uint8); None for a schema 1-2 bundle, which
        stored them preprocessed."""
        if self.manifest.golden.inputs == GOLDEN_INPUTS_FLOAT:
            return None
        h, w = self.preprocess.input_size
        return self._golden_array(self.manifest.golden.inputs, "inputs", "uint8", (None, h, w, 3))

    def golden_inputs(self) -> np.ndarray:
        """The golden inputs, preprocessed (N x C x H x W float32): the crops normalized by this bundle's own
        preprocessing (schema 3), or the stored floats (schema 1-2)."""
        crops = self.golden_crops()
        if crops is None:
            h, w = self.preprocess.input_size
            return self._golden_array(self.manifest.golden.inputs, "inputs", "float32", (None, 3, h, w))
        pre = self.preprocessor
        return np.stack([pre.normalize(c) for c in crops])

    def golden_outputs(self) -> np.ndarray:
        """The FP32 model's outputs on the golden inputs (the fp32/fp16 parity reference)."""
        return self._golden_array(self.manifest.golden.outputs, "FP32 outputs", "float32",
                                  (None, len(self.manifest.classes)))

    def golden_reference(self, precision: str) -> np.ndarray:
        """What the parity gate compares a ``precision`` engine with: the INT8 reference outputs (Q/DQ in float)
        for int8/best, the FP32 outputs otherwise. A bundle without an INT8 reference (schema 1-2) is refused for
        int8/best: judged against FP32 its near-ties flip and the gate measures quantization, not the device."""
        if precision not in ("int8", "best"):
            return self.golden_outputs()
        rel = self.manifest.golden.outputs_int8
        if not rel:
            m = self.manifest
            raise EdgeTLError(f"bundle {self.root} (schema {m.schema_version}, edge-tl {m.edge_tl_version}) has "
                              "no INT8 reference outputs, so its INT8 parity gate would judge quantization, not the "
                              "device",
                              "rebuild it with this edge-tl (edge-tl build --out RUN with the same spec), or gate "
                              "it at --precision fp16 or fp32")
        return self._golden_array(rel, "INT8 reference outputs", "float32", (None, len(self.manifest.classes)))

    def margin_tolerance(self, precision: str) -> float:
        """The reference top-1 margin at or below which the parity gate treats an input as a near-tie (0 for an
        old bundle: every input judged)."""
        tol = self.manifest.golden.margin_tolerance
        return float(tol.get(precision, tol.get("int8" if precision == "best" else precision, 0.0)))

    def golden_index(self) -> list[dict[str, Any]]:
        rel = self.manifest.golden.index
        path = self.root / rel
        if rel not in self.manifest.artifacts or not path.is_file():
            return []
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise EdgeTLError(f"{path} is not valid JSON ({exc})", "rebuild the bundle") from exc
        return index if isinstance(index, list) else []

    # -- integrity ----------------------------------------------------------------------------------
    def check_paths(self) -> None:
        """Refuse a manifest that names a path outside the bundle (absolute, ``..``, a link leading out),
        before anything at such a path is read."""
        golden = self.manifest.golden
        named = [("artifacts", rel) for rel in self.manifest.artifacts]
        named += [("golden.index", golden.index)] + ([("golden.outputs_int8", golden.outputs_int8)]
                                                     if golden.outputs_int8 else [])
        named += [("golden.inputs", golden.inputs), ("golden.outputs", golden.outputs)]
        root = self.root.resolve()
        for field, rel in named:
            parts = rel.replace("\\", "/").split("/")
            bad = (not rel or rel.startswith(("/", "~")) or "\\" in rel or ":" in parts[0]
                   or any(p in ("", ".", "..") for p in parts))
            if not bad:
                target = (self.root / rel).resolve()
                bad = target != root and root not in target.parents
            if bad:
                raise CheckFailed(f"bundle {self.root}: the manifest's {field} path '{rel}' is outside the bundle",
                                  "the manifest was edited or is corrupt; rebuild the bundle")
        for field, rel in named:
            if field.startswith("golden.") and field != "golden.index" and rel not in self.manifest.artifacts:
                raise CheckFailed(f"bundle {self.root}: the manifest's {field} '{rel}' is not among its artifacts",
                                  "the manifest was edited or is corrupt; rebuild the bundle")

    def verify(self) -> None:
        """Check every artifact's size and sha256 against the manifest; raise CheckFailed on any mismatch.

        Done once per opened bundle (``Bundle.open`` calls it); later calls return at once."""
        if self._verified:
            return
        self.check_paths()
        problems = []
        for rel, art in self.manifest.artifacts.items():
            path = self.root / rel
            if not path.is_file():
                problems.append(f"{rel} is missing")
            else:
                try:
                    if path.stat().st_size != art.bytes or sha256_file(path) != art.sha256:
                        problems.append(f"{rel} does not match its sha256")
                except OSError as exc:
                    problems.append(f"{rel} is not readable ({exc.strerror or exc})")
        try:
            extra = set(_artifact_table(self.root, hashes=False)) - set(self.manifest.artifacts)
        except OSError as exc:
            extra = set()
            problems.append(f"the folder is not readable ({exc.strerror or exc})")
        problems += [f"{rel} is not in the manifest" for rel in sorted(extra)]
        problems += [f"{rel} is a symbolic link (a bundle holds only regular files and folders)"
                     for rel in _symlinks(self.root)]
        if not self.manifest.artifacts:
            problems.append("the manifest lists no artifacts")
        for required in (FP32_MODEL, PREPROCESS) + ((POSTPROCESS,) if self.manifest.schema_version >= 2 else ()):
            if required not in self.manifest.artifacts:
                problems.append(f"the manifest does not list {required}")
        covered = self.manifest.schema_version >= MANIFEST_COVERED_FROM
        if not problems and (covered or self.manifest.bundle_id) and self.manifest.bundle_id != self.expected_id():
            problems.append(f"the bundle_id {self.manifest.bundle_id or '(none)'} does not match the "
                            + ("manifest (the manifest was edited)" if covered else "artifacts' hashes"))
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise CheckFailed(f"bundle {self.root} failed verification: {shown}",
                              "re-copy the bundle; if it persists, rebuild it")
        self._verified = True

    def expected_id(self) -> str:
        """The bundle id this bundle's content gives (schema 4 on: of the whole manifest; before: of the hashes)."""
        if self.manifest.schema_version >= MANIFEST_COVERED_FROM:
            return self.digest[:16]
        return bundle_id_of(self.manifest.artifacts)

    @property
    def digest(self) -> str:
        """SHA-256 of the manifest as read (canonical JSON without bundle_id): what a signature signs."""
        return manifest_digest(self.raw)

    def signature(self, keys: dict[str, Any] | None = None) -> SignatureStatus:
        """This bundle's signature against ``keys`` (default: the trusted keys of this machine)."""
        if self.manifest.schema_version < MANIFEST_COVERED_FROM:
            return SignatureStatus("unsigned", None, f"schema {self.manifest.schema_version} bundles are not "
                                   "signed (the manifest is not covered); rebuild it with this edge-tl")
        return check_signature(self.root, self.digest, trusted_keys() if keys is None else keys)

    def check_consistency(self) -> None:
        """The manifest's shapes and classes must agree with preprocess.json and with each other (a manifest
        is not covered by the hashes, so an edited one is caught here)."""
        m = self.manifest
        where = f"bundle {self.root}"
        fix = "the manifest was edited or is corrupt; rebuild the bundle"
        h, w = self.preprocess.input_size
        self.postprocess  # noqa: B018  (a bad temperature is refused when the bundle is opened, in one line)
        want_in = [3, h, w]
        if len(m.input.shape) != 4 or list(m.input.shape[1:]) != want_in or isinstance(m.input.shape[0], int) \
                and m.input.shape[0] < 1:
            raise EdgeTLError(f"{where}: the manifest's input shape {m.input.shape} does not match preprocess.json "
                              f"(batch, {', '.join(map(str, want_in))})", fix)
        if len(m.output.shape) != 2 or m.output.shape[1] != len(m.classes):
            raise EdgeTLError(f"{where}: the manifest's output shape {m.output.shape} does not match its "
                              f"{len(m.classes)} classes", fix)
        if len(set(m.classes)) != len(m.classes) or any(unsafe_class_name(c) for c in m.classes):
            raise EdgeTLError(f"{where}: the manifest's classes are empty, repeated or hold control characters", fix)
        if LABELS in m.artifacts:  # hashed, unlike the manifest: an edited class list shows here (issue 24)
            try:
                labels = (self.root / LABELS).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise CheckFailed(f"{where}: cannot read {LABELS} ({exc})", fix) from exc
            if labels != list(m.classes):
                raise CheckFailed(f"{where}: the manifest's classes do not match {LABELS} (the file the hashes "
                                  "cover): the manifest was edited", fix)

    def __repr__(self) -> str:
        return f"Bundle({self.root}, {self.manifest.name}, id={self.manifest.bundle_id})"
