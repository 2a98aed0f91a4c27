"""Benchmarks of `edge-tl build` on the bundled demo; writes two sections of benchmarks/RESULTS.md:

(a) ``build-demo``: the demo's stage table (top-1, MACs, params, size, CPU latency) from a real, fresh demo
    build, with the issue's targets and the wall-clock time of the whole build;
(c) ``build-transfer``: transfer against scratch on the demo target at 5, 10 and all images per class;
(d) ``build-seeds``: the demo at several seeds (data draw and training both change): what pruning and INT8
    cost in each, so one lucky seed does not stand for the method.

    python benchmarks/bench_build.py            # full: the demo spec as shipped, shots 5/10/all (~5-8 min)
    python benchmarks/bench_build.py --quick    # smoke: fewer epochs, shots 5/10 (~2 min)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import machine_line, write_section  # noqa: E402
from rich.console import Console  # noqa: E402

from edge_tl.workstation.pipeline.report import stage_table, target_checks  # noqa: E402
from edge_tl.workstation.pipeline.run import run_build  # noqa: E402
from edge_tl.workstation.spec import load_spec  # noqa: E402

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
             "(including the from-scratch comparison).", "", stage_table(res.stages, res.latency_ms), "",
             "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {w} | {m} | {'yes' if ok else '**no**'} |"
              for w, m, ok in target_checks(res.stages, res.latency_ms, res.comparison)]
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


def seeds_table(work: Path, quick: bool, seeds: list[int], console: Console) -> str:
    rows, prune_cost, int8_cost = [], [], []
    for seed in seeds:
        over = {**(QUICK if quick else {}), "seed": seed, "report.compare_scratch": False, "report.latency_iters": 5}
        st = run_build(load_spec(None, over), work / f"seed-{seed}", console=console).stages
        ft, pr, q8 = (100 * st[k]["top1"] for k in ("finetune", "prune", "quantize"))
        prune_cost.append(ft - pr)
        int8_cost.append(ft - q8)
        rows.append(f"| {seed} | {ft:.2f}% | {pr:.2f}% | {q8:.2f}% | {ft - pr:+.2f} | {ft - q8:+.2f} | "
                    f"{100 * st['prune']['macs_removed']:.1f}% |")
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return "\n".join([
        f"## (d) The demo across seeds{' (QUICK smoke run: fewer epochs)' if quick else ''}", "", machine_line(), "",
        "The shipped demo spec with `seed` changed (it draws the 10 training images per class and seeds training). "
        "Cost = fine-tuned top-1 minus the later stage's (negative: the later stage scored higher). The test split "
        "has 400 images, so one image is 0.25 points.", "",
        "| seed | fine-tuned | pruned + recovered | INT8 Q/DQ | pruning cost | INT8 cost vs fine-tuned "
        "| MACs removed |",
        "|---|---|---|---|---|---|---|", *rows,
        f"| mean | | | | {mean(prune_cost):+.2f} | {mean(int8_cost):+.2f} | |",
        f"| worst | | | | {max(prune_cost):+.2f} | {max(int8_cost):+.2f} | |"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer epochs, shots 5 and 10")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds for the transfer table (mean)")
    ap.add_argument("--seed-runs", type=int, nargs="+", default=[0, 1, 2], help="seeds of the across-seeds table")
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
