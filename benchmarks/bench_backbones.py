"""Issue #2 item 13b: CPU latency of the four backbones, dense and pruned, eager vs ONNX Runtime FP32/INT8.

At 224x224, batch 1, for mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large and squeezenet1_1 (10 classes,
randomly initialised weights: latency does not depend on the weight values; BatchNorm statistics are set
from a few random images so activations have realistic ranges). Every variant is measured in the same run
with the same thread count; ratios are against PyTorch eager FP32 of the dense model.

Variants: PyTorch eager FP32, ONNX Runtime FP32, ONNX Runtime INT8 in the TensorRT Q/DQ form that bundles
ship (symmetric INT8 activations), and, for the analysis, ONNX Runtime INT8 in ORT's CPU-friendly form
(asymmetric UINT8 activations; TensorRT refuses it, bundles never hold it). Pruned = half the MACs removed
with edge_tl.workstation.prune (no recovery fine-tune: latency only).

    .venv/bin/python benchmarks/bench_backbones.py            # full (the lead's run)
    .venv/bin/python benchmarks/bench_backbones.py --quick    # one backbone, few iterations
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from _results import machine_line, write_section  # noqa: E402

from edge_tl.workstation.export import export_onnx  # noqa: E402
from edge_tl.workstation.modelstats import count_macs_params, onnx_latency_ms, torch_latency_ms  # noqa: E402
from edge_tl.workstation.prune import prune_to_macs  # noqa: E402
from edge_tl.workstation.quantize import quantize_int8  # noqa: E402
from edge_tl.workstation.spec import PruneSpec  # noqa: E402

BACKBONES = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "squeezenet1_1"]
SIZE = (224, 224)
TARGET_SPEEDUP = 5.0


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    with torch.no_grad():  # BatchNorm statistics from random images (cumulative average)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        for _ in range(2):
            model(torch.rand(8, 3, *SIZE) * 4 - 2)
    return model.eval()


def measure(name: str, work: Path, iters: int, warmup: int, threads: int, calib: np.ndarray) -> list[dict]:
    rows = []
    dense = make_model(name)
    spec = PruneSpec()  # what `edge-tl build` prunes with (its defaults)
    pruned = prune_to_macs(dense, torch.zeros(1, 3, *SIZE), 0.5, round_to=spec.round_to, importance=spec.importance,
                           global_pruning=spec.global_pruning).model.eval()
    for label, model in (("dense", dense), ("pruned", pruned)):
        macs, params = count_macs_params(model, SIZE)
        fp32 = export_onnx(model, work / f"{name}-{label}.onnx", SIZE).path
        int8 = quantize_int8(fp32, work / f"{name}-{label}.int8.onnx", calib).path
        cpu8 = quantize_int8(fp32, work / f"{name}-{label}.cpu8.onnx", calib, for_tensorrt=False).path
        common = {"backbone": name, "model": label, "macs": macs, "params": params}
        rows.append({**common, "variant": "PyTorch eager FP32", "size": None,
                     "ms": torch_latency_ms(model, SIZE, iters, warmup, threads)})
        for variant, path in (("ORT FP32", fp32), ("ORT INT8 (TensorRT Q/DQ form)", int8),
                              ("ORT INT8 (CPU form, not shippable)", cpu8)):
            rows.append({**common, "variant": variant, "size": path.stat().st_size,
                         "ms": onnx_latency_ms(path, SIZE, iters, warmup, threads)})
        print(f"  {name} {label}: " + ", ".join(f"{r['variant']} {r['ms']:.2f} ms" for r in rows[-4:]), flush=True)
    return rows


def render(rows: list[dict], threads: int, iters: int, warmup: int, quick: bool, seconds: float,
           load: float) -> str:
    import onnxruntime

    lines = [
        "## Backbones on CPU: eager vs ONNX Runtime FP32/INT8, dense and pruned (issue #2, 13b)",
        "",
        ("**Smoke run** (`--quick` or few iterations; not the reference numbers). "
         if quick else "") + machine_line(threads),
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. Input 1x3x{SIZE[0]}x{SIZE[1]}, batch 1, "
        f"median of {iters} runs after {warmup} warm-up runs; {threads} intra-op thread(s) for both PyTorch and "
        f"ONNX Runtime. Randomly initialised weights (10 classes; latency does not depend on the values). "
        f"Pruned: 50% of MACs removed by `edge_tl.workstation.prune` with `edge-tl build`'s defaults "
        f"({PruneSpec().importance}, "
        f"{'global' if PruneSpec().global_pruning else 'per-layer'} ranking, channels multiple of 8). "
        f"Total run {seconds:.0f} s; "
        f"1-minute load average at the start {load:.2f} (PyTorch's OpenMP threads slow down badly, 10-100x, "
        "when other processes share the cores: compare only runs on a quiet machine).",
        "",
        "| backbone | model | variant | MMACs | params (M) | ONNX size (MB) | median ms | speed-up vs dense eager |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    base = {r["backbone"]: r["ms"] for r in rows if r["model"] == "dense" and r["variant"].startswith("PyTorch")}
    for r in rows:
        size = f"{r['size'] / 1e6:.2f}" if r["size"] else "-"
        lines.append(f"| {r['backbone']} | {r['model']} | {r['variant']} | {r['macs'] / 1e6:.0f} | "
                     f"{r['params'] / 1e6:.2f} | {size} | {r['ms']:.2f} | {base[r['backbone']] / r['ms']:.2f}x |")
    lines += ["", f"Key target (issue #2: the deployable model >= {TARGET_SPEEDUP:.0f}x faster than unpruned eager "
              "FP32, same CPU, same run):", "",
              "| backbone | pruned ORT INT8 (TensorRT form) | pruned ORT FP32 | pruned ORT INT8 (CPU form) |",
              "|---|---:|---:|---:|"]
    for name, ms in base.items():
        def ratio(variant: str, name: str = name, ms: float = ms) -> str:
            r = next(x for x in rows if x["backbone"] == name and x["model"] == "pruned" and x["variant"] == variant)
            speed = ms / r["ms"]
            return f"{speed:.2f}x {'(met)' if speed >= TARGET_SPEEDUP else '(missed)'}"
        lines.append(f"| {name} | {ratio('ORT INT8 (TensorRT Q/DQ form)')} | {ratio('ORT FP32')} | "
                     f"{ratio('ORT INT8 (CPU form, not shippable)')} |")
    lines += ["", "Why the TensorRT-form INT8 model is slow on ONNX Runtime CPU: TensorRT needs symmetric INT8 "
              "activations (zero point 0), so ORT's quantizer cannot drop the ReLU/ReLU6/Clip after each Conv; "
              "they stay between Q/DQ pairs, ORT's CPU QDQ fusion cannot form QLinearConv around them, and many "
              "Convs run as DequantizeLinear -> FP32 Conv -> QuantizeLinear (extra work, not less). The CPU form "
              "(UINT8 asymmetric activations) fuses and shows what INT8 buys on this CPU. On the Jetson, "
              "TensorRT fuses Conv+activation and runs the Q/DQ model in INT8 kernels; these CPU numbers say "
              "nothing about that (see the device benchmarks)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one backbone, 20 iterations (smoke run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (default: all CPUs)")
    ap.add_argument("--iters", type=int, default=None, help="timed runs per variant (default 200; quick 20)")
    ap.add_argument("--backbones", nargs="+", choices=BACKBONES, default=None)
    args = ap.parse_args()
    iters = args.iters or (20 if args.quick else 200)
    warmup = 3 if args.quick else 20
    names = args.backbones or (["mobilenet_v3_small"] if args.quick else BACKBONES)
    calib = (np.random.default_rng(0).random((8 if args.quick else 32, 3, *SIZE), dtype=np.float32) * 4 - 2)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f}: other processes will distort these timings", file=sys.stderr)
    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-backbones-") as td:
        for name in names:
            print(f"{name} ...", flush=True)
            rows += measure(name, Path(td), iters, warmup, args.threads, calib)
    text = render(rows, args.threads, iters, warmup, args.quick or iters < 100, time.perf_counter() - start, load)
    path = write_section("backbones", text)
    print(text)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
