"""ONNX Runtime never reports CPU numbers under a GPU name.

onnxruntime-gpu lists CUDAExecutionProvider in ``get_available_providers()`` even where the CUDA libraries it
needs are missing; the session then drops the provider and runs on the CPU (microsoft/onnxruntime#13414,
#23372). The same real fallback happens here: a CPU-only ONNX Runtime asked for CUDA creates a CPU session (with
a warning). So these tests use the real onnxruntime; only the *list* of available providers is made to claim
CUDA, as onnxruntime-gpu's does on a machine where CUDA can't load.
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest

from edge_tl.core.errors import EdgeTLError
from edge_tl.device.runtime import onnxrt
from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner


@pytest.fixture
def claims_cuda(monkeypatch):
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime really has CUDA; the fallback can't be provoked here")
    real = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])


def test_cuda_asked_cpu_loaded_is_refused_with_ort_reason(claims_cuda, tiny_bundle_src):
    runner = OnnxRuntimeRunner.from_path(tiny_bundle_src / "model.onnx", backend="ort-cuda")
    with pytest.raises(EdgeTLError) as exc:
        runner.activate()
    text = exc.value.one_line()
    assert "did not load CUDAExecutionProvider" in text and "CPUExecutionProvider" in text
    assert "Specified provider 'CUDAExecutionProvider'" in text  # ONNX Runtime's own reason
    assert not runner.is_active


def test_fallback_only_when_asked_and_then_recorded(claims_cuda, tiny_bundle_src):
    runner = OnnxRuntimeRunner.from_path(tiny_bundle_src / "model.onnx", backend="ort-cuda", allow_fallback=True)
    with runner:
        out = runner.infer(np.zeros((1, 3, 16, 16), np.float32))
        info = runner.describe()
    assert out["logits"].shape == (1, 4)
    assert info["providers"] == ["CPUExecutionProvider"]  # what really ran
    assert info["providers_requested"][0] == "CUDAExecutionProvider"
    assert "CUDAExecutionProvider did not load" in info["fell_back"]


def test_cpu_session_passes_the_check(tiny_bundle_src):
    with OnnxRuntimeRunner.from_path(tiny_bundle_src / "model.onnx", backend="ort-cpu") as runner:
        assert runner.describe()["providers"] == ["CPUExecutionProvider"]
        assert "fell_back" not in runner.describe()


def test_reason_picks_the_provider_line():
    lines = ["something else", "[E:onnxruntime:Default, provider_bridge_ort.cc:1744 TryGetProviderInfo_CUDA] "
             "Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.11: cannot open"]
    assert "libcublasLt.so.11" in onnxrt._provider_reason(lines, "CUDAExecutionProvider")


def test_the_tensorrt_provider_gets_int8_and_its_caches(monkeypatch, tiny_bundle_src, tmp_path):
    """Issue 22, D5: `--backend ort-trt` passed provider names only. A Q/DQ model needs `trt_int8_enable` on
    TensorRT 8.x (microsoft/onnxruntime#13381), and without the engine and timing caches every session rebuilds its
    engine. The real ONNX Runtime here has no TensorRT provider: the list claims it, the session falls back to the
    CPU (allowed here), and what the session was asked for is recorded on the way through."""
    real = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", *real])
    monkeypatch.setenv("EDGE_TL_ORT_TRT_CACHE", str(tmp_path / "trt-cache"))
    asked = []
    real_session = onnxruntime.InferenceSession

    def spy(*args, **kw):
        asked.append(kw.get("providers"))
        return real_session(*args, **kw)

    monkeypatch.setattr(onnxrt.ort, "InferenceSession", spy)
    for model, int8 in (("model.int8.onnx", True), ("model.onnx", False)):
        runner = OnnxRuntimeRunner.from_path(tiny_bundle_src / model, backend="ort-trt", allow_fallback=True)
        with runner:
            assert runner.infer(np.zeros((1, 3, 16, 16), np.float32))
        name, options = asked[-1][0]
        assert name == "TensorrtExecutionProvider" and options["trt_int8_enable"] is int8
        assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
        assert options["trt_engine_cache_path"] == str(tmp_path / "trt-cache")
    assert (tmp_path / "trt-cache").is_dir()
