"""How honest is `edge-tl bench`? Three checks on the ONNX Runtime CPU backend, written to RESULTS.md.

1. Harness overhead: the median `run_bench` reports vs a bare `session.run` loop timed in this process on
   the same model (target: within 2%).
2. Sampling power at 20 Hz (an INA3221 sampler on a built Orin Nano sysfs tree, real file reads in a
   background thread) moves the median by at most 1%.
3. Repeatability: three separate runs of the same bench give medians within 3%; one `--repeat 3` run
   records its own spread in the JSON (``median_spread_pct``).

Repetitions alternate (A B, B A, ...) so slow drift of a shared machine cancels. The model is a
torchvision mobilenet_v2 at 224x224 with random weights (latency does not depend on the weights), exported
here with torch (benchmarks are workstation-side), so one call takes milliseconds, not microseconds.

    python benchmarks/bench_harness.py            # full
    python benchmarks/bench_harness.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import machine_line, write_section  # noqa: E402

from edge_tl.device.bench import BenchConfig, run_bench  # noqa: E402
from edge_tl.device.runtime.onnxrt import SessionFromOnnx  # noqa: E402

WORK = ROOT / "runs" / "bench_harness"


def export_model(path: Path) -> Path:
    if path.is_file():
        return path
    import torch
    import torchvision

    path.parent.mkdir(parents=True, exist_ok=True)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    tmp = path.with_suffix(".partial.onnx")
    torch.onnx.export(model, torch.randn(1, 3, 224, 224), str(tmp), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    tmp.replace(path)
    return path


def orin_nano_tree(root: Path) -> Path:
    """The hwmon layout of an Orin Nano's INA3221 (1-0040: VDD_IN, VDD_CPU_GPU_CV, VDD_SOC)."""
    d = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    d.mkdir(parents=True, exist_ok=True)
    for k, (label, mv, ma) in enumerate([("VDD_IN", 5000, 965), ("VDD_CPU_GPU_CV", 5000, 104),
                                         ("VDD_SOC", 5000, 295)], start=1):
        (d / f"in{k}_label").write_text(label + "\n")
        (d / f"in{k}_input").write_text(f"{mv}\n")
        (d / f"curr{k}_input").write_text(f"{ma}\n")
    return root


