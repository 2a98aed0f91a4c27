"""`edge-tl serve` under load on the ONNX Runtime CPU backend, written to RESULTS.md (section bench_serve).

1. Added latency: the bare runner's p50 (runner.infer in this process, batch 1) vs the server's p50 for the
   same batch with one client (the server's own time from its Server-Timing header, and what the client sees
   over loopback HTTP). The two are sampled alternately, a few seconds at a time, so the drift of a shared
   machine hits both alike. Target: server p50 - runner p50 < 2 ms.
2. 32 concurrent clients for --duration seconds against /v2/models/{name}/infer (Triton binary tensors),
   with dynamic batching off and on: requests, errors (target: zero), throughput, client p50/p99.
3. The server's resident memory (VmRSS) after warm-up and at the end of the load (target: within 10%).

The server is `edge-tl serve` in its own process; the load generator is another process (asyncio, raw
keep-alive HTTP/1.1 on loopback, bounded by time and request count). The model is the demo bundle
(runs/demo/bundle) when present, else torchvision's mobilenet_v2 (random weights, 224x224) exported here.

    python benchmarks/bench_serve.py            # full: 60 s per load phase
    python benchmarks/bench_serve.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import machine_line, write_section  # noqa: E402

WORK = ROOT / "runs" / "bench_serve"
DEMO = ROOT / "runs" / "demo" / "bundle"


# -- the model ------------------------------------------------------------------------------------------
def mobilenet_bundle(out: Path) -> Path:
    """A bundle around torchvision's mobilenet_v2 (FP32 only), made once and cached under runs/."""
    if (out / "manifest.json").is_file():
        return out
    import tempfile

    import onnxruntime as ort
    import torch
    import torchvision

    from edge_tl.core.bundle import (
        DataSummary,
        GoldenInfo,
        Manifest,
        StageMetrics,
        TargetInfo,
        TensorSpec,
        utc_now,
        write_bundle,
    )
    from edge_tl.core.preprocess import PreprocessConfig

    classes = [f"class{i}" for i in range(10)]
    with tempfile.TemporaryDirectory() as td:
        staging = Path(td) / "staging"
        (staging / "golden").mkdir(parents=True)
        model = torchvision.models.mobilenet_v2(weights=None, num_classes=len(classes)).eval()
        torch.onnx.export(model, torch.randn(1, 3, 224, 224), str(staging / "model.onnx"), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
        (staging / "labels.txt").write_text("\n".join(classes) + "\n")
        PreprocessConfig(input_size=(224, 224), resize=256).save(staging / "preprocess.json")
        x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
        sess = ort.InferenceSession(str(staging / "model.onnx"), providers=["CPUExecutionProvider"])
        np.save(staging / "golden/inputs.npy", x)
        np.save(staging / "golden/outputs.npy", sess.run(None, {"input": x})[0])
        manifest = Manifest(
            created=utc_now(), name="mobilenet", backbone="mobilenet_v2", weights="random", seed=0,
            target=TargetInfo(name="jetpack6", jetpack="6.2", tensorrt="10.3", max_opset=20, opset=17),
            input=TensorSpec(name="input", shape=["batch", 3, 224, 224]),
            output=TensorSpec(name="logits", shape=["batch", len(classes)]), max_batch=32, classes=classes,
            default_precision="fp32",
            data=DataSummary(source="none", split_mode="stratified", counts={}, file_list_sha256="0" * 64),
            stages={"finetune": StageMetrics()}, golden=GoldenInfo(count=2))
        return write_bundle(staging, manifest, out, tarball=False)


class BareRunner:
    """runner.infer in this process: the reference the server's latency is compared with."""

    def __init__(self, bundle: Path, x: np.ndarray):
        from edge_tl.device.runners import create_runner

        self.x = x
        self.runner = create_runner(bundle, backend="ort-cpu").activate()
        for _ in range(20):
            self.runner.infer(x)

    def sample(self, seconds: float) -> list[float]:
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.runner.infer(self.x)
            times.append(self.runner.last_inference_ns / 1e6)
        return times


# -- the load generator (its own process) ---------------------------------------------------------------
def infer_request(port: int, name: str, x: np.ndarray) -> bytes:
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    body = head + x.tobytes()
    return (f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(head)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _client(port: int, request: bytes, deadline: float, budget: list[int], out: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            await reader.readexactly(int(headers.get("content-length", 0)))
            server_ms = float(headers.get("server-timing", "app;dur=nan").split("dur=")[-1])
            out.append((status, (time.perf_counter() - start) * 1e3, server_ms))
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        out.append((0, float("nan"), float("nan"), repr(exc)))
    finally:
        writer.close()


def loadgen(port: int, name: str, shape: tuple[int, ...], clients: int, seconds: float, max_requests: int,
            queue) -> None:
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    request = infer_request(port, name, x)
    out: list = []

    async def run_clients() -> None:
        deadline = time.perf_counter() + seconds
        budget = [max_requests]
        await asyncio.gather(*(_client(port, request, deadline, budget, out) for _ in range(clients)))

    start = time.perf_counter()
    asyncio.run(run_clients())
    queue.put({"results": out, "wall_s": time.perf_counter() - start})


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run_load(port: int, name: str, shape, clients: int, seconds: float, max_requests: int = 10_000_000) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=loadgen, args=(port, name, shape, clients, seconds, max_requests, queue))
    proc.start()
    data = queue.get(timeout=seconds + 120)
    proc.join(30)
    res = data["results"]
    ok = [r for r in res if r[0] == 200]
    client_ms = sorted(r[1] for r in ok)
    server_ms = sorted(r[2] for r in ok)
    return {"requests": len(res), "errors": len(res) - len(ok), "wall_s": data["wall_s"],
            "throughput": len(ok) / data["wall_s"], "client_p50": _pct(client_ms, 0.5),
            "client_p99": _pct(client_ms, 0.99), "server_p50": _pct(server_ms, 0.5),
            "error_kinds": sorted({str(r[0]) if len(r) == 3 else r[3] for r in res if r[0] != 200})[:5],
            "client_ms": client_ms, "server_ms": server_ms}


# -- the server (its own process) ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, bundle: Path | None, extra: list[str]):
        """``bundle`` None: ``extra`` names what to serve (e.g. ``--root ROOT``)."""
        import httpx

        self.port = free_port()
        cmd = [sys.executable, "-c", "from edge_tl.cli import main; main()", "serve",
               *([str(bundle)] if bundle is not None else []), "--port", str(self.port), "--backend", "ort-cpu",
               *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def added_latency(server: Server, bare: BareRunner, name: str, shape, rounds: int, seconds: float) -> dict:
    """Alternate bare-runner and one-client server samples (the server idles while the runner runs)."""
    runner_ms: list[float] = []
    server_ms: list[float] = []
    client_ms: list[float] = []
    errors = 0
    for _ in range(rounds):
        runner_ms += bare.sample(seconds)
        res = run_load(server.port, name, shape, 1, seconds)
        server_ms += res["server_ms"]
        client_ms += res["client_ms"]
        errors += res["errors"]
    return {"runner_p50": statistics.median(runner_ms), "server_p50": statistics.median(server_ms),
            "client_p50": statistics.median(client_ms), "runner_n": len(runner_ms), "server_n": len(server_ms),
            "errors": errors}


def phase(bundle: Path, name: str, shape, extra: list[str], seconds: float, warmup: float,
          bare: BareRunner | None = None, rounds: int = 0) -> dict:
    server = Server(bundle, extra)
    try:
        run_load(server.port, name, shape, 32, warmup)
        rss_warm = rss_mb(server.proc.pid)
        res = run_load(server.port, name, shape, 32, seconds)
        res["rss_warm_mb"], res["rss_end_mb"] = rss_warm, rss_mb(server.proc.pid)
        if bare is not None:
            res["single"] = added_latency(server, bare, name, shape, rounds, 1.0)
    finally:
        server.stop()
    del res["client_ms"], res["server_ms"]
    return res


def row(label: str, r: dict) -> str:
    growth = (r["rss_end_mb"] / r["rss_warm_mb"] - 1) * 100
    return (f"| {label} | {r['requests']} | {r['errors']} | {r['throughput']:.1f} | {r['client_p50']:.2f} | "
            f"{r['client_p99']:.2f} | {r['server_p50']:.2f} | {r['rss_warm_mb']:.0f} -> {r['rss_end_mb']:.0f} "
            f"({growth:+.1f}%) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds per phase (smoke run)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of 32-client load per phase")
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: runs/demo/bundle or mobilenet_v2)")
    ap.add_argument("--max-batch", type=int, default=8, help="dynamic batching's --max-batch")
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    args = ap.parse_args()
    seconds = 3.0 if args.quick else args.duration
    warmup = 2.0 if args.quick else 10.0
    rounds = 3 if args.quick else 12

    from edge_tl.core.bundle import Bundle

    bundle_dir = args.bundle or (DEMO if (DEMO / "manifest.json").is_file() else mobilenet_bundle(WORK / "bundle"))
    bundle = Bundle.open(bundle_dir)
    name = bundle.manifest.name
    shape = (1, *[int(d) for d in bundle.manifest.input.shape[1:]])
    bare = BareRunner(bundle_dir, np.random.default_rng(1).normal(size=shape).astype(np.float32))
    off = phase(bundle_dir, name, shape, [], seconds, warmup, bare, rounds)
    bare.runner.deactivate()
    print("batching off:", json.dumps(off))
    on = phase(bundle_dir, name, shape, ["--max-batch", str(args.max_batch), "--max-delay-ms",
                                         str(args.max_delay_ms)], seconds, warmup)
    print("batching on:", json.dumps(on))

    s = off["single"]
    runner_p50 = s["runner_p50"]
    added_server, added_client = s["server_p50"] - runner_p50, s["client_p50"] - runner_p50
    errors_ok = off["errors"] == on["errors"] == s["errors"] == 0
    rss_ok = all(abs(r["rss_end_mb"] / r["rss_warm_mb"] - 1) <= 0.10 for r in (off, on))
    body = f"""## edge-tl serve under load (`benchmarks/bench_serve.py{' --quick' if args.quick else ''}`)

{machine_line()} Backend ort-cpu (ONNX Runtime default threads), model `{bundle.manifest.backbone}` \
({'x'.join(map(str, shape[1:]))}, batch 1 per request, Triton binary tensors); server and load generator in \
separate processes on this machine; {seconds:.0f} s per 32-client phase after a {warmup:.0f} s warm-up.

Added latency (1 client, batching off; bare runner and server sampled alternately, {rounds} x 1 s each, \
{s['runner_n']} runner calls, {s['server_n']} requests): bare runner p50 **{runner_p50:.3f} ms**; server p50 \
(its Server-Timing) **{s['server_p50']:.3f} ms** -> added **{added_server:+.3f} ms** (target < 2 ms: \
{'met' if added_server < 2 else 'NOT met'}); the client over loopback HTTP sees {s['client_p50']:.3f} ms \
({added_client:+.3f} ms).

32 concurrent clients:

| dynamic batching | requests | errors | req/s | client p50 ms | client p99 ms | server p50 ms | RSS MB warm -> end |
| --- | --- | --- | --- | --- | --- | --- | --- |
{row('off', off)}
{row(f'on (max batch {args.max_batch}, {args.max_delay_ms:g} ms)', on)}

Throughput on/off: {on['throughput'] / off['throughput']:.2f}x. Zero errors: \
{'met' if errors_ok else 'NOT met: ' + str(off['error_kinds'] + on['error_kinds'])}. RSS within 10% of \
warm-up: {'met' if rss_ok else 'NOT met'}. Under 32 clients the server p50 includes waiting for the inference \
worker (queueing), so it is not "added latency"; that is the one-client measurement above.
"""
    print(body)
    write_section("bench_serve", body)


if __name__ == "__main__":
    main()
