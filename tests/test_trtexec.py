"""trtexec: the public summary parser on recorded real logs, the command lines, and a build through a stand-in
trtexec executable (tests/data/fake_bin/trtexec replays a recorded TensorRT 8.5 log)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from edge_tl.core.errors import EdgeTLError
from edge_tl.device.bench.trtexec import trtexec_to_bench
from edge_tl.device.engine import parse_trtexec
from edge_tl.device.engine.cache import load_or_build, read_sidecar
from edge_tl.device.engine.spec import BatchProfile, BuildSpec, DeviceInfo
from edge_tl.device.engine.trtexec import trtexec_command, trtexec_version

DATA = Path(__file__).parent / "data"
LOGS = DATA / "trtexec"
ORIN_JP5 = DeviceInfo(tensorrt_version="8.5.2", gpu_name="Orin", compute_capability="8.7", dla_cores=2,
                      fast_fp16=True, fast_int8=True)


def log(name: str) -> str:
    return (LOGS / name).read_text()


def test_trt85_orin_dla_all_lines_exact():
    p = parse_trtexec(log("trt85_orin_dla.txt"))
    assert p["throughput_qps"] == 0.406047
    assert p["latency_ms"] == {"min": 2240.97, "max": 2241.41, "mean": 2241.14, "median": 2241.13, "p90": 2241.2,
                               "p95": 2241.41, "p99": 2241.41}
    assert p["enqueue_ms"]["median"] == 1.13232 and p["enqueue_ms"]["p90"] == 1.24414
    assert p["h2d_ms"] == {"min": 1.78027, "max": 1.9176, "mean": 1.80922, "median": 1.80225, "p90": 1.80664,
                           "p95": 1.9176, "p99": 1.9176}
    assert p["gpu_compute_ms"]["mean"] == 2239.16
    assert p["d2h_ms"]["min"] == 0.101562
    assert p["total_host_walltime_s"] == 24.6277 and p["total_gpu_compute_s"] == 22.3916
    assert "end_to_end_ms" not in p


def test_trt8x_only_p99_and_end_to_end_line():
    p = parse_trtexec(log("trt8x_end_to_end.txt"))
    assert p["throughput_qps"] == 28.9757
    assert p["end_to_end_ms"] == {"min": 34.6746, "max": 36.156, "mean": 35.0105, "median": 34.9216, "p99": 36.156}
    assert set(p["latency_ms"]) == {"min", "max", "mean", "median", "p99"}
    assert p["gpu_compute_ms"]["median"] == 33.5995
    assert p["d2h_ms"]["p99"] == 0.793457


def test_trt10x_percentiles_and_bare_lines():
    p = parse_trtexec(log("trt10x_percentiles.txt"))
    assert p["throughput_qps"] == 130.298
    assert p["gpu_compute_ms"]["p95"] == 10.8175 and p["h2d_ms"]["median"] == 0.00814819
    thor = parse_trtexec(log("trt10_13_thor_bare.txt"))  # pasted without timestamps, cut after Latency
    assert thor == {"throughput_qps": 1.55139,
                    "latency_ms": {"min": 634.412, "max": 684.747, "mean": 644.386, "median": 640.024,
                                   "p90": 664.195, "p95": 666.219, "p99": 684.747}}


def test_trt7x_formats():
    host = parse_trtexec(log("trt7x_host_latency.txt"))
    assert host["throughput_qps"] == 0.0  # TensorRT 7 printed 0 qps for explicit-batch models
    assert host["latency_ms"] == {"min": 1.64058, "max": 6.2915, "mean": 1.66069, "median": 1.65601, "p99": 1.67065}
    assert host["end_to_end_ms"]["mean"] == 3.00909 and host["end_to_end_ms"]["p99"] == 3.03931
    assert host["total_host_walltime_s"] == 3.00461
    gpu = parse_trtexec(log("trt7x_gpu_compute.txt"))
    assert gpu["enqueue_ms"] == {"min": 1.9541, "max": 8.28448, "median": 4.74475}
    assert gpu["gpu_compute_ms"] == {"min": 564.432, "max": 569.332, "mean": 567.144, "median": 567.073,
                                     "p99": 569.332}
    assert gpu["throughput_qps"] is None


def test_last_summary_wins_and_other_percentile():
    text = log("trt8x_end_to_end.txt") + log("trt85_orin_dla.txt").replace("percentile(99%)", "percentile(99.9%)")
    p = parse_trtexec(text)
    assert p["throughput_qps"] == 0.406047
    assert p["latency_ms"]["p99.9"] == 2241.41 and "p99" not in p["latency_ms"]


def test_no_summary_is_a_clear_error():
    with pytest.raises(EdgeTLError, match="no trtexec performance summary"):
        parse_trtexec(log("trt10_3_orin_nx_banner.txt"))
    with pytest.raises(EdgeTLError, match=r"FAILED TensorRT.trtexec"):
        parse_trtexec("[E] Failed to parse onnx file\n&&&& FAILED TensorRT.trtexec [TensorRT v8502] # trtexec x\n")
    with pytest.raises(EdgeTLError):
        parse_trtexec("")


def test_version_from_banner():
    assert trtexec_version(log("trt10_3_orin_nx_banner.txt")) == "10.3.0"
    assert trtexec_version("&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # trtexec") == "8.5.2"
    assert trtexec_version("[I] TensorRT version: 8.6.3") == "8.6.3"
    assert trtexec_version("nothing") is None


def _spec(bundle: Path, precision: str, **kw) -> BuildSpec:
    model = bundle / ("model.int8.onnx" if precision in ("int8", "best") else "model.onnx")
    return BuildSpec(onnx=model, precision=precision, profile=BatchProfile.for_max_batch(8), **kw)


def test_command_lines(tiny_bundle_src):
    spec = _spec(tiny_bundle_src, "fp16", dla_core=1, workspace_mb=512, timing_cache=Path("/c/t.cache"))
    argv = trtexec_command(spec, "/e/m.engine", trtexec="/usr/src/tensorrt/bin/trtexec")
    assert argv == ["/usr/src/tensorrt/bin/trtexec", f"--onnx={tiny_bundle_src / 'model.onnx'}",
                    "--saveEngine=/e/m.engine", "--fp16", "--useDLACore=1", "--allowGPUFallback",
                    "--memPoolSize=workspace:512", "--minShapes=input:1x3x16x16", "--optShapes=input:2x3x16x16",
                    "--maxShapes=input:8x3x16x16", "--shapes=input:2x3x16x16", "--timingCacheFile=/c/t.cache"]
    fp32 = trtexec_command(_spec(tiny_bundle_src, "fp32"), "e")
    assert "--noTF32" in fp32 and "--fp16" not in fp32 and "--int8" not in fp32
    assert [a for a in trtexec_command(_spec(tiny_bundle_src, "best"), "e") if a in ("--fp16", "--int8")] == \
        ["--fp16", "--int8"]
    keep = trtexec_command(_spec(tiny_bundle_src, "fp16", keep_layers=("a", "b"), keep_precision="fp32"), "e")
    assert keep[-3:] == ["--precisionConstraints=obey", "--layerPrecisions=a:fp32,b:fp32",
                         "--layerOutputTypes=a:fp32,b:fp32"]
    with pytest.raises(EdgeTLError, match="needs a Q/DQ model"):
        trtexec_command(BuildSpec(onnx=tiny_bundle_src / "model.onnx", precision="int8",
                                  profile=BatchProfile.for_max_batch(8)), "e")
    with pytest.raises(EdgeTLError, match="DLA runs FP16 or INT8"):
        _spec(tiny_bundle_src, "fp32", dla_core=0)


def test_a_static_model_gets_no_shape_flags(tiny_bundle_src, tmp_path):
    """Issue 22, D6: trtexec refuses shape flags for a model without dynamic inputs ("Static model does not take
    explicit shapes since the shape of inference tensors will be determined by the model itself", NVIDIA/TensorRT
    samples/common/sampleEngines.cpp); the command passed them always."""
    import onnx

    model = onnx.load(str(tiny_bundle_src / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # batch 4, fixed
    onnx.save(model, tmp_path / "static.onnx")
    argv = trtexec_command(BuildSpec(onnx=tmp_path / "static.onnx", precision="fp32",
                                     profile=BatchProfile.for_max_batch(8)), "e")
    assert not [a for a in argv if a.startswith(("--minShapes", "--optShapes", "--maxShapes", "--shapes"))]
    dynamic = trtexec_command(_spec(tiny_bundle_src, "fp32"), "e")
    assert "--minShapes=input:1x3x16x16" in dynamic



def test_build_via_trtexec_logs_command_and_parses(tiny_bundle_src, fake_trtexec, tmp_path):
    shown = []
    from functools import partial

    from edge_tl.device.engine.trtexec import build_with_trtexec

    build_fn = partial(build_with_trtexec, trtexec=fake_trtexec, echo=shown.append)
    engine = load_or_build(tiny_bundle_src / "model.int8.onnx", "int8", tmp_path / "cache", max_batch=8,
                           device=ORIN_JP5, build_fn=build_fn)
    assert engine.read_bytes().startswith(b"fake-engine:")
    side = read_sidecar(engine)
    assert side["via"] == "trtexec" and side["tensorrt_version"] == "8.5.2"
    assert side["command"][0] == str(fake_trtexec) and "--int8" in side["command"]
    assert shown and shown[0].startswith(str(fake_trtexec))
    logfile = Path(side["log"])
    assert logfile == engine.with_suffix(".trtexec.log")
    assert logfile.read_text().splitlines()[0] == "# " + shown[0]
    assert side["performance"]["throughput_qps"] == 0.406047
    result = trtexec_to_bench(side["performance"], batch=2, model="m.onnx", precision="int8")
    row = result.results[0]
    assert result.source == "trtexec" and row.batch == 2
    assert row.latency_ms.median == 2241.13 and row.latency_ms.p90 == 2241.2
    assert row.throughput_ips == pytest.approx(0.812094)
    assert row.extra["trtexec"]["gpu_compute_ms"]["max"] == 2239.32


def test_trtexec_failure_is_one_line_and_leaves_nothing(tiny_bundle_src, fake_trtexec, tmp_path, monkeypatch):
    from functools import partial

    from edge_tl.device.engine.trtexec import build_with_trtexec

    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", "1")
    cache = tmp_path / "cache"
    with pytest.raises(EdgeTLError, match=r"trtexec failed with exit code 1: .*Failed to parse onnx file"):
        load_or_build(tiny_bundle_src / "model.onnx", "fp16", cache, device=ORIN_JP5,
                      build_fn=partial(build_with_trtexec, trtexec=fake_trtexec))
    assert not list(cache.glob("*.engine")) and not list(cache.glob(".*partial*"))
    assert len(list(cache.glob("*.trtexec.log"))) == 1


def test_cli_build_via_trtexec(tiny_bundle_src, fake_trtexec, tmp_path):
    """No TensorRT Python here: the device facts come from trtexec's banner (the JetPack 5 + other-Python path)."""
    import subprocess

    env = {**os.environ, "PATH": f"{fake_trtexec.parent}{os.pathsep}{os.environ['PATH']}"}
    cache = tmp_path / "cache"
    args = ["engine", "build", str(tiny_bundle_src), "--via", "trtexec", "--cache-dir", str(cache),
            "--out", str(tmp_path / "out.engine")]
    proc = subprocess.run([sys.executable, "-c", "from edge_tl.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "out.engine")
    assert "--saveEngine=" in proc.stderr  # the exact command was shown
    bench = next(cache.glob("*.trtexec.bench.json"))
    data = json.loads(bench.read_text())
    assert data["source"] == "trtexec" and data["results"][0]["batch"] == 2
    side = json.loads((tmp_path / "out.engine.json").read_text())
    assert side["key"]["tensorrt_version"] == "8.5.2" and side["key"]["precision"] == "int8"


def test_cli_keep_worst_builds_from_the_fallback_model(tiny_bundle_src, fake_trtexec, tmp_path):
    import subprocess

    env = {**os.environ, "PATH": f"{fake_trtexec.parent}{os.pathsep}{os.environ['PATH']}"}
    args = ["engine", "build", str(tiny_bundle_src), "--precision", "int8", "--via", "trtexec", "--keep-worst", "1",
            "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run([sys.executable, "-c", "from edge_tl.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    engine = Path(proc.stdout.strip().splitlines()[-1])
    side = read_sidecar(engine)
    onnx_arg = next(a for a in side["command"] if a.startswith("--onnx="))
    assert "/fallback/model.int8.keep-" in onnx_arg and "node_of_logits_QuantizeLinear_Input" in proc.stderr
    assert side["key"]["onnx_sha256"] != json.loads((tiny_bundle_src / "manifest.json").read_text())[
        "artifacts"]["model.int8.onnx"]["sha256"]


def test_dla_build_via_trtexec_is_static_and_records_placement(tiny_bundle_src, fake_trtexec, tmp_path, monkeypatch):
    from functools import partial

    from edge_tl.device.engine.trtexec import build_with_trtexec, parse_layer_placement

    recorded = parse_layer_placement((DATA / "trtexec" / "trt8x_dla_layers.txt").read_text())
    assert recorded["dla_nodes"] == 5 and recorded["gpu_layers"] == 6
    assert recorded["dla_node_names"][1] == "{ForeignNode[Relu_10...Conv_11]}"
    build_fn = partial(build_with_trtexec, trtexec=fake_trtexec)
    engine = load_or_build(tiny_bundle_src / "model.onnx", "fp16", tmp_path / "cache", dla_core=1, max_batch=4,
                           device=ORIN_JP5, build_fn=build_fn)
    side = read_sidecar(engine)
    assert side["key"]["batch_profile"] == "4-4-4"  # DLA: static shapes only
    shapes = {a.split("=")[0]: a.split("=")[1] for a in side["command"] if a.endswith("x3x16x16")}
    assert set(shapes.values()) == {"input:4x3x16x16"} and "--useDLACore=1" in side["command"]
    assert side["dla"]["dla_nodes"] == 5 and side["dla"]["gpu_layers"] == 6
    monkeypatch.setenv("FAKE_TRTEXEC_NO_DLA", "1")
    with pytest.raises(EdgeTLError, match="trtexec put no layer of model.onnx on the DLA"):
        load_or_build(tiny_bundle_src / "model.onnx", "fp16", tmp_path / "cache2", dla_core=0, max_batch=4,
                      device=ORIN_JP5, build_fn=build_fn)
    assert not list((tmp_path / "cache2").glob("*.engine"))
