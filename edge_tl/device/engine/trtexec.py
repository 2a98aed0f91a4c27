"""Building and timing engines with NVIDIA's ``trtexec``, and reading its performance summary.

:func:`trtexec_command` gives the exact argv for a :class:`~edge_tl.device.engine.spec.BuildSpec` (the CLI shows it
and the log file starts with it); :func:`run_trtexec` runs it and saves the whole output beside the engine;
:func:`parse_trtexec` reads the performance summary.

``parse_trtexec(text) -> dict`` (public; also ``edge_tl.device.engine.parse_trtexec``) understands:

- TensorRT 8.x and 10.x: a ``=== Performance summary ===`` block of ``Label: min = X ms, max = X ms, mean = X ms,
  median = X ms, percentile(P%) = X ms`` lines. 8.0-8.5 print one percentile (99%), 8.6 and 10.x print 90/95/99;
  some builds add ``End-to-End Host Latency``.
- TensorRT 7.x: ``Host Latency`` / ``Enqueue Time`` / ``GPU Compute`` headings followed by ``min: X ms (end to end
  X ms)``, ``percentile: X ms at 99%`` … lines, ``throughput: X qps`` and ``walltime: X s``.

It returns ``throughput_qps`` (float; ``None`` only when no throughput line was printed) and, for each timing
line found, a dict of milliseconds keyed by what was printed among ``min, max, mean, median, p90, p95, p99``
(another ``--percentile`` gives e.g. ``p99.9``): ``latency_ms`` (H2D + GPU compute + D2H), ``gpu_compute_ms``,
``h2d_ms``, ``d2h_ms``, ``enqueue_ms`` (host time to enqueue) and ``end_to_end_ms`` (End-to-End Host Latency).
``total_host_walltime_s`` and ``total_gpu_compute_s`` are added when printed. Timestamps and ``[I]`` prefixes
are ignored; when a log holds several summaries the last one wins. Text without a summary raises
:class:`~edge_tl.core.errors.EdgeTLError`.

Flags used (TensorRT 8.5 and 10.x trtexec): ``--memPoolSize=workspace:N`` (MiB), ``--minShapes/--optShapes/
--maxShapes`` and ``--shapes`` (the inference shape, = opt), ``--timingCacheFile``, ``--useDLACore`` with
``--allowGPUFallback``, ``--precisionConstraints=obey --layerPrecisions --layerOutputTypes`` for kept layers.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_tl.core.errors import EdgeTLError
from edge_tl.device.engine.spec import BuildSpec, onnx_input

log = logging.getLogger("edge_tl.device.engine")

#: JetPack installs trtexec here, not on PATH.
JETPACK_TRTEXEC = Path("/usr/src/tensorrt/bin/trtexec")

_LABELS = {
    "latency": "latency_ms",
    "end-to-end host latency": "end_to_end_ms",
    "enqueue time": "enqueue_ms",
    "h2d latency": "h2d_ms",
    "gpu compute time": "gpu_compute_ms",
    "d2h latency": "d2h_ms",
}
_TRT7_SECTIONS = {"host latency": "latency_ms", "enqueue time": "enqueue_ms", "gpu compute": "gpu_compute_ms"}
_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf|nan)"
_PREFIX = re.compile(r"^(?:\s*\[[^\]]*\])*\s*")
_STAT = re.compile(rf"\b(min|max|mean|median|percentile\(\s*([\d.]+)\s*%\s*\))\s*=?\s*{_NUM}\s*ms", re.I)
_TRT7_STAT = re.compile(rf"^(min|max|mean|median|percentile):\s*{_NUM}\s*ms(?:\s*at\s*([\d.]+)%)?"
                        rf"(?:\s*\(end to end\s*{_NUM}\s*ms(?:\s*at\s*[\d.]+%)?\))?", re.I)


def _stat_key(name: str, pct: str | None) -> str:
    if pct is not None:
        return f"p{float(pct):g}"
    return name.lower()


def _clean_lines(text: str) -> list[str]:
    return [_PREFIX.sub("", line).strip() for line in text.splitlines()]


def parse_trtexec(text: str) -> dict[str, Any]:
    """Parse trtexec's performance summary (TensorRT 7.x, 8.x, 10.x); see the module docstring for the keys."""
    if not isinstance(text, str):
        raise EdgeTLError("parse_trtexec takes the log's text", "read the file first: Path(log).read_text()")
    lines = _clean_lines(text)
    starts = [i for i, line in enumerate(lines) if line.startswith("=== Performance summary ===")]
    if starts:
        lines = lines[starts[-1] + 1:]
    result: dict[str, Any] = {"throughput_qps": None}
    section: str | None = None
    found = False
    for line in lines:
        if not line:
            continue
        low = line.lower()
        if low.startswith("=== ") and starts:
            break  # the next block (e.g. the verbose explanations) ends the summary
        label, sep, rest = line.partition(":")
        key = _LABELS.get(label.strip().lower()) if sep else None
        if key and "min" in rest:  # TensorRT 8.x / 10.x timing line
            stats = {_stat_key(m.group(1).split("(")[0], m.group(2)): float(m.group(3)) for m in _STAT.finditer(rest)}
            if stats:
                result[key] = stats
                found = True
            continue
        m = re.match(rf"^throughput:\s*{_NUM}\s*qps", line, re.I)
        if m:
            result["throughput_qps"] = float(m.group(1))
            found = True
            continue
        m = re.match(rf"^(total host walltime|walltime|total gpu compute time|total compute time):\s*{_NUM}\s*s\b",
                     line, re.I)
        if m:
            name = "total_host_walltime_s" if "walltime" in m.group(1).lower() else "total_gpu_compute_s"
            result[name] = float(m.group(2))
            continue
        if low in _TRT7_SECTIONS:  # TensorRT 7.x heading
            section = _TRT7_SECTIONS[low]
            continue
        m = _TRT7_STAT.match(line)
        if m and section:
            stat = _stat_key(m.group(1), m.group(3)) if m.group(1).lower() == "percentile" else m.group(1).lower()
            result.setdefault(section, {})[stat] = float(m.group(2))
            if m.group(4) is not None and section == "latency_ms":
                result.setdefault("end_to_end_ms", {})[stat] = float(m.group(4))
            found = True
    if not found:
        failed = [ln for ln in _clean_lines(text) if ln.startswith("&&&& FAILED")]
        why = f" (trtexec reported: {failed[-1][:160]})" if failed else ""
        raise EdgeTLError(f"no trtexec performance summary in this text{why}",
                          "pass the full output of a trtexec run that ran inference (not --skipInference/--buildOnly)")
    return result


