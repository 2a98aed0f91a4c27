"""Engine build and parity gate for a version being installed, through this device's own `edge-tl` (device side).

The contract (``edge_tl/cli/engine.py``): ``edge-tl engine build BUNDLE --precision P --cache-dir DIR`` prints the
engine path last (exit 0), exit 2 when TensorRT is missing; ``edge-tl engine check BUNDLE --backend B --precision P
--json OUT`` exits 0 pass, 3 fail, 2 on an error, and always writes OUT.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_tl.core.errors import CheckFailed, EdgeTLError

ORT_BACKENDS = ("ort-trt", "ort-cuda", "ort-cpu")


def edge_tl_command() -> list[str]:
    """This interpreter's edge-tl (the venv's script beside python, else the module through python)."""
    script = Path(sys.executable).with_name("edge-tl")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from edge_tl.cli import main; sys.argv[0] = 'edge-tl'; main()"]


@dataclass
class GatePlan:
    backend: str  # what the parity gate runs on
    precision: str
    build_engine: bool
    build_via: str = "api"
    notes: list[str] = field(default_factory=list)


def plan_gate(backend: str, precision: str, build_via: str, available: list[str]) -> GatePlan:
    """Decide where the gate runs. TensorRT when installed (or asked for); otherwise ONNX Runtime, said loudly.
    A precision only TensorRT has (fp16) is refused rather than silently gated in another precision."""
    if backend == "auto":
        if "tensorrt" in available:
            return GatePlan("tensorrt", precision, True, build_via)
        ort = next((b for b in ORT_BACKENDS if b in available), None)
        if ort is None:
            raise EdgeTLError("neither TensorRT nor ONNX Runtime is installed on the device, so the parity gate "
                              "cannot run", "install them with deploy/bootstrap.sh")
        backend = ort
        note = f"TensorRT's Python bindings are not installed on this device: the parity gate ran on {ort}"
        plan = GatePlan(ort, precision, build_via == "trtexec", build_via, [note])
    elif backend == "tensorrt":
        if "tensorrt" not in available:
            raise EdgeTLError("--backend tensorrt was asked for, but TensorRT's Python bindings (with pycuda or "
                              "cuda-python) are not installed on the device",
                              "install them (deploy/bootstrap.sh) or deploy with --backend auto")
        return GatePlan("tensorrt", precision, True, build_via)
    else:
        if backend not in available:
            raise EdgeTLError(f"backend {backend} is not available on the device (it has: {', '.join(available)})",
                              "choose one it has, or --backend auto")
        plan = GatePlan(backend, precision, build_via == "trtexec", build_via)
    if precision in ("fp16", "best") and plan.backend != "tensorrt":
        raise EdgeTLError(f"--precision {precision} needs TensorRT, but the gate would run on {plan.backend}",
                          "deploy with --precision int8 or fp32, or install TensorRT on the device")
    return plan


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    # stderr passes through (progress, tables: the workstation sees them live); stdout is the result
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)


def build_engine(bundle_dir: Path, engine_dir: Path, plan: GatePlan) -> dict[str, Any]:
    """Build (or find) the engine into ``engine_dir``; returns {"path", "key_digest", "key", "via"}."""
    cmd = [*edge_tl_command(), "engine", "build", str(bundle_dir), "--precision", plan.precision,
           "--cache-dir", str(engine_dir)]
    if plan.build_via == "trtexec":
        cmd += ["--via", "trtexec"]
    proc = _run(cmd)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise EdgeTLError(f"the engine build on the device failed (exit {proc.returncode})",
                          "see the messages above; the active model is untouched")
    engine = Path(lines[-1].strip())
    info: dict[str, Any] = {"path": str(engine), "via": plan.build_via, "key_digest": None, "key": None}
    try:
        side = json.loads(engine.with_name(engine.name + ".json").read_text())
        info["key_digest"], info["key"] = side.get("key_digest"), side.get("key")
    except (OSError, ValueError):
        pass
    return info


def run_gate(bundle_dir: Path, engine_dir: Path, parity_json: Path, plan: GatePlan) -> dict[str, Any]:
    """Run the parity gate; returns its report (as written to ``parity_json``); raises CheckFailed on a fail."""
    cmd = [*edge_tl_command(), "engine", "check", str(bundle_dir), "--backend", plan.backend,
           "--precision", plan.precision, "--json", str(parity_json)]
    if plan.backend == "tensorrt":
        cmd += ["--cache-dir", str(engine_dir)] + (["--no-build"] if plan.build_engine else [])
    proc = _run(cmd)
    try:
        report = json.loads(parity_json.read_text())
    except (OSError, ValueError):
        report = {}
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 0:
        report["summary"] = summary or "passed"
        return report
    why = "; ".join(report.get("failures") or []) or report.get("error") or f"exit {proc.returncode}"
    if proc.returncode == 3:
        raise CheckFailed(f"the parity gate failed on the device ({plan.precision} on {plan.backend}: {why})",
                          "nothing was switched; fix the bundle's INT8 model (edge-tl engine sensitivity) or "
                          "deploy --precision fp32")
    raise EdgeTLError(f"the parity gate could not run on the device ({why})", "nothing was switched; see above")


def parity_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few parity facts a deploy record keeps."""
    outputs = report.get("outputs") or {}
    first = next(iter(outputs.values()), {}) if isinstance(outputs, dict) else {}
    return {"passed": report.get("passed"), "backend": report.get("backend"), "precision": report.get("precision"),
            "top1_agreement": first.get("top1_agreement"), "cosine_min": first.get("cosine_min"),
            "max_rel_diff": first.get("max_rel_diff"), "golden": first.get("count"),
            "summary": report.get("summary")}
