"""`edge-tl doctor`: what this machine has, and whether a bundle can run here.

:func:`gather_facts` reads the machine (files under ``root``, ``nvpmodel -q`` and ``systemctl`` from PATH,
package metadata, and TensorRT's builder when installed); tests and ``--facts FILE`` substitute recorded facts
(``edge-tl doctor --json`` on a device writes them). :func:`evaluate` turns facts (and a bundle) into rows with
a status: ``ok``, ``info``, ``warn`` or ``blocker``. Blockers make the command exit 3 with the fix in words.
Nothing here imports torch: its presence is read from package metadata.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.importer import has_module
from edge_tl.core.targets import max_opset_for_tensorrt
from edge_tl.device.engine.build import detect_device
from edge_tl.device.engine.spec import DeviceInfo
from edge_tl.device.engine.trtexec import find_trtexec
from edge_tl.device.facts import DeviceFacts
from edge_tl.device.facts.versions import package_version as _version
from edge_tl.device.runtime import available_backends

Status = Literal["ok", "info", "warn", "blocker"]


class Facts(BaseModel):
    python: str
    machine: str
    packages: dict[str, str | None] = Field(default_factory=dict, description="name -> version, None: absent")
    ort_providers: list[str] = Field(default_factory=list)
    ort_error: str | None = Field(None, description="why ONNX Runtime is installed but unusable")
    device: dict[str, Any] | None = Field(None, description="DeviceInfo (TensorRT, GPU, CC, DLA cores)")
    device_error: str | None = None
    cuda: str | None = None
    jetson_model: str | None = None
    l4t: str | None = None
    jetpack: str | None = None
    jtop_service: str | None = None
    nvpmodel: str | None = None
    trtexec: str | None = None
    backends: list[str] = Field(default_factory=list)
    trusted_keys: list[str] | None = Field(None, description="key ids of the trusted signing keys (None: not read)")
    trust_dirs: list[str] = Field(default_factory=list)
    trust_error: str | None = Field(None, description="why the trusted keys could not be read")


class Row(BaseModel):
    item: str
    value: str
    status: Status = "ok"
    fix: str | None = None


def _run(argv: list[str], timeout: float = 10) -> str | None:
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (proc.stdout + proc.stderr).strip()


def _jtop_state(root: Path) -> str | None:
    state = (_run(["systemctl", "is-active", "jtop"]) or "").splitlines()
    if state and state[-1].strip() in ("active", "inactive", "failed", "activating", "deactivating"):
        return state[-1].strip()
    return "socket present" if (root / "run/jtop.sock").exists() else None


def gather_facts(root: str | Path = "/", *, device: DeviceInfo | None = None, probe_device: bool = True) -> Facts:
    """This machine's facts; ``device`` replaces what TensorRT's builder would say (recorded facts)."""
    root = Path(root)
    packages = {
        "torch": _version("torch", "torch"), "onnx": _version("onnx", "onnx"),
        "onnxruntime": _version("onnxruntime", "onnxruntime") or _version("onnxruntime-gpu", "onnxruntime"),
        "tensorrt": None, "pycuda": _version("pycuda", "pycuda"), "cuda-python": _version("cuda-python", "cuda"),
        "jetson-stats": _version("jetson-stats", "jtop"),
    }
    providers: list[str] = []
    ort_error = None
    if packages["onnxruntime"]:
        from edge_tl.device.runtime import onnxruntime_providers

        got, ort_error = onnxruntime_providers()
        providers = got or []
    device_error = None
    if has_module("tensorrt"):
        try:
            import tensorrt

            packages["tensorrt"] = str(tensorrt.__version__)
        except Exception as exc:  # a broken install is a fact worth showing
            device_error = f"tensorrt does not import: {exc}"
    if device is None and probe_device and packages["tensorrt"]:
        try:
            device = detect_device(root=root)
        except Exception as exc:  # no GPU, driver problems: report, don't crash the doctor
            device_error = f"{type(exc).__name__}: {exc}"
    if device is not None and not packages["tensorrt"]:
        packages["tensorrt"] = device.tensorrt_version
    try:
        trtexec = str(find_trtexec())
    except EdgeTLError:
        trtexec = None
    from edge_tl.core.signing import trust_dirs, trusted_keys

    try:
        keys, trust_error = sorted(trusted_keys()), None
    except EdgeTLError as exc:  # a file in the trust folder that is no key: every deploy fails on it
        keys, trust_error = None, exc.one_line()
    facts = DeviceFacts(root)
    l4t = facts.board.l4t()
    mode = facts.nvpmodel.query()
    return Facts(python=platform.python_version(), machine=platform.machine(), packages=packages,
                 ort_providers=providers, ort_error=ort_error, device=device.to_dict() if device else None,
                 device_error=device_error,
                 cuda=(device.cuda_version if device and device.cuda_version else None) or facts.versions.cuda(),
                 jetson_model=facts.board.model(), l4t=l4t, jetpack=facts.board.jetpack(l4t),
                 jtop_service=_jtop_state(root), nvpmodel=mode.label if mode else None,
                 trtexec=trtexec, backends=available_backends(), trusted_keys=keys,
                 trust_dirs=[str(d) for d in trust_dirs()], trust_error=trust_error)


def trust_row(f: Facts) -> Row | None:
    """The signing keys this machine trusts: without one, deploy and serve refuse every bundle."""
    where = ":".join(f.trust_dirs) or "/etc/edge-tl/trusted-keys"
    if f.trust_error:
        return Row(item="signing keys", value=f.trust_error, status="blocker",
                   fix=f"remove or replace the file that is not an edge-tl .pub in {where}")
    if f.trusted_keys is None:
        return None  # recorded facts from before the row existed
    if not f.trusted_keys:
        return Row(item="signing keys", value=f"none trusted ({where})", status="warn",
                   fix="deploy and serve refuse every bundle until one is: sudo edge-tl keys trust edge-tl.pub "
                       "(the workstation's), bootstrap.sh --trust-key, or deploy push --trust-key")
    return Row(item="signing keys", value=f"{len(f.trusted_keys)} trusted ({', '.join(f.trusted_keys)}) in {where}")


#: What runs on JetPack 5 (L4T R35): TensorRT 8.5's Python bindings exist only for the system Python 3.8
#: (python3-libnvinfer), and edge-tl needs Python >= 3.10, so nothing that imports ``tensorrt`` works there.
JETPACK5_WORKS = ("edge-tl doctor", "edge-tl engine build --via trtexec", "edge-tl deploy --build-via trtexec",
                  "edge-tl engine check/bench/infer/serve --backend ort-cpu (or ort-cuda with a JetPack 5 "
                  "onnxruntime-gpu wheel for this Python)")
JETPACK5_FAILS = ("--backend tensorrt (bench, infer, serve, engine check)", "edge-tl engine build --via api",
                  "edge-tl bench on an .engine file")


def jetpack5_row(f: Facts) -> Row | None:
    """On JetPack 5: exactly which commands work here and which don't (and why)."""
    if not (f.l4t or "").startswith("R35"):
        return None
    trtexec = f.trtexec or "/usr/src/tensorrt/bin/trtexec (not found: sudo apt install libnvinfer-bin)"
    bindings = ("importable here" if f.packages.get("tensorrt") and f.python.startswith("3.8")
                else f"not importable from Python {f.python} (they are built for the system Python 3.8 only)")
    return Row(item="JetPack 5", status="warn",
               value=f"TensorRT's Python bindings: {bindings}; engines via trtexec at {trtexec}; parity gate and "
                     f"inference on ONNX Runtime. Works: {'; '.join(JETPACK5_WORKS)}. Does not work: "
                     f"{'; '.join(JETPACK5_FAILS)}",
               fix="use --via trtexec / --build-via trtexec and an ort-* backend, or move to JetPack 6 "
                   "(docs/device-setup.md)")