def bare_median_ms(session, x: np.ndarray, iterations: int, warmup: int) -> float:
    feed = {"input": x}
    for _ in range(warmup):
        session.run(None, feed)
    lat = np.empty(iterations, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(iterations):
        t0 = clock()
        session.run(None, feed)
        lat[i] = clock() - t0
    return float(np.median(lat) / 1e6)


def bench_median_ms(model: Path, iterations: int | None, warmup: int, threads: int, **extra) -> tuple[float, object]:
    cfg = BenchConfig(model, backend="ort-cpu", batches=[1], iterations=iterations, warmup=warmup, threads=threads,
                      data="random", idle_seconds=0, **({"power": "none"} | extra))
    result, _ = run_bench(cfg)
    return result.results[0].latency_ms.median, result


def pct(a: float, b: float) -> float:
    return (a - b) / b * 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few rounds and iterations")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per comparison (default 6)")
    ap.add_argument("--iterations", type=int, default=None, help="iterations per measurement (default 200)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    ap.add_argument("--repeat-seconds", type=float, default=None,
                    help="length of each repeatability run (`edge-tl bench --duration`; default 5)")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 6)
    iters = args.iterations or (20 if args.quick else 200)
    warmup = 5 if args.quick else 30
    load = os.getloadavg()[0]
    model = export_model(WORK / "mobilenet_v2_224.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)

    # 1. harness overhead: bare session.run vs run_bench, alternating order
    bare, harness = [], []
    for r in range(rounds):
        order = ("bare", "bench") if r % 2 == 0 else ("bench", "bare")
        for which in order:
            if which == "bare":  # a fresh session each round, as run_bench makes one per run
                session = SessionFromOnnx(model, ["CPUExecutionProvider"], intra_op_threads=args.threads)()
                bare.append(bare_median_ms(session, x, iters, warmup))
            else:
                harness.append(bench_median_ms(model, iters, warmup, args.threads)[0])
    over = pct(statistics.median(harness), statistics.median(bare))
    print(f"overhead: bare {statistics.median(bare):.3f} ms, bench {statistics.median(harness):.3f} ms ({over:+.2f}%)")

    # 2. power sampling at 20 Hz on a built INA3221 tree vs no power
    with tempfile.TemporaryDirectory(prefix="edge-tl-ina-") as td:
        tree = orin_nano_tree(Path(td))
        off, on, samples = [], [], []
        for r in range(rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for which in order:
                if which == "off":
                    off.append(bench_median_ms(model, iters, warmup, args.threads)[0])
                else:
                    med, res = bench_median_ms(model, iters, warmup, args.threads, power="ina3221",
                                               root=str(tree), rate_hz=20.0)
                    on.append(med)
                    samples.append((res.power.sample_count, res.power.measured_rate_hz))
    shift = pct(statistics.median(on), statistics.median(off))
    rate = statistics.median(r for _n, r in samples if r)
    print(f"power sampling: off {statistics.median(off):.3f} ms, on {statistics.median(on):.3f} ms ({shift:+.2f}%), "
          f"{rate:.1f} Hz")

    # 3. repeatability: three separate runs, and one --repeat 3 run whose JSON records the spread
    # Each run lasts --repeat-seconds (`edge-tl bench --duration`): a 1-second run on a shared VM catches
    # scheduler noise that a few seconds average out.
    secs = args.repeat_seconds or (0.5 if args.quick else 5.0)
    three = [bench_median_ms(model, None, warmup, args.threads, duration_s=secs)[0] for _ in range(3)]
    spread3 = (max(three) - min(three)) / min(three) * 100
    cfg = BenchConfig(model, backend="ort-cpu", batches=[1], duration_s=secs, warmup=warmup, threads=args.threads,
                      data="random", idle_seconds=0, power="none", repeat=3, label="repeat3")
    rep, _ = run_bench(cfg)
    rep.save(WORK / "repeat3.json")
    rep_spread = rep.results[0].median_spread_pct
    print(f"repeatability: {', '.join(f'{m:.3f}' for m in three)} ms (spread {spread3:.2f}%); "
          f"--repeat 3 spread {rep_spread:.2f}%")

    def ok(good: bool) -> str:
        return "yes" if good else "**no**"

    med = statistics.median
    rows = [
        ("harness overhead: `run_bench` median vs bare `session.run` loop",
         f"{med(harness):.3f} vs {med(bare):.3f} ms ({over:+.2f}%)", "within 2%", ok(abs(over) <= 2)),
        (f"power sampling at 20 Hz (INA3221 built tree, {rate:.1f} Hz measured) vs none",
         f"{med(on):.3f} vs {med(off):.3f} ms ({shift:+.2f}%)", "at most 1%", ok(abs(shift) <= 1)),
        (f"three separate {secs:g}-second runs: medians",
         f"{', '.join(f'{m:.3f}' for m in three)} ms (spread {spread3:.2f}%)",
         "within 3%", ok(spread3 <= 3)),
        (f"one `--repeat 3 --duration {secs:g}` run: `median_spread_pct` in its JSON", f"{rep_spread:.2f}%",
         "within 3%", ok(rep_spread <= 3)),
    ]
    table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
    body = f"""## `edge-tl bench` harness (benchmarks/bench_harness.py{' --quick' if args.quick else ''})

{machine_line(args.threads)}
Model: torchvision mobilenet_v2, 224x224, batch 1, random weights, FP32 ONNX (opset 17), ONNX Runtime
CPU execution provider. {rounds} alternating rounds of {iters} iterations (after {warmup} warm-up) per side.

| check | measured | target | met |
| --- | --- | --- | --- |
{table}

Per-round medians (ms): bare {', '.join(f'{m:.3f}' for m in bare)}; bench {', '.join(f'{m:.3f}' for m in harness)};
power off {', '.join(f'{m:.3f}' for m in off)}; power on {', '.join(f'{m:.3f}' for m in on)}.
1-minute load average at the start: {load:.2f} (this benchmark alone on the machine; it is a 2-vCPU VM, so the
hypervisor's other guests still add noise).
"""
    print(write_section("bench_harness", body))


if __name__ == "__main__":
    main()
