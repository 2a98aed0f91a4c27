"""`edge-tl export triton`: the model repository entry, its config.pbtxt parsed with Triton's own ModelConfig
protobuf (tritonclient.grpc.model_config_pb2, strict text-format parsing: unknown fields, wrong types and bad
enum names are errors), and the exported model run through ONNX Runtime on the bundle's golden inputs with the
parity gate's own rules. TensorRT itself does not run here: the --engine path uses an engine built by the
recorded trtexec stand-in (tests/data/fake_bin/trtexec), checked against its sidecar like a real one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_tl.core.bundle import Bundle
from edge_tl.device.engine.parity import ParityThresholds, compare_outputs, judge

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="Triton's model-config protobuf comes with tritonclient[grpc]")
text_format = pytest.importorskip("google.protobuf.text_format")

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))
FAKE_BIN = Path(__file__).parent / "data" / "fake_bin"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EDGE_TL, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def _config(model_dir: Path):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _golden_parity(bundle: Bundle, model: Path, cfg, precision: str) -> list[str]:
    """Run ``model`` as Triton would feed it (batches of at most max_batch_size, the config's input name and
    dims) and judge it against the golden outputs with the deploy gate's thresholds."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (inp,), (out,) = cfg.input, cfg.output
    x = bundle.golden_inputs()
    assert list(x.shape[1:]) == list(inp.dims)
    outs = [sess.run([out.name], {inp.name: x[i:i + cfg.max_batch_size]})[0]
            for i in range(0, len(x), cfg.max_batch_size)]
    result = np.concatenate(outs)
    assert list(result.shape[1:]) == list(out.dims)
    return judge(compare_outputs(out.name, result, bundle.golden_outputs()), ParityThresholds.for_precision(precision))


