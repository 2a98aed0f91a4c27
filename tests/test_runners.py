"""The runner factory tells every model kind apart (edge_tl.device.runners), with the real ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from edge_tl.core.errors import EdgeTLError
from edge_tl.device.runners import ENGINE_SUFFIXES, create_runner, model_kind


@pytest.mark.parametrize(("name", "kind"), [
    ("m.engine", "engine"), ("m.plan", "engine"), ("m.trt", "engine"), ("run/model.pt2", "pt2"),
    ("m.onnx", "onnx"), ("m.int8.onnx", "onnx"), ("bundle", "bundle"), ("bundle.tar.gz", "bundle"),
])
def test_model_kind(name, kind):
    assert model_kind(name) == kind
    assert (kind == "engine") == name.endswith(ENGINE_SUFFIXES)


@pytest.mark.parametrize(("name", "backend", "message"), [
    ("m.engine", "ort-cpu", "is a TensorRT engine; backend 'ort-cpu' cannot run it"),
    ("m.pt2", "ort-cpu", "is a PyTorch program; backend 'ort-cpu' cannot run it"),
])
def test_a_model_kind_refuses_other_backends(tmp_path, name, backend, message):
    path = tmp_path / name
    path.write_bytes(b"x")
    with pytest.raises(EdgeTLError, match=message):
        create_runner(path, backend=backend)


def test_bundle_and_onnx_file_run_on_ort_cpu(tiny_bundle_src, bundle, reference):
    x = bundle.golden_inputs()
    with create_runner(tiny_bundle_src, backend="ort-cpu") as r:  # the bundle's default: int8
        np.testing.assert_allclose(r.infer({"input": x})["logits"], reference(x), rtol=1e-6, atol=1e-6)
    with create_runner(bundle.model_path("int8"), backend="ort-cpu") as r:
        np.testing.assert_allclose(r.infer({"input": x})["logits"], reference(x), rtol=1e-6, atol=1e-6)
