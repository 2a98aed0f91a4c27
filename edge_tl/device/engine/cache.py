"""The engine cache: one engine per everything it depends on, with a sidecar JSON saying what that was.

A TensorRT engine runs only on the GPU model and TensorRT version that built it, for the options it was built
with. :class:`EngineKey` holds all of that (ONNX sha256, TensorRT version, GPU name and compute capability,
precision, DLA core, batch profile, workspace and kept layers); its hash is in the engine's file name::

    <cache>/<model>-<precision>[-dla<N>]-<key hash>.engine
    <cache>/<model>-<precision>[-dla<N>]-<key hash>.engine.json    the key fields, engine sha256, how it was built

:func:`load_or_build` returns the engine for this device, building it when it is missing, when its sidecar
records another key (say another TensorRT: the message names what differs) or when the file doesn't match its
recorded sha256. With ``no_build=True`` it refuses instead. The device facts come in as a
:class:`~edge_tl.device.engine.spec.DeviceInfo` (detected when not given), and the build function is a parameter, so
the logic runs without a GPU. Writes are atomic and builds of the same key are serialised with a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_tl import __version__
from edge_tl.core.bundle import utc_now
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_write_text, sha256_file
from edge_tl.device.engine.spec import BatchProfile, BuildSpec, DeviceInfo, check_device_supports

log = logging.getLogger("edge_tl.device.engine")

DEFAULT_CACHE_DIR = Path("~/.cache/edge-tl/engines")
#: 2: the module (board/SKU) joined the key (issue 22, D9); a schema-1 entry never matches a schema-2 key
KEY_SCHEMA = 2
BuildFn = Callable[[BuildSpec, Path, Path], "dict[str, Any] | None"]

_FIELD_NAMES = {
    "onnx_sha256": "ONNX model", "tensorrt_version": "TensorRT", "gpu_name": "GPU", "module": "module",
    "compute_capability": "compute capability", "precision": "precision", "dla_core": "DLA core",
    "batch_profile": "batch profile", "workspace_mb": "workspace (MiB)", "keep_layers": "kept layers",
    "keep_precision": "kept-layer precision", "schema": "key schema",
}


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    dla_core: int | None
    batch_profile: str
    workspace_mb: int | None = None
    module: str | None = None
    keep_layers: tuple[str, ...] = ()
    keep_precision: str = "fp32"
    schema: int = KEY_SCHEMA

    @classmethod
    def for_build(cls, spec: BuildSpec, device: DeviceInfo, onnx_sha256: str | None = None) -> EngineKey:
        return cls(onnx_sha256=onnx_sha256 or sha256_file(spec.onnx), tensorrt_version=device.tensorrt_version,
                   gpu_name=device.gpu_name, compute_capability=device.compute_capability,
                   precision=spec.precision, dla_core=spec.dla_core, batch_profile=spec.profile.label(),
                   workspace_mb=spec.workspace_mb, keep_layers=tuple(spec.keep_layers), module=device.module,
                   keep_precision=spec.keep_precision if spec.keep_layers else "fp32")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["keep_layers"] = list(self.keep_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineKey:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["keep_layers"] = tuple(known.get("keep_layers", ()))
        return cls(**known)

    def digest(self) -> str:
        """A stable hash of every field (sorted-key JSON), 16 hex digits."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def differences(self, other: EngineKey) -> list[str]:
        """What differs, in words: ``TensorRT 8.5.2 (engine) != 10.3.0 (here)``."""
        out = []
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                if name == "onnx_sha256":
                    mine, theirs = str(mine)[:12], str(theirs)[:12]
                out.append(f"{_FIELD_NAMES.get(name, name)} {theirs} (engine) != {mine} (here)")
        return out

    def same_model(self, other: EngineKey) -> bool:
        return self.onnx_sha256 == other.onnx_sha256 and self.precision == other.precision


