"""The model(s) a server holds, and hot reload of the active deployed model.

A :class:`LoadedModel` is a verified bundle with an activated runner and its dispatcher. Requests
``acquire()`` the current model and ``release()`` it when done (a reference count, kept on the event loop
thread, so no locks). With ``--root``, :meth:`ModelManager.watch` polls the ``active`` link; when it points to
a new version, that model is loaded beside the old one (in a thread), then swapped in between requests. The
old model keeps serving the requests that already hold it and is closed once the last one releases it.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.core.bundle import Bundle
from edge_tl.core.drift import DriftMonitor
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.layout import DeviceLayout
from edge_tl.core.signing import enforce as enforce_signature
from edge_tl.device.engine.cache import EngineCache
from edge_tl.device.runners import create_runner
from edge_tl.device.runtime.base import BaseRunner
from edge_tl.device.serve.batching import Dispatcher, DynamicBatcher, Feed
from edge_tl.device.serve.config import ServeConfig
from edge_tl.device.serve.metrics import Metrics
from edge_tl.device.serve.protocol import ProtocolError, Signature, TensorSig

log = logging.getLogger("edge_tl.device.serve")

_DATATYPE = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8",
             "int8": "INT8"}


def _dims(shape: list[int | str]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in shape)


class LoadedModel:
    def __init__(self, bundle: Bundle, runner: BaseRunner, config: ServeConfig, metrics: Metrics, precision: str):
        m = bundle.manifest
        self.bundle = bundle
        self.runner = runner
        self.metrics = metrics
        self.version = m.bundle_id
        self.precision = precision
        self.labels = bundle.labels
        self.refs = 0
        self.input_name, self.output_name = m.input.name, m.output.name
        self.platform = "tensorrt_plan" if runner.backend == "tensorrt" else "onnxruntime_onnx"
        self.inputs = (TensorSig(m.input.name, _DATATYPE.get(m.input.dtype, m.input.dtype), _dims(m.input.shape)),)
        self.outputs = (TensorSig(m.output.name, _DATATYPE.get(m.output.dtype, m.output.dtype),
                                  _dims(m.output.shape)),)
        self.max_batch = m.max_batch
        ref = bundle.postprocess.drift
        self.drift = DriftMonitor(ref) if ref is not None else None  # edge_tl.core.drift
        self.executor = ThreadPoolExecutor(config.workers, thread_name_prefix=f"infer-{self.version[:8]}")
        if config.batching:
            self.dispatcher: Dispatcher = DynamicBatcher(self._run, self.executor, metrics, max_batch=config.max_batch,
                                                         max_delay_s=config.max_delay_ms / 1e3,
                                                         workers=config.workers)
        else:
            self.dispatcher = Dispatcher(self._run, self.executor, metrics)
        self.config = config

    def signature(self, name: str) -> Signature:
        return Signature(name, self.inputs, self.outputs, self.max_batch)

    def _run(self, feed: Feed) -> Feed:
        out = self.runner.infer(feed)
        self.metrics.inference_latency.observe((self.runner.last_inference_ns or 0) / 1e9)
        self.metrics.batch_size.observe(next(iter(feed.values())).shape[0])
        return out

    async def infer(self, feed: Feed) -> Feed:
        try:
            return await self.dispatcher.submit(feed)
        except EdgeTLError as exc:
            raise ProtocolError(400, exc.one_line()) from None
        except Exception as exc:  # a runner failure: this request fails, the server goes on
            log.exception("inference failed on model %s", self.version)
            raise ProtocolError(500, f"inference failed: {type(exc).__name__}: {exc}") from None

    def metadata(self, name: str) -> dict[str, Any]:
        """KServe v2 model metadata, plus ``parameters`` (an extension the protocol allows): the precision and,
        where the build found the model no better than guessing, ``training_failed`` with why."""
        problems = self.bundle.manifest.training_problems()
        params: dict[str, Any] = {"bundle_id": self.version, "precision": self.precision,
                                  "training_failed": bool(problems)}
        if problems:
            params["training_problems"] = problems
        return {"name": name, "versions": [self.version], "platform": self.platform,
                "inputs": [t.as_json() for t in self.inputs], "outputs": [t.as_json() for t in self.outputs],
                "parameters": params}

    def model_config(self, name: str) -> dict[str, Any]:
        """Triton's model configuration (the parts that apply), for clients that read it."""
        def tensor(t: TensorSig) -> dict[str, Any]:
            return {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": list(t.shape[1:])}

        cfg: dict[str, Any] = {"name": name, "platform": self.platform,
                               "backend": "tensorrt" if self.platform == "tensorrt_plan" else "onnxruntime",
                               "max_batch_size": self.max_batch, "input": [tensor(t) for t in self.inputs],
                               "output": [{**tensor(t), "label_filename": "labels.txt"} for t in self.outputs],
                               "parameters": {"bundle_id": {"string_value": self.version},
                                              "precision": {"string_value": self.precision}}}
        if self.config.batching:
            cfg["dynamic_batching"] = {"max_queue_delay_microseconds": int(self.config.max_delay_ms * 1000),
                                       "preferred_batch_size": [self.config.max_batch]}
        return cfg

    async def aclose(self) -> None:
        await self.dispatcher.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._close_sync)

    def _close_sync(self) -> None:
        self.executor.shutdown(wait=True)
        self.runner.deactivate()
        log.info("model %s unloaded", self.version)


