"""Issue 22, D1: on JetPack 6 NumPy 2 beside an onnxruntime-gpu wheel built for NumPy 1.x makes `import onnxruntime`
fail ("AttributeError: _ARRAY_API not found" / ImportError). That took down available_backends(), hence serve
--backend auto, the deploy gate's plan and doctor, though TensorRT would work. A package named onnxruntime that
raises on import, first on the path, stands in for the broken wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))


def _env(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "site" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise AttributeError("_ARRAY_API not found")\n')
    path = os.pathsep.join(p for p in (str(tmp_path / "site"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_a_broken_onnxruntime_is_said_not_fatal(tmp_path, tiny_bundle_src):
    env = _env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "from edge_tl.device.runtime import available_backends, "
                            "onnxruntime_providers; print(available_backends()); print(onnxruntime_providers()[1])"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert probe.returncode == 0, probe.stderr
    backends, why = probe.stdout.splitlines()[:2]
    assert "ort-cpu" not in backends and "fails to import (AttributeError: _ARRAY_API not found)" in why
    doctor = subprocess.run([EDGE_TL, "doctor", str(tiny_bundle_src), "--json"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert "Traceback" not in doctor.stderr, doctor.stderr
    rows = {r["item"]: r for r in json.loads(doctor.stdout)["checks"]}
    assert rows["ONNX Runtime"]["status"] == "warn" and "NumPy < 2" in rows["ONNX Runtime"]["fix"]


def test_the_jetson_extra_pins_numpy_1_and_an_opencv_built_for_it():
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "numpy>=1.24,<2" in extras["jetson"] and "opencv-python-headless>=4.8,<4.12" in extras["jetson"]
