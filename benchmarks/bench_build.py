"""Benchmarks of `edge-tl build` on the bundled demo; writes two sections of benchmarks/RESULTS.md:

(a) ``build-demo``: the demo's stage table (top-1, MACs, params, size, CPU latency) from a real, fresh demo
    build, with the issue's targets and the wall-clock time of the whole build;
(c) ``build-transfer``: transfer against scratch on the demo target at 5, 10 and all images per class;
(d) ``build-seeds``: the demo at seeds 0-4 (data draw and training both change): each stage's top-1 with its 95%
    interval and its cost, mean and worst, INT8 as written (Q/DQ in float) beside ONNX Runtime's CPU kernels,
    the manifest's INT8 top-1 against ONNX's reference evaluator, and the model hashes of seed 0 built twice.

    python benchmarks/bench_build.py            # full: the demo spec as shipped, shots 5/10/all (~5-8 min)
    python benchmarks/bench_build.py --quick    # smoke: fewer epochs, shots 5/10 (~2 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from rich.console import Console  # noqa: E402

from edge_tl.pipeline import run_build  # noqa: E402
from edge_tl.report import stage_table, target_checks, verdict_cell  # noqa: E402
from edge_tl.spec import load_spec  # noqa: E402

QUICK = {"train.epochs": 12, "prune.recovery_epochs": 8, "report.latency_iters": 20}


def demo_table(work: Path, quick: bool, console: Console) -> str:
    spec = load_spec(None, QUICK if quick else {})
    start = time.perf_counter()
    res = run_build(spec, work / "demo", console=console)
    wall = time.perf_counter() - start
    lines = [f"## (a) Demo build: stage table{' (QUICK smoke run: fewer epochs)' if quick else ''}", "",
             machine_line(spec.report.latency_threads), "",
             f"`edge-tl build` (the bundled demo: digits 5-9, 10 images per class, mobilenet_v2 at 32x32 from "
             f"`models/demo_source.pt`), fresh run folder: **{wall:.0f} s** wall clock for the whole build "
             "(including the from-scratch comparison).", "", stage_table(res.stages, res.latency_ms, res.stats), "",
             "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {w} | {m} | {verdict_cell(v)} |"
              for w, m, v in target_checks(res.stages, res.latency_ms, res.comparison, res.stats)]
    lines += ["", "Latency: batch 1, median, PyTorch eager for the torch rows, ONNX Runtime CPU for the ONNX rows, all "
              "measured in the same run."]
    return "\n".join(lines)


def transfer_table(work: Path, quick: bool, seeds: list[int], console: Console) -> str:
    shots_list = ["5", "10"] if quick else ["5", "10", "all"]
    rows = []
    for shots in shots_list:
        t_acc, s_acc, n_train = [], [], 0
        for seed in seeds:
            over = {**(QUICK if quick else {}), "data.demo_shots": int(shots) if shots != "all" else "all",
                    "prune.enabled": False, "seed": seed, "report.latency_iters": 5}
            res = run_build(load_spec(None, over), work / f"transfer-{shots}-s{seed}", console=console)
            t_acc.append(res.comparison["transfer_top1"])
            s_acc.append(res.comparison["scratch_top1"])
            n_train = res.comparison["train_images"]
        t, s = 100 * sum(t_acc) / len(t_acc), 100 * sum(s_acc) / len(s_acc)
        rows.append(f"| {shots} | {n_train} | {t:.1f}% | {s:.1f}% | {t - s:+.1f} |")
    return "\n".join([
        f"## (c) Transfer against scratch on the demo target{' (QUICK smoke run: fewer epochs)' if quick else ''}",
        "", machine_line(), "",
        "Same network (mobilenet_v2, 32x32), same split (80 test and 20 val images per class), same epoch budget "
        "(scratch gets all of it: no early stopping, best val checkpoint kept); transfer starts from "
        "`models/demo_source.pt` (pretrained on digits 0-4), scratch from "
        f"random weights. Test top-1 after fine-tuning (before pruning), mean over seed(s) {seeds}.", "",
        "| images per class | training images | transfer | scratch | gap (points) |", "|---|---|---|---|---|",
        *rows])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_int8_top1(res) -> tuple[float, int]:
    """The bundle's INT8 model re-measured independently of ONNX Runtime: ONNX's pure-numpy reference evaluator
    (onnx.reference) runs every QuantizeLinear/DequantizeLinear as the ONNX spec writes it, on the run's test
    images re-read from the data split and preprocessed by the bundle's own preprocess.json."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    from edge_tl.data import DataSplit
    from edge_tl.preprocess import PreprocessConfig
    from edge_tl.train.datasets import eval_arrays

    split = DataSplit.from_json(next(res.run_dir.glob("stages/data-*/split.json")).read_text())
    pre = PreprocessConfig.load(res.bundle_dir / "preprocess.json")
    x, y = eval_arrays(split.paths("test"), split.labels("test"), pre)
    model = onnx.load(str(res.bundle_dir / "model.int8.onnx"))
    for op in model.opset_import:  # onnx.reference implements Q/DQ from opset 19 (same maths for INT8 as 13)
        if op.domain in ("", "ai.onnx") and op.version < 19:
            op.version = 19
    ref = ReferenceEvaluator(model)
    pred = np.concatenate([ref.run(None, {"input": x[i:i + 50]})[0].argmax(1) for i in range(0, len(x), 50)])
    return float((pred == y).mean()), len(y)