def trtexec_version(text: str) -> str | None:
    """TensorRT version from trtexec's banner ``&&&& RUNNING TensorRT.trtexec [TensorRT v8502]`` (-> '8.5.2';
    ``v100300`` -> '10.3.0'), or from a ``TensorRT version: 8.6.3`` line; None if neither is there."""
    m = re.search(r"TensorRT version:\s*(\d+\.\d+(?:\.\d+)*)", text)
    if m:
        return m.group(1)
    m = re.search(r"\[TensorRT v(\d+)\]", text)
    if not m:
        return None
    n = int(m.group(1))
    major, rest = (n // 10000, n % 10000) if n >= 100000 else (n // 1000, n % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def find_trtexec(path: str | Path | None = None, *, otherwise: str = "or use --via api") -> Path:
    """The trtexec to run: ``path``, else ``$EDGE_TL_TRTEXEC``, else PATH, else JetPack's /usr/src/tensorrt/bin.
    ``otherwise``: the way round it that the calling command has (engine build: ``--via api``; none for
    ``bench --layer-profile``, which only trtexec can do)."""
    candidates = [path, os.environ.get("EDGE_TL_TRTEXEC"), shutil.which("trtexec"), JETPACK_TRTEXEC]
    for cand in candidates:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    raise EdgeTLError("trtexec was not found (not on PATH, not in /usr/src/tensorrt/bin)",
                      " ".join(("install TensorRT's samples (sudo apt install tensorrt), or give its path with "
                                "--trtexec", otherwise)).strip())


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def trtexec_command(spec: BuildSpec, engine_out: str | Path, *, trtexec: str | Path = "trtexec",
                    input_name: str | None = None, input_chw: Sequence[int] | None = None,
                    extra: Sequence[str] = ()) -> list[str]:
    """The exact trtexec argv that builds ``spec`` into ``engine_out`` (and then times it at the opt batch).

    ``input_name`` / ``input_chw`` default to what the ONNX model declares (batch axis dynamic).
    """
    static = False
    if Path(spec.onnx).is_file():
        _, declared = onnx_input(spec.onnx)
        # trtexec refuses shape flags for a model without dynamic inputs: "Static model does not take explicit
        # shapes since the shape of inference tensors will be determined by the model itself" (NVIDIA/TensorRT
        # samples/common/sampleEngines.cpp, setupNetworkAndConfig) -- issue 22, D6
        static = all(isinstance(d, int) and d > 0 for d in declared)
    if input_name is None or input_chw is None:
        name, dims = onnx_input(spec.onnx)
        input_name = input_name or name
        if input_chw is None:
            if len(dims) < 2 or any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
                raise EdgeTLError(f"{spec.onnx.name} input '{name}' has shape {list(dims)}; only the batch axis "
                                  "may be dynamic", "export with fixed C, H, W")
            input_chw = tuple(int(d) for d in dims[1:])
    flags = spec.flags()
    argv = [str(trtexec), f"--onnx={spec.onnx}", f"--saveEngine={engine_out}"]
    if "fp16" in flags:
        argv.append("--fp16")
    if "int8" in flags:
        argv.append("--int8")
    if "no_tf32" in flags:
        argv.append("--noTF32")
    if spec.dla_core is not None:
        argv += [f"--useDLACore={spec.dla_core}", "--allowGPUFallback"]
    if spec.workspace_mb is not None:
        argv.append(f"--memPoolSize=workspace:{spec.workspace_mb}")
    if not static:  # a static model's one shape is its own
        lo, opt, hi = spec.profile.shapes(tuple(input_chw))
        argv += [f"--minShapes={input_name}:{_dims(lo)}", f"--optShapes={input_name}:{_dims(opt)}",
                 f"--maxShapes={input_name}:{_dims(hi)}", f"--shapes={input_name}:{_dims(opt)}"]
    if spec.timing_cache is not None:
        argv.append(f"--timingCacheFile={spec.timing_cache}")
    if spec.keep_layers:
        types = ",".join(f"{name}:{spec.keep_precision}" for name in spec.keep_layers)
        argv += ["--precisionConstraints=obey", f"--layerPrecisions={types}", f"--layerOutputTypes={types}"]
    argv += list(extra)
    return argv


def run_trtexec(argv: Sequence[str], log_path: str | Path, *, timeout: float | None = None,
                echo: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run trtexec, saving its whole output (stdout and stderr, first line: the command) to ``log_path``."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command_line = shlex.join(str(a) for a in argv)
    if echo:
        echo(command_line)
    try:
        proc = subprocess.run(list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise EdgeTLError(f"could not run {argv[0]} ({exc.strerror})", "check the trtexec path (--trtexec)") from exc
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        log_path.write_text(f"# {command_line}\n{out}\n# timed out after {timeout} s\n")
        raise EdgeTLError(f"trtexec ran longer than {timeout} s (log: {log_path})", "raise the timeout") from exc
    log_path.write_text(f"# {command_line}\n{proc.stdout}")
    return proc.returncode, proc.stdout


def _errors(text: str, limit: int = 3) -> str:
    errs = [ln for ln in _clean_lines(text) if ln.startswith(("Error", "ERROR")) or "[E]" in ln]
    raw = [ln.strip() for ln in text.splitlines() if "[E]" in ln]
    picked = (raw or errs)[-limit:]
    return " | ".join(picked) if picked else "no error lines printed"


def parse_layer_placement(text: str) -> dict[str, Any]:
    """Where TensorRT's builder put the layers, from its INFO lines ``[DlaLayer] ...`` / ``[GpuLayer] ...`` (under
    "---------- Layers Running on DLA/GPU ----------"). DLA entries are fused subgraphs (``{ForeignNode[...]}``)."""
    dla = [ln.split("[DlaLayer]", 1)[1].strip() for ln in text.splitlines() if "[DlaLayer]" in ln]
    gpu = [ln.split("[GpuLayer]", 1)[1].strip() for ln in text.splitlines() if "[GpuLayer]" in ln]
    return {"dla_nodes": len(dla), "gpu_layers": len(gpu), "dla_node_names": dla[:50], "gpu_layer_names": gpu[:50],
            "reported": "Layers Running on DLA" in text}


def build_with_trtexec(spec: BuildSpec, out: Path, final: Path | None = None, *, trtexec: str | Path | None = None,
                       timeout: float | None = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build ``spec`` into ``out`` with trtexec; the log goes beside ``final`` (default ``out``) as
    ``<engine>.trtexec.log``. Returns what the cache's sidecar records: the argv, the log path and the parsed
    performance summary (None when trtexec printed none)."""
    exe = find_trtexec(trtexec)
    argv = trtexec_command(spec, out, trtexec=exe)
    log_path = Path(final or out).with_suffix(".trtexec.log")
    rc, text = run_trtexec(argv, log_path, timeout=timeout, echo=echo)
    if rc != 0 or not Path(out).is_file():
        raise EdgeTLError(f"trtexec failed with exit code {rc}: {_errors(text)} (full log: {log_path})",
                          "read the log; an unsupported op or opset needs another export, --dla needs a DLA device")
    try:
        perf = parse_trtexec(text)
    except EdgeTLError:
        perf = None
    info = {"via": "trtexec", "command": [str(a) for a in argv], "log": str(log_path), "performance": perf,
            "tensorrt_version": trtexec_version(text)}
    if spec.dla_core is not None:
        placement = {"dla_core": spec.dla_core, **parse_layer_placement(text)}
        info["dla"] = placement
        if placement["reported"] and placement["dla_nodes"] == 0:
            raise EdgeTLError(f"--dla {spec.dla_core}: trtexec put no layer of {spec.onnx.name} on the DLA; the engine "
                              f"would run entirely on the GPU (log: {log_path})",
                              "drop --dla (build for the GPU), or use int8/fp16 with DLA-supported layers")
        if placement["gpu_layers"]:
            log.warning("DLA core %s runs %d subgraph(s) of %s; %d layer(s) fall back to the GPU (log: %s)",
                        spec.dla_core, placement["dla_nodes"], spec.onnx.name, placement["gpu_layers"], log_path)
    return info