def _ort_row(f: Facts) -> Row:
    pk = f.packages
    if not pk.get("onnxruntime"):
        return Row(item="ONNX Runtime", value="absent", status="warn",
                   fix="pip install 'edge-tl[cpu]' (or the Jetson onnxruntime-gpu wheel)")
    if f.ort_error:  # installed but unusable (JetPack 6: NumPy 2 beside a wheel built for NumPy 1.x; issue 22 D1)
        return Row(item="ONNX Runtime", value=f"{pk['onnxruntime']} {f.ort_error}", status="warn",
                   fix="on JetPack 6 keep NumPy < 2 (pip install 'numpy<2'): its onnxruntime-gpu wheels are built "
                       "against NumPy 1.x; TensorRT works without it")
    return Row(item="ONNX Runtime", value=f"{pk['onnxruntime']} [{', '.join(f.ort_providers)}]")


def machine_rows(f: Facts) -> list[Row]:
    jetson = bool(f.l4t or f.jetson_model)
    dev = DeviceInfo.from_dict(f.device) if f.device else None
    pk = f.packages
    py_ok = tuple(int(x) for x in f.python.split(".")[:2]) >= (3, 10)
    rows = [
        Row(item="Python", value=f"{f.python} ({f.machine})", status="ok" if py_ok else "blocker",
            fix=None if py_ok else "edge-tl needs Python >= 3.10"),
        Row(item="torch", value=pk.get("torch") or "absent", status="info",
            fix=None if pk.get("torch") else "not needed on the device"),
        Row(item="ONNX", value=pk.get("onnx") or "absent", status="ok" if pk.get("onnx") else "blocker",
            fix=None if pk.get("onnx") else "pip install onnx"),
        _ort_row(f),
        Row(item="TensorRT", value=pk.get("tensorrt") or "absent",
            status="ok" if pk.get("tensorrt") else ("warn" if jetson else "info"),
            fix=None if pk.get("tensorrt") else (
                "JetPack 5's bindings are for the system Python 3.8 only: build with --via trtexec, run on ONNX "
                "Runtime" if (f.l4t or "").startswith("R35")
                else "sudo apt install python3-libnvinfer (venv: --system-site-packages)")),
        Row(item="trtexec", value=f.trtexec or "absent", status="ok" if f.trtexec else "info"),
        Row(item="CUDA", value=f.cuda or "not found", status="ok" if f.cuda else "info"),
        Row(item="GPU", value=f"{dev.gpu_name} (compute capability {dev.compute_capability})" if dev
            else (f.device_error or "not detected"), status="ok" if dev else ("warn" if jetson else "info")),
        Row(item="JetPack / L4T", value=f"JetPack {f.jetpack or '?'} (L4T {f.l4t})" if f.l4t
            else (f.jetson_model or "not a Jetson"), status="ok" if f.l4t else "info"),
        Row(item="DLA cores", value=str(dev.dla_cores) if dev and dev.dla_cores is not None else "unknown",
            status="info"),
        Row(item="jetson-stats (jtop)", value=f.jtop_service or "not found",
            status="ok" if f.jtop_service in ("active", "socket present") else ("warn" if jetson else "info"),
            fix=None if f.jtop_service in ("active", "socket present") or not jetson
            else "sudo pip3 install jetson-stats && sudo systemctl restart jtop (without it bench reads sysfs)"),
        Row(item="nvpmodel", value=f.nvpmodel or "not found", status="info"),
        Row(item="backends", value=", ".join(f.backends) or "none", status="ok" if f.backends else "blocker",
            fix=None if f.backends else "pip install 'edge-tl[cpu]' (ONNX Runtime) or install TensorRT"),
    ]
    rows += [r for r in (trust_row(f), jetpack5_row(f)) if r is not None]
    return rows