def test_int8_onnx_export_parses_with_tritons_protobuf_and_keeps_golden_parity(tiny_bundle_src, tmp_path):
    repo = tmp_path / "repo"
    proc = _cli("export", "triton", str(tiny_bundle_src), "--out", str(repo), "--instances", "2",
                "--preferred-batch", "4,8", "--workspace-mb", "512", "--trt-cache", "/var/cache/triton-trt")
    assert proc.returncode == 0, proc.stderr
    bundle = Bundle.open(tiny_bundle_src)
    m = bundle.manifest
    model_dir = repo / m.name
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "edge-tl.json", "labels.txt"]
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no partial folder left
    cfg = _config(model_dir)
    assert cfg.name == m.name and cfg.backend == "onnxruntime" and cfg.platform == ""
    assert cfg.max_batch_size == m.max_batch == 8
    assert list(cfg.version_policy.specific.versions) == [1]
    (inp,) = cfg.input
    assert inp.name == m.input.name and inp.data_type == model_config_pb2.TYPE_FP32
    assert list(inp.dims) == m.input.shape[1:] == [3, 16, 16]  # the batch axis is max_batch_size's
    (out,) = cfg.output
    assert out.name == m.output.name and list(out.dims) == [len(m.classes)] and out.label_filename == "labels.txt"
    assert (model_dir / "labels.txt").read_text().splitlines() == m.classes
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    (group,) = cfg.instance_group
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    (accel,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt"
    assert dict(accel.parameters) == {"precision_mode": "INT8", "max_workspace_size_bytes": str(512 << 20),
                                      "trt_engine_cache_enable": "true",
                                      "trt_engine_cache_path": "/var/cache/triton-trt"}
    # the model is the bundle's INT8 artifact, byte for byte, and it still passes the INT8 gate on the golden set
    assert bundle.manifest.artifacts["model.int8.onnx"].sha256 == json.loads(
        (model_dir / "edge-tl.json").read_text())["sha256"]
    assert _golden_parity(bundle, model_dir / "1" / "model.onnx", cfg, "int8") == []
    assert "exported tiny (int8, onnxruntime, TensorRT accelerator INT8, max_batch_size 8)" in proc.stdout


def test_fp32_cpu_export_from_the_tarball(tiny_bundle_src, tmp_path):
    repo = tmp_path / "repo"
    tarball = tiny_bundle_src.with_name(tiny_bundle_src.name + ".tar.gz")
    proc = _cli("export", "triton", str(tarball), "--out", str(repo), "--precision", "fp32", "--kind", "cpu",
                "--name", "tiny_cpu", "--max-batch", "4", "--version", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["validated"] is True and result["accelerator"] == "none"
    cfg = _config(repo / "tiny_cpu")
    assert cfg.name == "tiny_cpu" and cfg.max_batch_size == 4 and list(cfg.version_policy.specific.versions) == [3]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert not cfg.HasField("optimization")
    bundle = Bundle.open(tiny_bundle_src)
    assert _golden_parity(bundle, repo / "tiny_cpu" / "3" / "model.onnx", cfg, "fp32") == []


def test_engine_export_is_checked_against_its_sidecar(tiny_bundle_src, tmp_path):
    env = {"PATH": f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}"}
    build = _cli("engine", "build", str(tiny_bundle_src), "--via", "trtexec", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "tiny.engine"), env=env)
    assert build.returncode == 0, build.stderr
    engine = tmp_path / "tiny.engine"
    side = json.loads(engine.with_name("tiny.engine.json").read_text())
    repo = tmp_path / "repo"
    proc = _cli("export", "triton", str(tiny_bundle_src), "--out", str(repo), "--engine", str(engine))
    assert proc.returncode == 0, proc.stderr
    cfg = _config(repo / "tiny")
    assert cfg.platform == "tensorrt_plan" and cfg.backend == ""
    assert cfg.max_batch_size == int(side["key"]["batch_profile"].split("-")[-1])
    assert not cfg.HasField("optimization")
    assert (repo / "tiny" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert json.loads((repo / "tiny" / "edge-tl.json").read_text())["engine_key"] == side["key"]
    # an engine that no longer matches its sidecar is refused, and nothing is written
    engine.write_bytes(engine.read_bytes() + b"x")
    bad = _cli("export", "triton", str(tiny_bundle_src), "--out", str(tmp_path / "repo2"), "--engine", str(engine))
    assert bad.returncode == 3 and "does not match the sha256" in bad.stderr
    assert not (tmp_path / "repo2").exists() or not any((tmp_path / "repo2").iterdir())


def test_engine_of_another_model_is_refused(tiny_bundle_src, tmp_path):
    env = {"PATH": f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}"}
    from bundle_factory import make_tiny_bundle

    other = make_tiny_bundle(tmp_path / "other", name="other", seed=5, tarball=False)
    build = _cli("engine", "build", str(other), "--via", "trtexec", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "other.engine"), env=env)
    assert build.returncode == 0, build.stderr
    proc = _cli("export", "triton", str(tiny_bundle_src), "--out", str(tmp_path / "repo"), "--engine",
                str(tmp_path / "other.engine"))
    assert proc.returncode == 3 and "was built from another model" in proc.stderr


def test_tampered_bundle_writes_nothing(tiny_bundle, tmp_path):
    with open(tiny_bundle / "model.int8.onnx", "ab") as f:
        f.write(b"\0")
    repo = tmp_path / "repo"
    proc = _cli("export", "triton", str(tiny_bundle), "--out", str(repo))
    assert proc.returncode == 3 and "model.int8.onnx does not match its sha256" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not repo.exists() or not any(repo.iterdir())


def test_existing_entry_and_bad_options(tiny_bundle_src, tmp_path):
    repo = tmp_path / "repo"
    assert _cli("export", "triton", str(tiny_bundle_src), "--out", str(repo), "--precision", "fp32",
                "--kind", "cpu").returncode == 0
    before = (repo / "tiny" / "config.pbtxt").read_text()
    again = _cli("export", "triton", str(tiny_bundle_src), "--out", str(repo))
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert (repo / "tiny" / "config.pbtxt").read_text() == before
    over = _cli("export", "triton", str(tiny_bundle_src), "--out", str(repo), "--overwrite")
    assert over.returncode == 0, over.stderr
    assert _config(repo / "tiny").optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]
    for args, expect in ((["--name", "../evil"], "not a usable Triton model name"),
                         (["--accelerator", "tensorrt", "--kind", "cpu"], "runs on the GPU"),
                         (["--precision", "fp16", "--accelerator", "none"], "fp16 needs the TensorRT accelerator"),
                         (["--preferred-batch", "0,x"], "--preferred-batch '0,x'"),
                         (["--engine", str(tmp_path / "none.plan")], "does not exist"),
                         # issue 24: absurd sizes were an internal error or a config Triton refuses
                         (["--max-batch", "99999999999"], "--max-batch 99999999999 is above 4096"),
                         (["--max-batch", "4", "--preferred-batch", "2,8"], "--preferred-batch 8 is outside 1..4"),
                         (["--instances", "100000"], "--instances 100000 is above 64"),
                         (["--version", "99999999999999999999"], "--version 99999999999999999999 is above"),
                         (["--max-queue-delay-us", "99999999999999"], "is above 60000000")):
        proc = _cli("export", "triton", str(tiny_bundle_src), "--out", str(tmp_path / "r2"), *args)
        assert proc.returncode == 2 and expect in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r2").exists() or not any((tmp_path / "r2").iterdir())
    shutil.rmtree(repo)
