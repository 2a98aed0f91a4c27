"""The serve route handlers (``ServeHandlers``) called one at a time, without a server: each gets a real Starlette
``Request`` built from an ASGI scope and a body, and a real model (the tiny bundle on ONNX Runtime). The whole app
over HTTP is tests/test_serve.py."""

from __future__ import annotations

import asyncio
import io
import json
import os

import numpy as np
import pytest
from bundle_factory import make_tiny_bundle
from PIL import Image
from starlette.requests import Request

from edge_tl.core.bundle import Bundle
from edge_tl.core.layout import DeviceLayout
from edge_tl.device.serve.app import ServeHandlers, parse_top_k, start_manager
from edge_tl.device.serve.config import ServeConfig
from edge_tl.device.serve.metrics import Metrics
from edge_tl.device.serve.models import ModelManager
from edge_tl.device.serve.protocol import HEADER_LENGTH, ProtocolError


def request(method: str, path: str, *, path_params: dict | None = None, query: bytes = b"", body: bytes = b"",
            headers: dict[str, str] | None = None) -> Request:
    """A Starlette request as the router hands it to a handler (body sent in one ASGI message)."""
    headers = {"content-length": str(len(body)), **(headers or {})}
    scope = {"type": "http", "method": method, "path": path, "query_string": query, "path_params": path_params or {},
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return Request(scope, receive)


def serve(config: ServeConfig, scenario):
    """Run ``scenario(handlers)`` on an event loop with the model(s) ``config`` names, then close them."""
    async def main():
        metrics = Metrics()
        handlers = ServeHandlers(config, metrics, start_manager(config, metrics))
        try:
            return await scenario(handlers)
        finally:
            await handlers.manager.aclose()
            handlers.parse_pool.shutdown(wait=True)

    return asyncio.run(main())


@pytest.fixture
def config(tiny_bundle_src) -> ServeConfig:
    return ServeConfig(bundle=tiny_bundle_src, token=None)


def test_health_and_metadata_handlers(config, bundle):
    version = bundle.manifest.bundle_id

    async def scenario(h: ServeHandlers):
        live, ready = await h.live(request("GET", "/v2/health/live")), await h.ready(request("GET", "/v2/health/ready"))
        assert (live.status_code, live.body, ready.status_code, ready.body) == (200, b"", 200, b"")
        meta = json.loads((await h.server_metadata(request("GET", "/v2"))).body)
        assert meta["name"] == "edge-tl" and "classification" in meta["extensions"]
        r = await h.model_metadata(request("GET", "/v2/models/tiny", path_params={"name": "tiny"}))
        assert r.headers["x-model-version"] == version
        assert json.loads(r.body)["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
        cfg = json.loads((await h.model_config(request("GET", "/", path_params={"name": "tiny"}))).body)
        assert cfg["max_batch_size"] == bundle.manifest.max_batch and cfg["output"][0]["dims"] == [4]
        ok = await h.model_ready(request("GET", "/", path_params={"name": "tiny", "version": version}))
        other = await h.model_ready(request("GET", "/", path_params={"name": "tiny", "version": "123"}))
        assert (ok.status_code, other.status_code) == (200, 400)
        with pytest.raises(ProtocolError) as exc:
            await h.model_metadata(request("GET", "/", path_params={"name": "other"}))
        assert exc.value.status == 404 and "unknown model" in exc.value.message
        assert h.manager.current.refs == 0  # every handler released the model, on success and on error
        prom = await h.prometheus(request("GET", "/metrics"))
        assert b"edge_tl" in prom.body

    serve(config, scenario)


def test_infer_handler_json_and_binary(config, bundle, reference):
    x = bundle.golden_inputs()[:2]

    async def scenario(h: ServeHandlers):
        body = json.dumps({"id": "7", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                                  "data": x.ravel().tolist()}]}).encode()
        r = await h.infer(request("POST", "/v2/models/tiny/infer", path_params={"name": "tiny"}, body=body))
        out = json.loads(r.body)
        assert out["id"] == "7" and out["model_version"] == r.headers["x-model-version"]
        got = np.array(out["outputs"][0]["data"], dtype=np.float32).reshape(out["outputs"][0]["shape"])
        np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)

        head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
        r = await h.infer(request("POST", "/", path_params={"name": "tiny"}, body=head + x.tobytes(),
                                  headers={HEADER_LENGTH: str(len(head))}))
        n = int(r.headers[HEADER_LENGTH])
        assert json.loads(r.body[:n])["outputs"][0]["parameters"]["binary_data_size"] == len(r.body) - n
        np.testing.assert_allclose(np.frombuffer(r.body[n:], np.float32).reshape(2, -1), reference(x), rtol=1e-5,
                                   atol=1e-5)
        with pytest.raises(ProtocolError) as exc:  # a bad request releases the model and the byte budget
            await h.infer(request("POST", "/", path_params={"name": "tiny"}, body=b"[1]"))
        assert exc.value.status == 400 and "'inputs'" in exc.value.message
        assert h.manager.current.refs == 0 and h.budget.used == 0

    serve(config, scenario)


