"""The two model lookups every device command shares: the active deployed version under a root
(``DeviceLayout.active``, used by infer, serve and serve's hot reload) and a bundle's ONNX model for a precision
(``runners.resolve_model``, used by the runner factory and ``engine build``)."""

from __future__ import annotations

import os
import shutil

import pytest

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.layout import ActiveVersion, DeviceLayout
from edge_tl.device.infer import resolve_bundle
from edge_tl.device.runners import resolve_model


def test_active_version_reads_the_link_once(tmp_path, tiny_bundle_src, bundle):
    layout = DeviceLayout(tmp_path)
    assert layout.active() is None and layout.active_bundle_dir() is None
    with pytest.raises(EdgeTLError, match="no active model"):
        resolve_bundle(None, tmp_path)
    version = bundle.manifest.bundle_id
    os.symlink(f"versions/{version}", layout.active_link)
    assert layout.active() == ActiveVersion(version, tmp_path / "versions" / version / "bundle",
                                            tmp_path / "versions" / version / "engine")
    with pytest.raises(EdgeTLError, match="no active model"):  # the link points to nothing (yet)
        resolve_bundle(None, tmp_path)
    shutil.copytree(tiny_bundle_src, layout.bundle_dir(version))
    found, engine_dir, gated = resolve_bundle(None, tmp_path)
    assert (found.root, engine_dir, gated) == (layout.bundle_dir(version), layout.engine_dir(version), None)
    # the precision deploy --precision gated is what infer/serve --root run, not the manifest's default (D4)
    (layout.version_dir(version) / "deploy.json").write_text('{"precision": "fp32", "status": "active"}')
    assert layout.active().precision == "fp32" and resolve_bundle(None, tmp_path)[2] == "fp32"
    assert layout.active_bundle_dir() == layout.bundle_dir(version)
    assert resolve_bundle(tiny_bundle_src, None)[1] is None
    with pytest.raises(EdgeTLError, match="exactly one of"):
        resolve_bundle(tiny_bundle_src, tmp_path)


@pytest.mark.parametrize(("precision", "model_file", "back"), [
    (None, "model.int8.onnx", "int8"),  # the tiny bundle's default_precision
    ("fp32", "model.onnx", "fp32"), ("fp16", "model.onnx", "fp16"),
    ("int8", "model.int8.onnx", "int8"), ("best", "model.int8.onnx", "best"),
])
def test_resolve_model_picks_the_bundle_model_for_a_precision(tiny_bundle_src, bundle, precision, model_file, back):
    assert bundle.manifest.default_precision == "int8"
    path, got, opened = resolve_model(tiny_bundle_src, precision)
    assert (path.name, got, opened.root) == (model_file, back, tiny_bundle_src)
    assert resolve_model(bundle, precision)[:2] == (path, back)


def test_resolve_model_for_a_bare_onnx_file(tmp_path, tiny_bundle_src):
    onnx = shutil.copy(tiny_bundle_src / "model.int8.onnx", tmp_path / "m.int8.onnx")
    assert resolve_model(onnx, None) == (onnx, "int8", None)
    assert resolve_model(onnx, "fp16") == (onnx, "fp16", None)
    plain = shutil.copy(tiny_bundle_src / "model.onnx", tmp_path / "m.onnx")
    assert resolve_model(plain, None) == (plain, "fp32", None)
    with pytest.raises(EdgeTLError, match="does not exist"):
        resolve_model(tmp_path / "missing.onnx", None)


def test_serve_and_infer_under_a_root_run_the_gated_precision(tmp_path, tiny_bundle_src, bundle, capsys):
    """Issue 22, D4: `deploy --precision fp32` gated fp32, but serve --root ran the manifest's default (int8)."""
    import json

    from edge_tl.device.serve.app import start_manager
    from edge_tl.device.serve.config import ServeConfig
    from edge_tl.device.serve.metrics import Metrics

    layout = DeviceLayout(tmp_path)
    version = bundle.manifest.bundle_id
    shutil.copytree(tiny_bundle_src, layout.bundle_dir(version))
    (layout.version_dir(version) / "deploy.json").write_text(json.dumps({"precision": "fp32"}))
    os.symlink(f"versions/{version}", layout.active_link)
    manager = start_manager(ServeConfig(root=tmp_path, token=None, backend="ort-cpu"), Metrics())
    try:
        assert manager.current.precision == "fp32" and bundle.manifest.default_precision == "int8"
    finally:
        manager.current.runner.deactivate()