def bundle_rows(f: Facts, bundle) -> list[Row]:
    rows = []
    try:
        bundle.verify()
        rows.append(Row(item="bundle", value=f"{bundle.manifest.name} ({bundle.manifest.bundle_id}) verified"))
    except CheckFailed as exc:
        rows.append(Row(item="bundle", value=exc.problem, status="blocker", fix=exc.fix))
    if f.trusted_keys is not None:  # what deploy and serve would say of its signature on this machine
        from edge_tl.core.signing import enforce

        try:
            status = bundle.signature()
            enforce(status, False, "bundle")
            rows.append(Row(item="signature", value=status.detail))
        except (CheckFailed, EdgeTLError) as exc:
            rows.append(Row(item="signature", value=exc.problem.removeprefix("bundle: "), status="blocker",
                            fix=exc.fix))
    problems = bundle.manifest.training_problems()
    rows.append(Row(item="training", value="; ".join(problems) if problems else "better than guessing (build check)",
                    status="blocker" if problems else "ok",
                    fix="fix the data or the recipe and rebuild (deploy refuses it without --allow-failed-training)"
                    if problems else None))
    target = bundle.manifest.target
    dev = DeviceInfo.from_dict(f.device) if f.device else None
    trt_version = dev.tensorrt_version if dev else f.packages.get("tensorrt")
    if trt_version:
        max_opset = max_opset_for_tensorrt(trt_version)
        if max_opset is None:
            rows.append(Row(item="opset", value=f"{target.opset} (TensorRT {trt_version}: max unknown)", status="warn"))
        elif target.opset > max_opset:
            rows.append(Row(item="opset", value=f"{target.opset} > {max_opset} (TensorRT {trt_version})",
                            status="blocker", fix=f"rebuild the bundle for this device: edge-tl build --target "
                                                  f"{'jetpack5' if max_opset <= 17 else 'jetpack6'}"))
        else:
            rows.append(Row(item="opset", value=f"{target.opset} <= {max_opset} (TensorRT {trt_version})"))
        if trt_version.split(".")[0] != str(target.tensorrt).split(".")[0]:
            rows.append(Row(item="target", value=f"bundle built for {target.name} (TensorRT {target.tensorrt}), "
                            f"this device has TensorRT {trt_version}", status="warn"))
    else:
        rows.append(Row(item="opset", value=f"{target.opset} (no TensorRT here: ONNX Runtime runs any opset)",
                        status="info"))
    precision = bundle.manifest.default_precision
    if dev is not None and precision == "int8" and dev.fast_int8 is False:
        rows.append(Row(item="precision", value=f"{precision}: {dev.gpu_name} has no fast INT8", status="blocker",
                        fix="build the engine with --precision fp16 (or fp32)"))
    else:
        support = "" if dev is None else f" (fast FP16: {dev.fast_fp16}, fast INT8: {dev.fast_int8})"
        rows.append(Row(item="precision", value=f"{precision}{support}"))
    backend = f.backends[0] if f.backends else None
    rows.append(Row(item="backend", value=f"auto -> {backend}" if backend else "none available",
                    status="ok" if backend else "blocker", fix=None if backend else "install ONNX Runtime or TensorRT"))
    return rows