def engine_filename(stem: str, key: EngineKey) -> str:
    dla = f"-dla{key.dla_core}" if key.dla_core is not None else ""
    return f"{stem}-{key.precision}{dla}-{key.digest()}.engine"


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def read_sidecar(engine: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(sidecar_path(engine).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("key"), dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def stale_reason(engine: Path, key: EngineKey) -> str | None:
    """Why ``engine`` can't be used for ``key`` (None when it can): missing, no sidecar, other key, bad hash."""
    if not engine.is_file():
        return f"{engine.name} does not exist"
    side = read_sidecar(engine)
    if side is None:
        return f"{engine.name} has no readable sidecar {sidecar_path(engine).name}, so what it was built for is unknown"
    try:
        recorded = EngineKey.from_dict(side["key"])
    except TypeError:
        return f"{sidecar_path(engine).name} does not hold an engine key"
    diffs = key.differences(recorded)
    if diffs:
        return f"{engine.name} was built for another setup: {'; '.join(diffs)}"
    if side.get("engine_sha256") != sha256_file(engine):
        return f"{engine.name} does not match the sha256 its sidecar records (truncated or replaced?)"
    return None


def device_mismatch(engine: Path, device: DeviceInfo) -> str | None:
    """Why ``engine`` (by its sidecar) was not built on a device like this one; None when it was, or when no
    sidecar says (then TensorRT itself refuses a foreign engine when it loads it)."""
    side = read_sidecar(engine)
    if side is None:
        return None
    recorded = side["key"]
    here = {"tensorrt_version": device.tensorrt_version, "gpu_name": device.gpu_name,
            "compute_capability": device.compute_capability, "module": device.module}
    diffs = [f"{_FIELD_NAMES[k]} {recorded.get(k)} (engine) != {v} (here)" for k, v in here.items()
             if recorded.get(k) != v]
    return f"{engine.name} was built for another device: {'; '.join(diffs)}" if diffs else None


def find_other_builds(cache_dir: Path, key: EngineKey) -> list[tuple[Path, EngineKey]]:
    """Engines in ``cache_dir`` for the same model and precision but another key (another device or TensorRT)."""
    found = []
    for side in sorted(cache_dir.glob("*.engine.json")):
        try:
            other = EngineKey.from_dict(json.loads(side.read_text())["key"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if other.same_model(key) and other != key:
            found.append((side.with_name(side.name[: -len(".json")]), other))
    return found


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def default_build_fn(via: str, **kwargs: Any) -> BuildFn:
    if via == "api":
        from edge_tl.device.engine.build import build_engine_file

        return build_engine_file
    if via == "trtexec":
        from functools import partial

        from edge_tl.device.engine.trtexec import build_with_trtexec

        return partial(build_with_trtexec, **kwargs)
    raise EdgeTLError(f"unknown build path '{via}'", "choose --via api or --via trtexec")


def load_or_build(onnx_path: str | Path, precision: str, cache_dir: str | Path | None = None, *,
                  no_build: bool = False, dla_core: int | None = None, max_batch: int = 32,
                  opt_batch: int | None = None, workspace_mb: int | None = None,
                  fallback_layers: tuple[str, ...] | list[str] = (), fallback_precision: str = "fp32",
                  engine_path: str | Path | None = None, device: DeviceInfo | None = None,
                  build_fn: BuildFn | None = None, via: str = "api", trtexec: str | Path | None = None,
                  notify: Callable[[str], None] | None = None) -> Path:
    """The engine file for ``onnx_path`` on this device: from the cache, or built (atomically) and cached.

    ``engine_path`` checks/builds that exact file instead of a cache entry. ``device`` defaults to what
    :func:`edge_tl.device.engine.build.detect_device` reads; ``build_fn(spec, tmp_out, final)`` defaults to the
    TensorRT API (``via='api'``) or trtexec (``via='trtexec'``). ``notify`` receives the one-line reasons for a
    rebuild (default: the ``edge_tl.device.engine`` logger).
    """
    say = notify or log.warning
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EdgeTLError(f"model {onnx_path} does not exist", "give an existing .onnx file or a bundle")
    cache = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR.expanduser()
    detected = device is None
    if device is None:  # the key's facts only: no trt.Builder on a cache hit
        from edge_tl.device.engine.build import detect_device

        device = detect_device(via=via, trtexec=trtexec, builder=False)
    timing = cache / f"timing-trt{device.tensorrt_version}-cc{device.compute_capability}.cache"
    # DLA runs static shapes only (TensorRT's "DLA Supported Layers and Restrictions": min = opt = max), so a DLA
    # engine takes exactly max_batch images; parity and bench feed it that batch.
    profile = (BatchProfile(max_batch, max_batch, max_batch) if dla_core is not None
               else BatchProfile.for_max_batch(max_batch, opt_batch))
    spec = BuildSpec(onnx=onnx_path, precision=precision, profile=profile,
                     dla_core=dla_core, workspace_mb=workspace_mb, keep_layers=tuple(fallback_layers),
                     keep_precision=fallback_precision, timing_cache=timing)
    key = EngineKey.for_build(spec, device)
    stem = onnx_path.name.removesuffix(".onnx").replace(".", "-")
    target = Path(engine_path) if engine_path else cache / engine_filename(stem, key)
    reason = stale_reason(target, key)
    if reason is None:
        return target
    others = find_other_builds(cache, key) if not target.exists() and engine_path is None else []
    if others:
        path, other = others[0]
        reason = f"{reason}; {path.name} is for another setup: {'; '.join(key.differences(other))}"
    if no_build:
        raise EdgeTLError(f"no usable engine for {onnx_path.name} ({precision}) on {device.describe()}: {reason}",
                          "build it: edge-tl engine build (without --no-build)")
    if detected and via == "api":  # building: now ask the builder what it supports (fast FP16/INT8, DLA cores)
        from edge_tl.device.engine.build import detect_device

        full = detect_device(via=via, trtexec=trtexec)
        if EngineKey.for_build(spec, full, key.onnx_sha256) == key:
            device = full
    check_device_supports(spec, device)
    if dla_core is not None:
        say(f"DLA engine: static batch {max_batch} (DLA has no dynamic shapes); it takes exactly {max_batch} images "
            "per inference")
    if target.exists() or others:
        say(f"rebuilding the engine: {reason}")
    build = build_fn or default_build_fn(via, trtexec=trtexec)
    with _locked(target.with_name(f".{target.name}.lock")):
        if stale_reason(target, key) is None:  # another process built it while we waited
            return target
        tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
        started = time.perf_counter()
        try:
            info = build(spec, tmp, target) or {}
            if not tmp.is_file():
                raise EdgeTLError(f"the build wrote no engine for {onnx_path.name}", "see the build log above")
            digest = sha256_file(tmp)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        sidecar = {"key": key.to_dict(), "key_digest": key.digest(), "engine_sha256": digest,
                   "bytes": target.stat().st_size, "built": utc_now(),
                   "build_seconds": round(time.perf_counter() - started, 3), "onnx": str(onnx_path),
                   "device": device.to_dict(), "edge_tl_version": __version__, "flags": spec.flags(), **info}
        atomic_write_text(sidecar_path(target), json.dumps(sidecar, indent=2, default=str) + "\n")
    return target


def engine_dla_core(engine: Path) -> int | None:
    """The DLA core an engine was built for, from its sidecar (None: a GPU engine, or no sidecar)."""
    side = read_sidecar(Path(engine)) or {}
    core = side.get("key", {}).get("dla_core")
    return int(core) if core is not None else None


def engine_loader(engine: str | Path):
    """A loader that deserializes ``engine`` when called, with ``Runtime.DLA_core`` set for a DLA engine."""
    from edge_tl.device.runtime.tensorrt import EngineFromPath

    return EngineFromPath(engine, dla_core=engine_dla_core(Path(engine)))


class EngineCache:
    """An engine source for TensorRT runners (``edge_tl.device.runtime.tensorrt.EngineSource``): for an ONNX model, a
    loader that finds (or builds, unless ``build=False``) its engine in ``cache_dir`` when the runner activates,
    then deserializes it (DLA core from the sidecar). ``kwargs`` go to :func:`load_or_build`."""

    def __init__(self, cache_dir: str | Path | None = None, *, build: bool = True, **kwargs: Any):
        self.cache_dir = cache_dir
        self.build = build
        self.kwargs = kwargs

    def __call__(self, onnx_path: Path, precision: str, max_batch: int) -> _CachedEngine:
        return _CachedEngine(self, Path(onnx_path), precision, max_batch)


class _CachedEngine:
    def __init__(self, cache: EngineCache, onnx_path: Path, precision: str, max_batch: int):
        self.cache, self.onnx_path, self.precision, self.max_batch = cache, onnx_path, precision, max_batch
        self.path: Path | None = None
        self.dla_core: int | None = None
        self._loader = None

    def __call__(self):
        c = self.cache
        self.path = load_or_build(self.onnx_path, self.precision, c.cache_dir, no_build=not c.build,
                                  max_batch=self.max_batch, **c.kwargs)
        self._loader = engine_loader(self.path)  # keeps the TensorRT runtime alive with the engine
        self.dla_core = self._loader.dla_core
        return self._loader()
