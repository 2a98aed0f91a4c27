"""The TensorRT runner and engine cache against stand-ins that enforce the real rules (tests/trt_standin.py):
thread-local CUDA contexts (serve's real threading: load, concurrent infer, hot reload, unload), no builder on a
cache hit, DLA's static shapes (parity and bench feed the engine's own batch) and ``Runtime.DLA_core``."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import trt_standin
from test_serve_reload import activate, body, deploy

from edge_tl.core.bundle import Bundle
from edge_tl.core.errors import EdgeTLError
from edge_tl.device.bench.run import BenchConfig, run_bench
from edge_tl.device.engine.cache import EngineCache, load_or_build, read_sidecar
from edge_tl.device.engine.parity import check_parity
from edge_tl.device.runners import create_runner
from edge_tl.device.runtime.tensorrt import TensorRTRunner
from edge_tl.device.serve.config import ServeConfig
from edge_tl.device.serve.server import ThreadedServer


@pytest.fixture
def trt(monkeypatch):
    return trt_standin.install(monkeypatch, version="10.3.0.30", dla=2)


def _in_thread(fn):
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def test_the_cuda_standin_has_thread_local_contexts(trt):
    drv = trt_standin.make_cuda()[1]
    ctx = drv.Device(0).retain_primary_context()
    ctx.push()
    try:
        alloc = drv.mem_alloc(16)  # fine here: the context is current in this thread
        with pytest.raises(drv.LogicError, match="invalid device context"):
            _in_thread(lambda: drv.mem_alloc(16))  # another thread has no current context
        with pytest.raises(drv.LogicError, match="invalid device context"):
            _in_thread(drv.Context.pop)  # popping from another thread fails (pycuda: thread-local stack)
        def push_pop():  # an explicit push from another thread is allowed (pycuda context::push)
            ctx.push()
            drv.Context.pop()

        _in_thread(push_pop)
        other = _in_thread(lambda: drv.Device(0).retain_primary_context())  # a context another thread made
        other.push()
        stray = drv.mem_alloc(8)
        drv.Context.pop()
        with pytest.raises(drv.LogicError, match="out-of-thread"):  # implicit activation checks the thread
            stray.free()
        alloc.free()  # this thread made ctx: freeing works
    finally:
        drv.Context.pop()


def test_runner_activates_infers_and_deactivates_from_different_threads(trt, tiny_bundle_src, tmp_path):
    bundle = Bundle.open(tiny_bundle_src)
    runner = create_runner(bundle, "tensorrt", "fp32", engines=EngineCache(tmp_path))
    _in_thread(runner.activate)  # as serve's reload executor does
    x = bundle.golden_inputs()
    with ThreadPoolExecutor(4) as pool:  # as serve's inference pool does, concurrently
        outs = list(pool.map(lambda i: runner.infer(x[i:i + 1])["logits"], range(len(x))))
    np.testing.assert_allclose(np.concatenate(outs), bundle.golden_outputs(), rtol=1e-4, atol=1e-5)
    assert runner.describe()["cuda_api"] == "pycuda"
    _in_thread(runner.deactivate)  # and unloading happens on yet another thread
    assert trt_standin.live_allocations() == 0  # every device buffer freed in the context's thread


def test_serve_on_tensorrt_load_concurrent_infer_hot_reload_unload(trt, tmp_path):
    root = tmp_path / "root"
    a, b = deploy(root, 0), deploy(root, 1)
    activate(root, a)
    x = np.random.default_rng(2).normal(size=(1, 3, 16, 16)).astype(np.float32)
    cfg = ServeConfig(root=root, port=0, poll_s=0.05, backend="tensorrt", precision="fp32", max_batch=4)
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()
    with ThreadedServer(cfg) as srv:
        def client() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    r = c.post(srv.url + "/v2/models/tiny/infer", json=body(x))
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions.add(r.json()["model_version"])

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        while len(statuses) < 20:
            threading.Event().wait(0.02)
        activate(root, b)  # hot reload: load b in the reload thread, switch, unload a in another
        deadline = threading.Event()
        for _ in range(500):
            if b in versions and len(statuses) > 60:
                break
            deadline.wait(0.02)
        stop.set()
        for t in threads:
            t.join()
    assert set(statuses) == {200}, sorted(set(statuses))
    assert versions == {a, b}
    assert trt_standin.live_allocations() == 0  # both models unloaded, buffers freed on their own threads


def test_a_cache_hit_creates_no_builder(trt, tiny_bundle_src, tmp_path):
    onnx = tiny_bundle_src / "model.onnx"
    first = load_or_build(onnx, "fp16", tmp_path, max_batch=8)
    built = trt.Builder.created
    assert built >= 1
    assert load_or_build(onnx, "fp16", tmp_path, max_batch=8) == first
    runner = TensorRTRunner(EngineCache(tmp_path)(onnx, "fp16", 8))
    with runner:
        runner.infer(np.zeros((2, 3, 16, 16), np.float32))
    assert trt.Builder.created == built  # the lookup and the activation made no trt.Builder


def test_dla_engine_is_static_records_its_layers_and_runs_on_its_core(trt, tiny_bundle_src, tmp_path):
    bundle = Bundle.open(tiny_bundle_src)
    said: list[str] = []
    # FP16 from model.onnx: DLA does not run the Q/DQ model (issue 22, D2)
    path = load_or_build(bundle.model_path("fp32"), "fp16", tmp_path, dla_core=1, max_batch=4, notify=said.append)
    side = read_sidecar(path)
    assert side["key"]["batch_profile"] == "4-4-4" and side["key"]["dla_core"] == 1
    assert side["dla"]["dla_layers"] > 0 and side["dla"]["gpu_layers"] == 1  # Flatten falls back to the GPU
    # where the layers ran, from the builder's own report after the build (not can_run_on_DLA before it)
    built = side["dla"]["built"]
    assert built["reported"] and built["dla_nodes"] >= 1 and built["gpu_layers"] == 1
    assert built["dla_node_names"][0].startswith("{ForeignNode[") and built["gpu_layer_names"][0].startswith("FLATTEN:")
    assert any("static batch 4" in m for m in said)
    runner = TensorRTRunner(EngineCache(tmp_path, dla_core=1)(bundle.model_path("fp32"), "fp16", 4))
    with runner:
        assert runner.static_batch() == 4 and runner.engine.dla_core == 1  # Runtime.DLA_core set on load
        with pytest.raises(EdgeTLError, match="takes only"):
            runner.infer(np.zeros((1, 3, 16, 16), np.float32))
        report = check_parity(bundle, runner, "fp16")  # 6 golden inputs: batches of 4, the last one padded
    assert report.passed, report.failures
    assert report.outputs["logits"].count == len(bundle.golden_inputs())


def test_bench_refuses_other_batches_on_a_static_engine(trt, tiny_bundle_src, tmp_path):
    path = load_or_build(tiny_bundle_src / "model.onnx", "fp16", tmp_path, dla_core=0, max_batch=2)
    with pytest.raises(EdgeTLError, match="takes batch 2 only"):
        run_bench(BenchConfig(path, backend="tensorrt", precision="fp16", batches=[1], iterations=2, warmup=1,
                              power="none", idle_seconds=0))
    result, _ = run_bench(BenchConfig(path, backend="tensorrt", precision="fp16", batches=[2], iterations=3,
                                      warmup=1, power="none", idle_seconds=0))
    assert [r.batch for r in result.results] == [2] and result.runner["dla_core"] == 0
    # the hop to the runner's owning thread is inside each timed call: measured and reported (issue 22, D7)
    row = result.results[0]
    assert row.thread_handoff_us is not None and 0 < row.thread_handoff_us < row.latency_ms.median * 1000
