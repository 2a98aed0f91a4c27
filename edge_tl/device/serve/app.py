"""The FastAPI app: Open Inference Protocol routes, image classification, metrics, auth and limits.

Every error leaves as ``{"error": "..."}`` with a 4xx status (5xx only when the runner itself fails), so a
bad request never kills a worker. Routes exist with and without ``/versions/{version}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from edge_tl import __version__
from edge_tl.core.drift import input_signals
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.importer import require
from edge_tl.core.layout import DeviceLayout
from edge_tl.device.infer import top_k
from edge_tl.device.serve.config import ServeConfig
from edge_tl.device.serve.images import decode_image
from edge_tl.device.serve.metrics import Metrics
from edge_tl.device.serve.models import LoadedModel, ModelManager, load_model
from edge_tl.device.serve.protocol import HEADER_LENGTH, ProtocolError, encode_infer_response, parse_infer_request

log = logging.getLogger("edge_tl.device.serve")

PUBLIC_PATHS = {"/v2/health/live", "/v2/health/ready"}
_TOP_K = re.compile(r"[0-9]{1,6}")
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "edge_tl_classify_image"]


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None):
    from starlette.responses import Response

    return Response(json.dumps(obj, separators=(",", ":")).encode(), status, headers, media_type="application/json")


def _endpoint(path: str) -> str:
    """A low-cardinality label for the metrics."""
    for suffix in ("/infer", "/classify", "/ready", "/config", "/live"):
        if path.endswith(suffix):
            return suffix[1:]
    if path == "/metrics":
        return "metrics"
    return "metadata" if path.startswith("/v2") else "other"


class GuardMiddleware:
    """Pure ASGI (cheap): bearer token, the Content-Length limit, request metrics, and a JSON 500 for any
    exception that escaped the handlers (the process keeps serving)."""

    def __init__(self, app, *, token: str | None, max_bytes: int, metrics: Metrics):
        self.app = app
        self.token = f"Bearer {token}".encode() if token else None
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        start = time.perf_counter()
        state = {"status": 500, "started": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                timing = f"app;dur={(time.perf_counter() - start) * 1e3:.3f}".encode()  # W3C Server-Timing
                message = {**message, "headers": [*message.get("headers", ()), (b"server-timing", timing)]}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await refusal(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            log.exception("unhandled error on %s", path)
            if not state["started"]:
                await _json({"error": f"internal error: {type(exc).__name__}"}, 500)(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            endpoint, code = _endpoint(path), str(state["status"])
            self.metrics.requests.labels(endpoint, code).inc()
            if state["status"] >= 400:
                self.metrics.errors.labels(endpoint, code).inc()
            self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - start)

    def _refusal(self, scope, path: str):
        headers = dict(scope["headers"])
        if self.token is not None and path not in PUBLIC_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.token):
                return _json({"error": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"}, 401,
                             {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return _json({"error": "Content-Length is not an integer"}, 400)
            if size > self.max_bytes:
                return _json({"error": f"request body of {size} bytes is over the limit of {self.max_bytes} "
                                       "(--max-request-bytes)"}, 413)
        return None


class ByteBudget:
    """Bounds the request bytes held at once across requests (``--max-inflight-bytes``).

    A request reserves the bytes of its body *as they arrive* (issue 24: reserving the Content-Length, or
    ``--max-request-bytes`` for a chunked request, before anything came let one stalled request starve every other)
    and keeps them until its response is ready. A chunk that does not fit waits, the rest of its body left in the
    kernel's socket buffers; one request larger than the whole budget runs alone. Waiting longer than
    ``timeout_s`` is a 503."""

    def __init__(self, limit: int, timeout_s: float):
        self.limit, self.timeout_s, self.used = limit, timeout_s, 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def _take(self, lease: _Lease, n: int) -> None:
        cond = self._condition()
        async with cond:
            try:  # fits, or this request would hold everything alone (a body larger than the budget)
                await asyncio.wait_for(cond.wait_for(
                    lambda: self.used + n <= self.limit or self.used == lease.held), self.timeout_s)
            except asyncio.TimeoutError:
                raise ProtocolError(503, f"the server is busy with {self.used} bytes of requests (--max-inflight-bytes "
                                         f"{self.limit}); retry later") from None
            self.used += n
            lease.held += n

    @asynccontextmanager
    async def hold(self, nbytes: int = 0):
        """A lease on the budget, with ``nbytes`` reserved at once (0: grow it as the body arrives)."""
        lease = _Lease(self)
        try:
            if nbytes > 0:
                await self._take(lease, min(nbytes, self.limit))
            yield lease
        finally:
            cond = self._condition()
            async with cond:
                self.used -= lease.held
                lease.held = 0
                cond.notify_all()


class _Lease:
    def __init__(self, budget: ByteBudget):
        self.budget, self.held = budget, 0

    async def grow(self, n: int) -> None:
        """Reserve ``n`` more bytes (a chunk that arrived), waiting while they do not fit."""
        if n > 0:
            await self.budget._take(self, n)


async def read_body(request, limit: int, timeout_s: float | None = None, lease: _Lease | None = None) -> bytes:
    """The body, at most ``limit`` bytes (413 beyond), inflated when sent with gzip/deflate Content-Encoding.
    A body that takes longer than ``timeout_s`` to arrive is a 408 (slow senders can't hold a request forever).
    ``lease``: the request's share of the byte budget, grown by each chunk as it arrives."""
    from starlette.requests import ClientDisconnect

    chunks: list[bytes] = []
    size = 0
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > limit:  # said up front: refused before anything is read
        raise ProtocolError(413, f"request body is over the limit of {limit} bytes (--max-request-bytes)")

    async def receive_all() -> None:
        nonlocal size
        async for chunk in request.stream():
            end = size + len(chunk)
            if end > limit:
                raise ProtocolError(413, f"request body is over the limit of {limit} bytes (--max-request-bytes)")
            if lease is not None:
                await lease.grow(len(chunk))
            chunks.append(chunk)
            size = end

    try:
        await asyncio.wait_for(receive_all(), timeout_s)
    except ClientDisconnect:
        raise ProtocolError(400, "the client disconnected before sending the whole body") from None
    except asyncio.TimeoutError:
        raise ProtocolError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(400, f"unsupported Content-Encoding '{encoding}' (use gzip, deflate or none)")
    return await asyncio.get_running_loop().run_in_executor(None, _inflate, body, encoding, limit)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(400, f"the {encoding} body is corrupt: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise ProtocolError(413, f"decompressed request body is over the limit of {limit} bytes")
    return data


async def _protocol_error(request, exc: ProtocolError):
    return _json({"error": exc.message}, exc.status)


async def _user_error(request, exc: EdgeTLError):
    return _json({"error": exc.one_line()}, 400)


async def _http_error(request, exc):
    return _json({"error": str(exc.detail)}, exc.status_code)


async def _validation_error(request, exc):
    return _json({"error": f"malformed request: {exc.errors()[0].get('msg', 'invalid')}"}, 400)


def _ready_response(ok: bool):
    from starlette.responses import Response

    return Response(status_code=200 if ok else 400)  # as Triton: an empty body, 200 or 400


def _name_version(request) -> tuple[str | None, str | None]:
    params = request.path_params
    return params.get("name"), params.get("version")


def parse_top_k(raw_k: str) -> int:
    """The ``top_k`` query parameter of /classify: a positive integer of at most 6 ASCII digits (400 otherwise)."""
    if not _TOP_K.fullmatch(raw_k) or int(raw_k) < 1:  # ASCII digits only: int() refuses '²' and 5000 digits
        raise ProtocolError(400, f"top_k must be a positive integer (at most 6 digits), got {raw_k[:20]!r}")
    return int(raw_k)


def start_manager(config: ServeConfig, metrics: Metrics) -> ModelManager:
    """A model manager holding the model to serve first: the bundle, or the active one under --root (none yet is
    fine: the watcher loads the first deploy). Raises EdgeTLError when that model cannot load."""
    if config.bundle is not None:
        return ModelManager(config, metrics, load_model(config.bundle, config, metrics))
    active = DeviceLayout(config.root).active()
    if active is None:
        log.warning("nothing is active under %s yet; waiting for a deploy", config.root)
        return ModelManager(config, metrics, None)
    initial = load_model(active.bundle_dir, config, metrics, active.engine_dir, active.precision)
    return ModelManager(config, metrics, initial, active.version)


class ServeHandlers:
    """The server's state (the model manager, metrics, limits, the JSON parse pool) and one method per route.

    Each route method takes a Starlette ``Request`` and returns a ``Response`` or raises :class:`ProtocolError` /
    :class:`EdgeTLError` (the app's exception handlers turn those into ``{"error": ...}``)."""

    def __init__(self, config: ServeConfig, metrics: Metrics, manager: ModelManager):
        self.config, self.metrics, self.manager = config, metrics, manager
        self.budget = ByteBudget(config.max_inflight_bytes, config.body_timeout_s)
        self.parse_pool = ThreadPoolExecutor(2, thread_name_prefix="edge-tl-parse")  # JSON off the event loop
        # --capture: one writer thread, off the request's path (a slow disk never delays an answer)
        self.capture_pool = ThreadPoolExecutor(1, thread_name_prefix="edge-tl-capture") if config.capture else None
        self._capturers: dict[str, Any] = {}
        if config.capture is not None:  # an unusable folder fails before anything listens
            try:
                Path(config.capture).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise EdgeTLError(f"cannot create the capture folder {config.capture} ({exc.strerror or exc})",
                                  "give a writable folder to --capture") from exc
            if not os.access(config.capture, os.W_OK):
                raise EdgeTLError(f"the capture folder {config.capture} is not writable",
                                  "give a writable folder to --capture")

    @asynccontextmanager
    async def lifespan(self, app):
        watcher = asyncio.get_running_loop().create_task(self.manager.watch()) if self.config.root else None
        yield
        if watcher is not None:
            watcher.cancel()
        await self.manager.aclose()
        self.parse_pool.shutdown(wait=False, cancel_futures=True)
        if self.capture_pool is not None:
            self.capture_pool.shutdown(wait=True)  # the pictures being written are finished, not cut
        log.info("server stopped")

    def routes(self) -> list[tuple[str, str, Any]]:
        """(method, path, handler) of every route, with and without ``/versions/{version}``."""
        routes = [("GET", "/v2/health/live", self.live), ("GET", "/v2/health/ready", self.ready),
                  ("GET", "/v2", self.server_metadata), ("GET", "/metrics", self.prometheus),
                  ("POST", "/classify", self.classify)]
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [("GET", prefix, self.model_metadata), ("GET", prefix + "/ready", self.model_ready),
                       ("GET", prefix + "/config", self.model_config), ("POST", prefix + "/infer", self.infer),
                       ("POST", prefix + "/classify", self.classify)]
        return routes

    async def live(self, request):
        return _ready_response(True)

    async def ready(self, request):
        return _ready_response(self.manager.current is not None)

    async def server_metadata(self, request):
        return _json({"name": "edge-tl", "version": __version__, "extensions": EXTENSIONS})

    async def prometheus(self, request):
        from starlette.responses import Response

        model = self.manager.current
        self.metrics.set_drift(model.drift.status() if model is not None and model.drift is not None else None)
        data, content_type = self.metrics.render()
        return Response(data, media_type=content_type)

    def _with_model(self, request, fn):
        model = self.manager.acquire(*_name_version(request))
        try:
            return _json(fn(model), headers={"X-Model-Version": model.version})
        finally:
            self.manager.release(model)

    async def model_metadata(self, request):
        return self._with_model(request, lambda m: m.metadata(self.manager.name_of(m)))

    async def model_config(self, request):
        return self._with_model(request, lambda m: m.model_config(self.manager.name_of(m)))

    async def model_ready(self, request):
        try:
            self._with_model(request, lambda m: {})
        except ProtocolError:
            return _ready_response(False)
        return _ready_response(True)

    async def infer(self, request):
        from starlette.responses import Response

        name, version = _name_version(request)
        loop = asyncio.get_running_loop()
        async with self.budget.hold() as lease:  # grown by the body's bytes as they arrive
            body = await read_body(request, self.config.max_request_bytes, self.config.body_timeout_s, lease)
            model = self.manager.acquire(name, version)
            try:
                req = await loop.run_in_executor(self.parse_pool, parse_infer_request, body,
                                                 request.headers.get(HEADER_LENGTH), model.signature(name))
                del body
                outputs = await model.infer(req.inputs)
                if model.drift is not None and model.input_name in req.inputs and model.output_name in outputs:
                    conf = model.bundle.postprocess.scores(outputs[model.output_name]).max(axis=1)
                    signals = input_signals(req.inputs[model.input_name])
                    for i, c in enumerate(conf):
                        model.drift.observe(confidence=float(c), **{k: float(v[i]) for k, v in signals.items()})
                content, header_length = await loop.run_in_executor(
                    self.parse_pool, encode_infer_response, name, model.version, req, outputs, model.labels)
            finally:
                self.manager.release(model)
        headers = {"X-Model-Version": model.version}
        if header_length is None:
            return Response(content, headers=headers, media_type="application/json")
        headers[HEADER_LENGTH] = str(header_length)
        return Response(content, headers=headers, media_type="application/octet-stream")

    def _prepare(self, model: LoadedModel, body: bytes):
        return model.bundle.preprocessor(decode_image(body, self.config.max_image_pixels))[None]

    async def classify(self, request):
        name, version = _name_version(request)
        k = parse_top_k(request.query_params.get("top_k", "5"))
        async with self.budget.hold() as lease:  # grown by the body's bytes as they arrive
            return await self._classify(request, name, version, k, lease)

    async def _classify(self, request, name, version, k: int, lease: _Lease):
        body = await read_body(request, self.config.max_request_bytes, self.config.body_timeout_s, lease)
        model = self.manager.acquire(name, version)
        try:
            start = time.perf_counter()
            x = await asyncio.get_running_loop().run_in_executor(None, self._prepare, model, body)
            logits = (await model.infer({model.input_name: x}))[model.output_name]
            probs = model.bundle.postprocess.scores(logits)[0]  # calibrated
            preds = top_k(probs, model.labels, k)
            ood = model.bundle.postprocess.ood_fields(logits[0])  # ood_score, unknown (with a rule)
            if model.drift is not None:
                model.drift.observe(confidence=float(probs.max()),
                                    **{k: float(v[0]) for k, v in input_signals(x).items()})
            self.metrics.answers.labels(str(ood["unknown"]).lower() if ood else "none").inc()
            if self.capture_pool is not None:
                self._capture(model, probs, body, request.client, ood)
            result = {"model_name": self.manager.name_of(model), "model_version": model.version,
                      "predictions": preds, **ood,
                      "latency_ms": round((time.perf_counter() - start) * 1e3, 3)}
        finally:
            self.manager.release(model)
        return _json(result, headers={"X-Model-Version": model.version})


    def _capture(self, model: LoadedModel, probs, body: bytes, client, ood: dict | None) -> None:
        """--capture: decide here, on the request's path (two score comparisons and a draw, edge_tl.device.capture),
        and hand only a picture kept to the writer thread: a handoff per request cost a third of serve's p50 on
        2 cores (benchmarks/bench_capture.py). The first request of a model version makes its Capturer (which
        reads the folder) on the writer thread."""
        source = f"serve:{client.host if client else '?'}"
        cap = self._capturers.get(model.version)
        if cap is None:
            self.capture_pool.submit(self._first_capture, model, probs, body, source, ood)
            return
        try:
            why = cap.decide(probs, ood)
        except Exception as exc:  # noqa: BLE001 - capture never takes inference down
            log.warning("capture failed: %s", exc)
            return
        if why:
            self.capture_pool.submit(self._keep, cap, why, probs, body, source, ood)

    def _first_capture(self, model: LoadedModel, probs, body: bytes, source: str, ood: dict | None) -> None:
        from edge_tl.device.capture import CapturePolicy, Capturer

        try:
            cap = self._capturers.get(model.version)
            if cap is None:
                cap = self._capturers[model.version] = Capturer(
                    self.config.capture, self.config.capture_policy or CapturePolicy(), model.version, model.labels)
            why = cap.decide(probs, ood)
        except Exception as exc:  # noqa: BLE001 - capture never takes inference down
            log.warning("capture failed: %s", exc)
            return
        if why:
            self._keep(cap, why, probs, body, source, ood)

    def _keep(self, cap, why: str, probs, body: bytes, source: str, ood: dict | None) -> None:
        try:
            kept = cap.keep(why, probs, source=source, data=body, ood=ood)
        except Exception as exc:  # noqa: BLE001 - capture never takes inference down
            log.warning("capture failed: %s", exc)
            return
        if kept:
            self.metrics.captured.labels(kept).inc()


def create_app(config: ServeConfig, metrics: Metrics | None = None):
    """Load the model (raises EdgeTLError before anything listens) and build the app."""
    fastapi = require("fastapi", "edge-tl serve")
    from starlette.exceptions import HTTPException as StarletteHTTPException

    metrics = metrics or Metrics()
    handlers = ServeHandlers(config, metrics, start_manager(config, metrics))
    app = fastapi.FastAPI(title="edge-tl serve", version=__version__, lifespan=handlers.lifespan, docs_url=None,
                          redoc_url=None, openapi_url=None)
    app.state.manager = handlers.manager
    app.state.metrics = metrics
    app.state.config = config
    app.state.handlers = handlers
    app.add_exception_handler(ProtocolError, _protocol_error)
    app.add_exception_handler(EdgeTLError, _user_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(fastapi.exceptions.RequestValidationError, _validation_error)
    for method, path, fn in handlers.routes():
        app.add_route(path, fn, methods=[method], include_in_schema=False)  # plain Starlette routes: cheap
    app.add_middleware(GuardMiddleware, token=config.token, max_bytes=config.max_request_bytes, metrics=metrics)
    return app
