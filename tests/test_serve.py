"""`edge-tl serve`: a real uvicorn server on a loopback port, real clients (httpx and tritonclient.http)."""

from __future__ import annotations

import gzip
import io
import json
import struct
import threading
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from edge_tl.device.serve.config import ServeConfig
from edge_tl.device.serve.server import ThreadedServer

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def server(tiny_bundle_src):
    with ThreadedServer(ServeConfig(bundle=tiny_bundle_src, port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def guarded(tiny_bundle_src):
    """Token, a small body limit, a small pixel limit and dynamic batching."""
    cfg = ServeConfig(bundle=tiny_bundle_src, port=0, token=TOKEN, max_request_bytes=64 * 1024,
                      max_image_pixels=100_000, max_batch=8, max_delay_ms=50)
    with ThreadedServer(cfg) as srv:
        yield srv


def triton(srv):
    import tritonclient.http as th

    return th, th.InferenceServerClient(srv.url.removeprefix("http://"))


def json_request(x: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}


def test_health_and_metadata_shapes(server, bundle):
    version = bundle.manifest.bundle_id
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/tiny/ready",
                 f"/v2/models/tiny/versions/{version}/ready"):
        r = httpx.get(server.url + path)
        assert (r.status_code, r.content) == (200, b"")
    meta = httpx.get(server.url + "/v2").json()
    assert meta["name"] == "edge-tl" and "binary_tensor_data" in meta["extensions"] and meta["version"]
    r = httpx.get(server.url + "/v2/models/tiny")
    assert r.headers["x-model-version"] == version
    assert r.json() == {"name": "tiny", "versions": [version], "platform": "onnxruntime_onnx",
                        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}],
                        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}],
                        "parameters": {"bundle_id": version, "precision": "int8", "training_failed": False}}
    assert httpx.get(server.url + f"/v2/models/tiny/versions/{version}").json()["versions"] == [version]
    cfg = httpx.get(server.url + "/v2/models/tiny/config").json()
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["dims"] == [3, 16, 16]
    r = httpx.get(server.url + "/v2/models/other")
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    r = httpx.get(server.url + "/v2/models/tiny/versions/123")
    assert r.status_code == 404 and "version 123" in r.json()["error"]
    assert httpx.get(server.url + "/v2/models/other/ready").status_code == 400
    r = httpx.get(server.url + "/no/such/path")
    assert r.status_code == 404 and "error" in r.json()


def test_infer_json_matches_onnxruntime(server, bundle, reference):
    x = bundle.golden_inputs()
    r = httpx.post(server.url + "/v2/models/tiny/infer", json=json_request(x, id="req-7"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "tiny" and body["model_version"] == bundle.manifest.bundle_id
    assert body["id"] == "req-7" and r.headers["x-model-version"] == bundle.manifest.bundle_id
    assert float(r.headers["server-timing"].removeprefix("app;dur=")) > 0
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [6, 4]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(6, 4), reference(x), rtol=1e-6, atol=1e-6)
    # nested lists are accepted too, as Triton does
    nested = {"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": x[:1].tolist()}]}
    r = httpx.post(server.url + f"/v2/models/tiny/versions/{bundle.manifest.bundle_id}/infer", json=nested)
    np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]), reference(x[:1]).ravel(), atol=1e-6)