def seeds_table(work: Path, quick: bool, seeds: list[int], console: Console) -> str:
    """The demo at each seed: each stage's top-1 (95% Wilson interval) and cost, mean and worst; the INT8 model
    as written (Q/DQ in float) and on ONNX Runtime's CPU kernels; the manifest's INT8 top-1 against an
    independent re-measurement; and a second build of the first seed for the model hashes."""
    from edge_tl.stats import wilson

    rows, costs, checks, walls = [], {k: [] for k in COSTS}, [], []
    first = None
    for seed in seeds:
        over = {**(QUICK if quick else {}), "seed": seed, "report.compare_scratch": False, "report.latency_iters": 5}
        start = time.perf_counter()
        res = run_build(load_spec(None, over), work / f"seed-{seed}", console=console)
        walls.append(time.perf_counter() - start)
        first = first or res
        st = res.stages
        n = res.stats["test_images"]
        acc = {k: 100 * st[k]["top1"] for k in ("finetune", "prune", "export", "quantize")}
        acc["kernels"] = 100 * st["quantize"]["top1_ort_cpu_kernels"]
        for k, (a, b) in COSTS.items():
            costs[k].append(acc[a] - acc[b])
        ref_top1, ref_n = reference_int8_top1(res)
        manifest_top1 = json.loads((res.bundle_dir / "manifest.json").read_text())["stages"]["quantize"]["top1"]
        checks.append((seed, 100 * manifest_top1, 100 * ref_top1, ref_n))
        cells = []
        for k in ("finetune", "prune", "export", "quantize", "kernels"):
            lo, hi = wilson(round(acc[k] * n / 100), n)
            cells.append(f"{acc[k]:.2f}% ({100 * lo:.1f}–{100 * hi:.1f})")
        rows.append(f"| {seed} | " + " | ".join(cells) + " | " + " | ".join(f"{costs[k][-1]:+.2f}" for k in COSTS)
                    + f" | {100 * st['prune']['macs_removed']:.1f}% |")
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    blank = "| " * 6
    # same spec, same seed, same machine, a fresh run folder: are the models byte-identical?
    again = run_build(load_spec(None, {**(QUICK if quick else {}), "seed": seeds[0], "report.compare_scratch": False,
                                       "report.latency_iters": 5}), work / f"seed-{seeds[0]}-again", console=console)
    repro = []
    for name, rel in (("fine-tuned model.pt", "finetune"), ("pruned model.pt", "prune")):
        a = _sha(next(first.run_dir.glob(f"stages/{rel}-*/model.pt")))
        b = _sha(next(again.run_dir.glob(f"stages/{rel}-*/model.pt")))
        repro.append((name, a, b))
    for name in ("model.onnx", "model.int8.onnx"):
        repro.append((name, _sha(first.bundle_dir / name), _sha(again.bundle_dir / name)))
    return "\n".join([
        f"## (d) The demo across seeds{' (QUICK smoke run: fewer epochs)' if quick else ''}", "", machine_line(), "",
        f"`python benchmarks/bench_build.py --only seeds` (seeds {seeds}): the shipped demo spec with `seed` changed "
        "(it draws the 10 training images per class and seeds training), scratch comparison off. Each build took "
        f"{min(walls):.0f}-{max(walls):.0f} s here. Top-1 on the {n} test images with its 95% Wilson interval "
        "(one image is 0.25 points). *INT8* is the Q/DQ model as written, Q/DQ evaluated in float (what TensorRT "
        "computes, the manifest's `stages.quantize.top1`); *INT8, ORT CPU kernels* is the same model on ONNX "
        "Runtime's fused CPU integer kernels, whose numerics depend on the CPU (this one: "
        f"{cpu_flags()}). Cost = earlier stage minus later stage, in points (negative: the later stage scored "
        "higher).", "",
        "| seed | fine-tuned | pruned + recovered | ONNX FP32 | INT8 (Q/DQ in float) | INT8, ORT CPU kernels | "
        + " | ".join(COSTS) + " | MACs removed |",
        "|---|" + "---|" * (6 + len(COSTS)), *rows,
        f"| mean {blank}" + " | ".join(f"{mean(costs[k]):+.2f}" for k in COSTS) + " | |",
        f"| worst {blank}" + " | ".join(f"{max(costs[k]):+.2f}" for k in COSTS) + " | |", "",
        "Target *INT8 cost vs FP32 ONNX <= 0.5 point (mean of seeds), <= 1.0 (worst)*: "
        f"mean {mean(costs['INT8 cost vs ONNX FP32']):+.2f}, worst {max(costs['INT8 cost vs ONNX FP32']):+.2f} -> "
        + ("met" if mean(costs["INT8 cost vs ONNX FP32"]) <= 0.5 and max(costs["INT8 cost vs ONNX FP32"]) <= 1.0
           else "missed") + ".", "",
        "Manifest INT8 top-1 against an independent re-measurement (ONNX's pure-numpy reference evaluator, "
        "`onnx.reference`, on the test images re-read and preprocessed with the bundle's preprocess.json; "
        "target: within 1 point):", "",
        "| seed | manifest `stages.quantize.top1` | onnx.reference | difference (points) |", "|---|---|---|---|",
        *[f"| {sd} | {m:.2f}% | {r:.2f}% | {m - r:+.2f} |" for sd, m, r, _ in checks], "",
        f"Reproducibility: seed {seeds[0]} built twice on this machine, each in a fresh run folder (sha256, first "
        "16 hex digits):", "",
        "| file | first build | second build | identical |", "|---|---|---|---|",
        *[f"| {name} | `{a[:16]}` | `{b[:16]}` | {'yes' if a == b else '**no**'} |" for name, a, b in repro]])


COSTS = {"pruning cost": ("finetune", "prune"), "export cost": ("prune", "export"),
         "INT8 cost vs ONNX FP32": ("export", "quantize"), "INT8 cost vs fine-tuned": ("finetune", "quantize"),
         "ORT kernels vs INT8 as written": ("quantize", "kernels")}


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "flags unknown"
    vnni = "AVX-512 VNNI" if "avx512_vnni" in flags else ("AVX-VNNI" if "avx_vnni" in flags else "no VNNI")
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    return f"{isa}, {vnni}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer epochs, shots 5 and 10")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds for the transfer table (mean)")
    ap.add_argument("--seed-runs", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                    help="seeds of the across-seeds table (the first is built twice: model hashes)")
    ap.add_argument("--only", choices=["demo", "transfer", "seeds"], help="run one section")
    args = ap.parse_args()
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="bench-build-") as td:
        work = Path(td)
        if args.only in (None, "demo"):
            write_section("build-demo", demo_table(work, args.quick, console))
        if args.only in (None, "transfer"):
            write_section("build-transfer", transfer_table(work, args.quick, args.seeds, console))
        if args.only in (None, "seeds"):
            write_section("build-seeds", seeds_table(work, args.quick, args.seed_runs, console))
        print("wrote benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