def evaluate(facts: Facts, bundle=None) -> list[Row]:
    return machine_rows(facts) + (bundle_rows(facts, bundle) if bundle is not None else [])


def report_json(facts: Facts, rows: list[Row]) -> dict[str, Any]:
    return {"facts": facts.model_dump(mode="json"), "device": facts.device,
            "checks": [r.model_dump() for r in rows], "blockers": sum(r.status == "blocker" for r in rows)}


#: a recorded facts file is a few KiB; anything far larger is not one (and /dev/zero never ends)
MAX_FACTS_BYTES = 4 << 20


def load_facts(path: str | Path) -> Facts:
    fix = "give a file written by `edge-tl doctor --json`"
    path = Path(path)
    try:
        if not path.is_file():  # a folder, a device (/dev/zero), a pipe: read_text would not end or not work
            raise EdgeTLError(f"recorded facts {path} is not a regular file", fix)
        if path.stat().st_size > MAX_FACTS_BYTES:
            raise EdgeTLError(f"recorded facts {path} is {path.stat().st_size >> 20} MiB, not a facts file", fix)
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise EdgeTLError(f"recorded facts {path} holds a JSON {type(data).__name__}, not an object", fix)
        return Facts.model_validate(data.get("facts", data))
    except (OSError, ValueError) as exc:
        raise EdgeTLError(f"could not read recorded facts {path} ({exc})", fix) from exc


def raise_on_blockers(rows: list[Row]) -> None:
    blockers = [r for r in rows if r.status == "blocker"]
    if blockers:
        raise CheckFailed("; ".join(f"{r.item}: {r.value}" + (f" (fix: {r.fix})" if r.fix else "") for r in blockers),
                          "fix the blockers above")
