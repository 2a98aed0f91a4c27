"""``edge-tl bench MODEL --layer-profile TABLE.json``: TensorRT's per-layer times as a latency table.

trtexec builds the ONNX model and runs it twice: a timed run without the profiler, then (``--separateProfileRun``)
a profiled run whose per-layer times ``--exportProfile`` writes as JSON (TensorRT ``samples/common/
sampleReporting.cpp``, ``exportJSONProfile``): a list whose first element is ``{"count": N}`` (profiled
inferences) followed by one object per engine layer, ``{"name", "timeMs", "averageMs", "medianMs",
"percentage"}`` (``medianMs`` since TensorRT 8.x; older files carry only ``averageMs``). Layer names are the
ONNX node names, fused layers joined by `` + `` (``--profilingVerbosity=detailed`` keeps them). The result is
written in edge-tl's table format (:mod:`edge_tl.core.latency_table`, docs/latency-table.md) with the model's
architecture hash, the TensorRT version from trtexec's banner, the device and the precision.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import sha256_file
from edge_tl.core.latency_table import LatencyTable, LayerTime, ModelIdentity, arch_fingerprint, write_table

PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8"], "best": ["--best"]}


def parse_export_profile(text: str, source: str = "profile") -> tuple[int, list[LayerTime], str]:
    """(profiled inferences, layers, statistic) of trtexec's ``--exportProfile`` JSON."""
    fix = "pass the file trtexec wrote with --exportProfile (after an inference run, not --buildOnly)"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EdgeTLError(f"{source} is not trtexec profile JSON ({exc})", fix) from None
    if not isinstance(doc, list) or not doc or not isinstance(doc[0], dict) or "count" not in doc[0]:
        raise EdgeTLError(f"{source} is not a trtexec profile (no leading {{\"count\": N}})", fix)
    rows = [r for r in doc[1:] if isinstance(r, dict) and "name" in r]
    if not rows:
        raise EdgeTLError(f"{source} lists no layers", fix)
    statistic = "median" if all("medianMs" in r for r in rows) else "average"
    key = "medianMs" if statistic == "median" else "averageMs"
    try:
        layers = [LayerTime(name=str(r["name"]), ms=float(r[key])) for r in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgeTLError(f"{source}: a layer lacks a usable {key} ({exc})", fix) from None
    return int(doc[0]["count"]), layers, statistic


def profile_command(trtexec: str | Path, onnx: Path, engine: Path, profile: Path, precision: str,
                    iterations: int = 200) -> list[str]:
    """trtexec argv for a batch-1 per-layer profile of ``onnx``."""
    from edge_tl.device.engine.spec import onnx_input

    name, dims = onnx_input(onnx)
    if len(dims) < 2 or any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
        raise EdgeTLError(f"{onnx.name} input '{name}' has shape {list(dims)}; only the batch axis may be dynamic",
                          "export with fixed C, H, W")
    shape = "x".join(str(int(d)) for d in (1, *dims[1:]))
    return [str(trtexec), f"--onnx={onnx}", f"--saveEngine={engine}", *PRECISION_FLAGS[precision],
            f"--minShapes={name}:{shape}", f"--optShapes={name}:{shape}", f"--maxShapes={name}:{shape}",
            f"--shapes={name}:{shape}", f"--iterations={iterations}", "--profilingVerbosity=detailed",
            "--separateProfileRun", f"--exportProfile={profile}"]


def layer_profile(onnx: str | Path, out: str | Path, *, precision: str = "fp16", trtexec: str | Path | None = None,
                  root: str | Path = "/", iterations: int = 200, timeout: float | None = 1800) -> LatencyTable:
    """Profile ``onnx`` with trtexec and write the latency table to ``out`` (atomically)."""
    from edge_tl.device.engine.trtexec import _errors, find_trtexec, run_trtexec, trtexec_version
    from edge_tl.device.facts.board import jetson_model

    onnx = Path(onnx)
    if onnx.suffix != ".onnx" or not onnx.is_file():
        raise EdgeTLError(f"--layer-profile needs an ONNX model (got {onnx})",
                          "pass the bundle (its model.onnx is profiled) or an .onnx file")
    if precision not in PRECISION_FLAGS:
        raise EdgeTLError(f"precision '{precision}' has no per-layer profile",
                          f"use one of {', '.join(PRECISION_FLAGS)}")
    exe = find_trtexec(trtexec, otherwise="(the per-layer profile is trtexec's --exportProfile)")
    with tempfile.TemporaryDirectory(prefix="edge-tl-profile-") as tmp:
        engine, prof = Path(tmp) / "model.engine", Path(tmp) / "profile.json"
        argv = profile_command(exe, onnx, engine, prof, precision, iterations)
        rc, text = run_trtexec(argv, Path(tmp) / "trtexec.log", timeout=timeout)
        if rc != 0 or not prof.is_file():
            raise EdgeTLError(f"trtexec --exportProfile failed (exit code {rc}): {_errors(text)}",
                              "check the model builds: edge-tl engine build MODEL")
        count, layers, statistic = parse_export_profile(prof.read_text(), "trtexec's profile")
    version = trtexec_version(text)
    if version is None:
        raise EdgeTLError("trtexec printed no TensorRT version banner", "run NVIDIA's trtexec (JetPack's)")
    from edge_tl.device.engine.spec import onnx_input

    _, dims = onnx_input(onnx)
    table = LatencyTable(
        model=ModelIdentity(arch_sha256=arch_fingerprint(onnx), onnx_sha256=sha256_file(onnx), name=onnx.stem,
                            input_shape=[1, *(int(d) for d in dims[1:])]),
        backend="tensorrt", tensorrt=version, device=jetson_model(root) or "unknown device", precision=precision,
        statistic=statistic, iterations=count, command=[str(a) for a in argv],
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), layers=layers)
    write_table(table, out)
    return table


def summary(table: LatencyTable) -> dict[str, Any]:
    return {"layers": len(table.layers), "total_ms": round(table.total_ms(), 4), "tensorrt": table.tensorrt,
            "precision": table.precision, "statistic": table.statistic, "iterations": table.iterations}