def test_classify_handler_and_top_k(config, bundle):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")

    async def scenario(h: ServeHandlers):
        r = await h.classify(request("POST", "/classify", query=b"top_k=2", body=buf.getvalue()))
        out = json.loads(r.body)
        assert out["model_name"] == "tiny" and len(out["predictions"]) == 2
        assert {p["label"] for p in out["predictions"]} <= set(bundle.labels)
        with pytest.raises(ProtocolError, match="top_k"):
            await h.classify(request("POST", "/classify", query="top_k=²".encode(), body=buf.getvalue()))

    serve(config, scenario)
    assert parse_top_k("5") == 5 and parse_top_k("000003") == 3
    for bad in ("0", "-1", "1234567", "²", "5 ", "", "1e3"):
        with pytest.raises(ProtocolError) as exc:
            parse_top_k(bad)
        assert exc.value.status == 400


def test_routes_cover_both_url_forms(config):
    async def scenario(h: ServeHandlers):
        return {(m, p): fn.__name__ for m, p, fn in h.routes()}

    routes = serve(config, scenario)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        assert routes[("GET", prefix)] == "model_metadata" and routes[("POST", prefix + "/infer")] == "infer"
        assert routes[("GET", prefix + "/ready")] == "model_ready"
        assert routes[("GET", prefix + "/config")] == "model_config"
    assert routes[("POST", "/classify")] == "classify" and routes[("GET", "/metrics")] == "prometheus"
    assert len(routes) == 15


def test_start_manager_under_root_waits_then_loads_the_active_version(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    config = ServeConfig(root=root, token=None)

    async def nothing_yet(h: ServeHandlers):
        assert h.manager.current is None and h.manager.loaded_link is None
        assert (await h.ready(request("GET", "/v2/health/ready"))).status_code == 400
        with pytest.raises(ProtocolError) as exc:
            await h.model_metadata(request("GET", "/", path_params={"name": "tiny"}))
        assert exc.value.status == 503

    serve(config, nothing_yet)
    layout = DeviceLayout(root)
    staging = make_tiny_bundle(tmp_path / "staging", tarball=False)
    version = Bundle.open(staging).manifest.bundle_id
    layout.version_dir(version).mkdir(parents=True)
    staging.rename(layout.bundle_dir(version))
    os.symlink(f"versions/{version}", layout.active_link)

    async def loaded(h: ServeHandlers):
        assert isinstance(h.manager, ModelManager) and h.manager.loaded_link == version
        assert h.manager.current.version == version and h.manager.current.bundle.root == layout.bundle_dir(version)
        assert (await h.ready(request("GET", "/v2/health/ready"))).status_code == 200

    serve(config, loaded)
