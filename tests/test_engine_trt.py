"""The TensorRT API build.

Part 1 runs everywhere: build.py against a stand-in for TensorRT's API surface (tests/trt_standin.py), so the
config it asks for (flags per precision and TensorRT version, profile, DLA, constraints, timing cache) is
checked without a GPU. Part 2 (marked ``tensorrt``) builds real engines and is skipped where TensorRT's
Python bindings or a GPU are absent.
"""

from __future__ import annotations

import json
import shutil

import pytest
import trt_standin

from edge_tl.core.errors import EdgeTLError
from edge_tl.device.engine import build
from edge_tl.device.engine.cache import load_or_build, read_sidecar
from edge_tl.device.engine.spec import BatchProfile, BuildSpec


@pytest.fixture
def standin(monkeypatch):
    def install(**kw):
        return trt_standin.install(monkeypatch, **kw)
    return install


def _build(bundle, precision, profile=None, **kw) -> dict:
    model = bundle / ("model.int8.onnx" if precision in ("int8", "best") else "model.onnx")
    spec = BuildSpec(onnx=model, precision=precision, profile=profile or BatchProfile.for_max_batch(8), **kw)
    return json.loads(build.BuildEngine(build.NetworkFromOnnx(model), spec)())


def test_config_per_precision_on_tensorrt_10(standin, tiny_bundle_src):
    standin(version="10.3.0.30")
    fp32 = _build(tiny_bundle_src, "fp32")
    assert fp32["network_flags"] == 0  # TensorRT 10: explicit batch only, no flag
    assert fp32["flags"] == [] and fp32["profiles"] == [{"input": [[1, 3, 16, 16], [2, 3, 16, 16], [8, 3, 16, 16]]}]
    assert _build(tiny_bundle_src, "fp16")["flags"] == ["FP16", "TF32"]
    assert _build(tiny_bundle_src, "int8")["flags"] == ["INT8", "TF32"]
    assert _build(tiny_bundle_src, "best")["flags"] == ["FP16", "INT8", "TF32"]


def test_tensorrt_85_explicit_batch_workspace_dla_and_constraints(standin, tiny_bundle_src, tmp_path, monkeypatch):
    standin(version="8.5.2.2", dla=2)
    cache = tmp_path / "timing.cache"
    static = BatchProfile(4, 4, 4)  # DLA: static shapes only
    got = _build(tiny_bundle_src, "fp16", static, dla_core=1, workspace_mb=256, timing_cache=cache)
    assert got["network_flags"] == 1  # 1 << EXPLICIT_BATCH
    assert got["pool"] == 256 << 20 and got["device"] == "DLA" and got["dla_core"] == 1
    assert "GPU_FALLBACK" in got["flags"] and got["timing_cache"] == "fresh"
    assert got["dla_layers"] and got["profiles"] == [{"input": [[4, 3, 16, 16]] * 3}]
    assert cache.read_bytes() == b"fresh+1"
    with pytest.raises(EdgeTLError, match="DLA runs static shapes only"):
        _build(tiny_bundle_src, "fp16", dla_core=1)  # the dynamic 1-2-8 profile
    for q in ("int8", "best"):  # the Q/DQ model: DLA does not run explicit quantization (issue 22, D2)
        with pytest.raises(EdgeTLError, match="DLA does not run explicitly quantized"):
            _build(tiny_bundle_src, q, static, dla_core=1)
    lacks_all = {"Conv", "Relu", "GlobalAveragePool", "Gemm", "Flatten"}
    monkeypatch.setattr(trt_standin.Config, "unsupported", frozenset(lacks_all))
    with pytest.raises(EdgeTLError, match="no layer of model.onnx can run on the DLA"):
        _build(tiny_bundle_src, "fp16", static, dla_core=0)
    monkeypatch.setattr(trt_standin.Config, "unsupported", frozenset())
    again = _build(tiny_bundle_src, "fp16", static, dla_core=1, workspace_mb=256, timing_cache=cache)
    assert again["timing_cache"] == "fresh+1"  # the saved cache is reused
    kept = _build(tiny_bundle_src, "fp16", keep_layers=("node_of_c1",), keep_precision="fp32")
    assert kept["constrained"] == {"node_of_c1": "float32"} and "OBEY_PRECISION_CONSTRAINTS" in kept["flags"]
    with pytest.raises(EdgeTLError, match="not in the network"):
        _build(tiny_bundle_src, "fp16", keep_layers=("nope",))


def test_builder_refusals(standin, tiny_bundle_src):
    standin(version="10.3.0", dla=0, fast_fp16=False)
    with pytest.raises(EdgeTLError, match="no fast FP16"):
        _build(tiny_bundle_src, "fp16")
    facts = build.detect_device()
    assert facts.tensorrt_version == "10.3.0" and facts.dla_cores == 0 and facts.fast_fp16 is False
    standin(version="10.3.0", dla=0)  # an Orin Nano: no DLA
    with pytest.raises(EdgeTLError, match="no DLA cores"):
        _build(tiny_bundle_src, "fp16", BatchProfile(4, 4, 4), dla_core=0)


def test_parse_errors_and_engine_loading(standin, tiny_bundle_src, tmp_path):
    import onnx

    standin()
    model = onnx.load(str(tiny_bundle_src / "model.onnx"))
    model.graph.node[1].op_type = "NoSuchOp"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    with pytest.raises(EdgeTLError, match="could not parse bad.onnx: No importer registered for op: NoSuchOp"):
        build.NetworkFromOnnx(bad)()
    good = tmp_path / "e.engine"
    build.build_engine_file(BuildSpec(onnx=tiny_bundle_src / "model.onnx", precision="fp32",
                                      profile=BatchProfile.for_max_batch(4)), good)
    assert build.EngineFromPath(good)()["profiles"][0]["input"][2] == [4, 3, 16, 16]
    (tmp_path / "other.engine").write_bytes(b"\x00serialized by TensorRT 8.5")
    with pytest.raises(EdgeTLError, match="built by another TensorRT version"):
        build.EngineFromPath(tmp_path / "other.engine")()


# -- real TensorRT -------------------------------------------------------------------------------------
def _real_trt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT's Python bindings are not installed here")
    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # no GPU / driver
        pytest.skip(f"TensorRT cannot create a builder here (no GPU?): {exc}")
    return trt


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_real_build_cache_and_parity(tiny_bundle_src, tmp_path, precision):
    _real_trt()
    onnx = tiny_bundle_src / ("model.int8.onnx" if precision == "int8" else "model.onnx")
    engine = load_or_build(onnx, precision, tmp_path, max_batch=8)
    side = read_sidecar(engine)
    assert side["key"]["precision"] == precision and side["key"]["batch_profile"] == "1-2-8"
    assert engine.stat().st_size > 1000 and build.EngineFromPath(engine)() is not None
    assert load_or_build(onnx, precision, tmp_path, max_batch=8) == engine  # cached
    assert list(tmp_path.glob("timing-*.cache"))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_build_via_trtexec(tiny_bundle_src, tmp_path):
    _real_trt()
    if shutil.which("trtexec") is None and not build.Path("/usr/src/tensorrt/bin/trtexec").is_file():
        pytest.skip("trtexec is not installed here")
    engine = load_or_build(tiny_bundle_src / "model.onnx", "fp16", tmp_path, max_batch=8, via="trtexec")
    side = read_sidecar(engine)
    assert side["via"] == "trtexec" and side["performance"]["throughput_qps"] > 0