def test_tritonclient_binary_json_and_classification(server, bundle, reference):
    th, client = triton(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert client.get_model_metadata("tiny")["platform"] == "onnxruntime_onnx"
    assert client.get_model_config("tiny")["max_batch_size"] == 8
    x = bundle.golden_inputs()
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary by default
    res = client.infer("tiny", [inp])
    assert res.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 6 * 4 * 4
    np.testing.assert_array_equal(res.as_numpy("logits"), reference(x))
    assert res.get_response()["model_version"] == bundle.manifest.bundle_id
    # JSON input, JSON output, pinned version
    inp = th.InferInput("input", [2, 3, 16, 16], "FP32")
    inp.set_data_from_numpy(x[:2], binary_data=False)
    res = client.infer("tiny", [inp], model_version=bundle.manifest.bundle_id,
                       outputs=[th.InferRequestedOutput("logits", binary_data=False)])
    np.testing.assert_allclose(res.as_numpy("logits"), reference(x[:2]), atol=1e-6)
    # classification extension: "value:index:label"
    res = client.infer("tiny", [inp], outputs=[th.InferRequestedOutput("logits", class_count=2)])
    got = res.as_numpy("logits")
    ref = reference(x[:2])
    assert got.shape == (2, 2)
    for row, logits in zip(got, ref, strict=True):
        best = int(np.argmax(logits))
        value, index, label = row[0].decode().split(":")
        assert (int(index), label) == (best, bundle.labels[best])
        assert float(value) == pytest.approx(float(logits[best]), abs=1e-5)
    # a wrong shape surfaces as the client's own exception with the server's message
    from tritonclient.utils import InferenceServerException

    bad = th.InferInput("input", [1, 3, 8, 8], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match="unexpected shape"):
        client.infer("tiny", [bad])


def _binary_body(x: np.ndarray, size: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": size or x.nbytes}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


X1 = np.zeros((1, 3, 16, 16), np.float32)


@pytest.mark.parametrize("body,headers,needle", [
    (json.dumps(json_request(np.zeros((1, 3, 15, 16), np.float32))).encode(), {}, "unexpected shape"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "INT32",
                             "data": [0] * 768}]}).encode(), {}, "data-type is 'INT32'"),
    (json.dumps(json_request(np.zeros((9, 3, 16, 16), np.float32))).encode(), {}, "batch-size must be <= 8"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32",
                             "data": [1.0] * 10}]}).encode(), {}, "has 10 values"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32",
                             "data": ["a"] * 768}]}).encode(), {}, "not numbers"),
    (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1]}]}).encode(), {},
     "unexpected inference input 'image'"),
    (json.dumps({"inputs": []}).encode(), {}, "non-empty 'inputs'"),
    (b"{not json", {}, "not valid JSON"),
    (b"[1, 2]", {}, "JSON object"),
    (_binary_body(X1, size=100)[0], _binary_body(X1, size=100)[1], "binary_data_size 100"),
    (_binary_body(X1)[0] + b"xx", _binary_body(X1)[1], "belong to no input"),
    (_binary_body(X1)[0], {"Inference-Header-Content-Length": "999999"}, "outside the body"),
    (json.dumps({**json_request(X1), "outputs": [{"name": "probs"}]}).encode(), {}, "output 'probs'"),
])
def test_malformed_requests_get_400_with_protocol_error(server, body, headers, needle):
    r = httpx.post(server.url + "/v2/models/tiny/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_binary_infer_raw_http(server, reference):
    x = np.random.default_rng(3).normal(size=(3, 3, 16, 16)).astype(np.float32)
    body, headers = _binary_body(x)
    req = json.loads(body[:int(headers["Inference-Header-Content-Length"])])
    req["outputs"] = [{"name": "logits", "parameters": {"binary_data": True}}]
    head = json.dumps(req).encode()
    r = httpx.post(server.url + "/v2/models/tiny/infer", content=head + x.tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 48
    np.testing.assert_array_equal(np.frombuffer(r.content[n:], np.float32).reshape(3, 4), reference(x))


def test_classify_endpoint(server, bundle, reference):
    img = Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    expected = reference(bundle.preprocessor(img)[None])[0]
    for path in ("/v2/models/tiny/classify?top_k=3", "/classify?top_k=3"):
        r = httpx.post(server.url + path, content=buf.getvalue(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == bundle.manifest.bundle_id and len(body["predictions"]) == 3
        top = body["predictions"][0]
        assert top["index"] == int(np.argmax(expected)) and top["label"] == bundle.labels[top["index"]]
        probs = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
        assert top["score"] == pytest.approx(float(probs.max()), abs=1e-5)
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    for content, needle in ((b"", "empty"), (truncated, "cannot decode"), (b"hello", "not an image")):
        r = httpx.post(server.url + "/classify", content=content)
        assert r.status_code == 400 and needle in r.json()["error"], r.text
    assert httpx.post(server.url + "/classify?top_k=0", content=buf.getvalue()).status_code == 400


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _fake_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_token_limits_and_bombs(guarded):
    url = guarded.url
    # health stays open; everything else needs the token
    assert httpx.get(url + "/v2/health/ready").status_code == 200
    for headers in ({}, auth("wrong-token-xxxx"), {"Authorization": TOKEN}):
        r = httpx.get(url + "/v2/models/tiny", headers=headers)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/v2/models/tiny", headers=auth()).status_code == 200
    assert httpx.get(url + "/metrics").status_code == 401
    # request bytes: by Content-Length, and a gzip body that inflates past the limit
    big = json.dumps(json_request(np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32))).encode()
    assert len(big) > 64 * 1024
    r = httpx.post(url + "/v2/models/tiny/infer", content=big, headers=auth())
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]
    r = httpx.post(url + "/v2/models/tiny/infer", content=iter([big[:40_000], big[40_000:]]), headers=auth())
    assert "content-length" not in r.request.headers  # chunked: the limit is enforced while reading
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]
    r = httpx.post(url + "/v2/models/tiny/infer", content=gzip.compress(b" " * 2_000_000),
                   headers={**auth(), "Content-Encoding": "gzip"})
    assert r.status_code == 413 and "decompressed" in r.json()["error"]
    small = json.dumps(json_request(X1)).encode()
    r = httpx.post(url + "/v2/models/tiny/infer", content=gzip.compress(small),
                   headers={**auth(), "Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 4]
    # images: too many pixels (real image, then a header-only bomb) are refused before decoding
    r = httpx.post(url + "/classify", content=_png(400, 300), headers=auth())
    assert r.status_code == 413 and "120000 pixels" in r.json()["error"]
    r = httpx.post(url + "/classify", content=_fake_png_header(5000, 5000), headers=auth())
    assert r.status_code == 413 and "25000000 pixels" in r.json()["error"]
    r = httpx.post(url + "/classify", content=_fake_png_header(100_000, 100_000), headers=auth())
    assert r.status_code == 413 and "decompression bomb" in r.json()["error"]
    r = httpx.post(url + "/classify", content=_png(200, 100), headers=auth())
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4


def test_dynamic_batching_groups_requests(guarded, bundle, reference):
    x = np.random.default_rng(11).normal(size=(8, 3, 16, 16)).astype(np.float32)
    barrier = threading.Barrier(8)
    results: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        with httpx.Client(headers=auth()) as c:
            barrier.wait()
            r = c.post(guarded.url + "/v2/models/tiny/infer", json=json_request(x[i:i + 1]))
            results[i] = np.array(r.json()["outputs"][0]["data"], np.float32)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ref = reference(x)
    for i in range(8):
        np.testing.assert_allclose(results[i], ref[i], atol=1e-5)
    text = httpx.get(guarded.url + "/metrics", headers=auth()).text
    count = float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("edge_tl_batch_size_count")))
    total = float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("edge_tl_batch_size_sum")))
    assert total / count > 1.0  # at least one runner call carried several requests


def test_metrics_exposed(server):
    httpx.post(server.url + "/v2/models/tiny/infer", json=json_request(X1))
    httpx.post(server.url + "/v2/models/tiny/infer", content=b"{bad")
    text = httpx.get(server.url + "/metrics").text
    assert 'edge_tl_requests_total{code="200",endpoint="infer"}' in text
    assert 'edge_tl_request_errors_total{code="400",endpoint="infer"}' in text
    for name in ("edge_tl_request_latency_seconds_bucket", "edge_tl_inference_latency_seconds_count",
                 "edge_tl_queue_depth", 'edge_tl_model_info{backend="ort-cpu",name="tiny",precision="int8"'):
        assert name in text
    errors = float(next(ln.split()[-1] for ln in text.splitlines()
                        if ln.startswith('edge_tl_request_errors_total{code="400",endpoint="infer"}')))
    assert errors >= 1