def load_model(bundle_path: Path, config: ServeConfig, metrics: Metrics, engine_dir: Path | None = None,
               gated_precision: str | None = None) -> LoadedModel:
    """Open (and verify) a bundle, activate a runner for it and warm it up. Blocking; raises EdgeTLError."""
    bundle = Bundle.open(bundle_path, verify=config.verify)  # verified against its manifest unless asked not to
    m = bundle.manifest
    if config.verify:  # and its signature against this machine's trusted keys (edge_tl.core.signing)
        warning = enforce_signature(bundle.signature(), config.allow_unsigned, f"model {m.name} ({m.bundle_id})")
        if warning:
            log.warning("%s", warning)
    if config.max_batch > m.max_batch:
        raise EdgeTLError(f"--max-batch {config.max_batch} is larger than the bundle's max_batch {m.max_batch}",
                          f"use --max-batch {m.max_batch} or less")
    precision = config.precision or gated_precision or m.default_precision  # a deployed model: what was gated
    runner = create_runner(bundle, backend=config.backend, precision=precision, threads=config.threads,
                           engines=EngineCache(engine_dir))
    if runner.backend == "tensorrt" and config.workers > 1:
        raise EdgeTLError("the TensorRT runner has one execution context, so --workers must be 1",
                          "use --workers 1 (or --max-batch to batch requests)")
    runner.activate()
    try:
        shape = tuple(1 if not isinstance(d, int) else d for d in m.input.shape)
        runner.infer({m.input.name: np.zeros(shape, dtype=np.float32)})  # warm-up: the first call is slow
    except Exception:
        runner.deactivate()
        raise
    model = LoadedModel(bundle, runner, config, metrics, precision)
    post = bundle.postprocess
    for problem in m.training_problems():
        log.warning("model %s: training failed (%s): its answers are no better than guessing", m.name, problem)
    log.info("model %s (%s, version %s) loaded on %s, %s; /classify scores softmax(logits / %g)%s", m.name,
             bundle.root, model.version, runner.backend, precision, post.temperature,
             "" if post.calibrated else " (no calibrated temperature in this bundle: plain softmax)")
    return model


class ModelManager:
    def __init__(self, config: ServeConfig, metrics: Metrics, initial: LoadedModel | None,
                 initial_link: str | None = None):
        self.config = config
        self.loaded_link = initial_link  # the `active` link's target name that self.current came from
        self.metrics = metrics
        self.current = initial
        self.layout = DeviceLayout(config.root) if config.root else None
        self.failed_version: str | None = None
        self._closing: set[asyncio.Task] = set()
        if initial is not None:
            self._announce(initial)

    def name_of(self, model: LoadedModel) -> str:
        return self.config.name or model.bundle.manifest.name

    @property
    def name(self) -> str | None:
        return self.name_of(self.current) if self.current else self.config.name

    def _announce(self, model: LoadedModel) -> None:
        self.metrics.set_model(self.name_of(model), model.version, model.runner.backend, model.precision)

    def acquire(self, name: str | None, version: str | None = None) -> LoadedModel:
        model = self.current
        if model is None:
            raise ProtocolError(503, "no model is loaded yet: nothing is active under --root")
        if name is not None and name != self.name_of(model):
            raise ProtocolError(404, f"Request for unknown model: '{name}' is not found (this server serves "
                                     f"'{self.name_of(model)}')")
        if version not in (None, "", model.version):
            raise ProtocolError(404, f"Request for unknown model: '{name}' version {version} is not found "
                                     f"(serving version {model.version})")
        model.refs += 1
        return model

    def release(self, model: LoadedModel) -> None:
        model.refs -= 1
        if model.refs == 0 and model is not self.current:
            self._retire(model)

    def _retire(self, model: LoadedModel) -> None:
        task = asyncio.get_running_loop().create_task(model.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def switch(self, new: LoadedModel) -> None:
        old, self.current = self.current, new
        self._announce(new)
        log.info("now serving version %s%s", new.version, f" (was {old.version})" if old else "")
        if old is not None and old.refs == 0:
            self._retire(old)

    async def check_active(self) -> bool:
        """One look at the active link; loads and switches to a new version. True when it switched."""
        if self.layout is None:
            return False
        active = self.layout.active()
        if active is None or active.version == self.failed_version:
            return False
        version = active.version
        if self.current is not None and version == self.loaded_link:
            return False
        loop = asyncio.get_running_loop()
        try:
            new = await loop.run_in_executor(None, load_model, active.bundle_dir, self.config, self.metrics,
                                             active.engine_dir, active.precision)
        except Exception as exc:
            self.failed_version = version
            self.metrics.reloads.labels("failed").inc()
            log.error("could not load active version %s, still serving %s: %s", version,
                      self.current.version if self.current else "nothing", exc)
            return False
        self.failed_version = None
        self.loaded_link = version
        await self.switch(new)
        self.metrics.reloads.labels("ok").inc()
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_s)
            try:
                await self.check_active()
            except Exception:  # never let the watcher die
                log.exception("checking the active model failed")

    async def aclose(self) -> None:
        if self.current is not None:
            model, self.current = self.current, None
            await model.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
