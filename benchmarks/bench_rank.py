"""Issue 14 item 1: does the backbone ranking (edge-tl rank: LogME + linear probe, no fine-tuning) agree with
the accuracies after fine-tuning, and what does it cost against the fine-tuning it replaces?

Two offline tasks from scikit-learn's digits: the demo (digits 5-9, 10 images per class, split seed 0) and a
second task (digits 5-9, 5 images per class, another draw: split seed 1). On each, every backbone/weights pair
the ranking scores (the four backbones with `none`, and the demo's source checkpoint where it fits; the
ImageNet weights when cached) is fine-tuned with the build's own training code (`edge_tl.workstation.train`,
the demo's recipe, --epochs) and tested on the task's test split (accuracy with a Wilson
95% interval). Spearman's rank correlation between each estimate and the fine-tuned accuracy is reported over
all scored pairs and over the four backbones (each with the weights the demo build would use for it).

    .venv/bin/python benchmarks/bench_rank.py            # full (both tasks)
    .venv/bin/python benchmarks/bench_rank.py --quick    # the demo task only, 3 epochs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _finetune import finetune, load_task, wilson  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from edge_tl.workstation import demo  # noqa: E402
from edge_tl.workstation.rank import rank_spec  # noqa: E402
from edge_tl.workstation.spec import BuildSpec  # noqa: E402

TASKS = (("demo: digits 5-9, 10 shots, split seed 0", 10, 0), ("second: digits 5-9, 5 shots, split seed 1", 5, 1))


def _rho(a: list[float], b: list[float]) -> float:
    r = spearmanr(a, b).statistic
    return float("nan") if r != r else float(r)


def run_task(name: str, shots: int, seed: int, work: Path, epochs: int, threads: int) -> dict:
    spec = BuildSpec.demo()
    spec = spec.model_copy(update={"seed": seed, "train": spec.train.model_copy(update={"epochs": epochs}),
                                   "report": spec.report.model_copy(update={"latency_threads": threads})})
    root = demo.target_task(work, shots=shots, seed=seed)
    ranking = rank_spec(spec, root, name, latency_iters=20)
    split, arrays = load_task(root, spec)
    rows = []
    ft_seconds = 0.0
    for c in ranking.scored:
        weights = str(demo.demo_checkpoint()) if c.weights == "demo" else c.weights
        res = finetune(spec, split, arrays, c.backbone, weights, seed)
        n = len(arrays["test"][1])
        low, high = wilson(int(round(res["top1"] * n)), n)
        ft_seconds += res["seconds"]
        rows.append({"backbone": c.backbone, "weights": c.weights, "logme": c.logme, "probe": c.probe.accuracy,
                     "probe_low": c.probe.low, "probe_high": c.probe.high, "top1": res["top1"], "low": low,
                     "high": high, "seconds": res["seconds"], "latency": c.latency_ms, "macs": c.macs})
        print(f"  {c.backbone}/{c.weights}: LogME {c.logme:.3f} probe {c.probe.accuracy:.3f} -> fine-tuned "
              f"{res['top1']:.3f} ({res['seconds']:.0f} s)", flush=True)
    acc = [r["top1"] for r in rows]
    build_pairs = [r for r in rows if r["weights"] == ("demo" if r["backbone"] == "mobilenet_v2" else "none")]
    out = {"name": name, "rows": rows, "rank_seconds": ranking.seconds, "scoring_seconds": ranking.scoring_seconds,
           "ft_seconds": ft_seconds, "images": ranking.images, "test": len(arrays["test"][1]),
           "rho_logme_all": _rho([r["logme"] for r in rows], acc),
           "rho_probe_all": _rho([r["probe"] for r in rows], acc),
           "rho_logme_4": _rho([r["logme"] for r in build_pairs], [r["top1"] for r in build_pairs]),
           "rho_probe_4": _rho([r["probe"] for r in build_pairs], [r["top1"] for r in build_pairs]),
           "picked": ranking.best.backbone + "/" + ranking.best.weights,
           "best_ft": max(rows, key=lambda r: r["top1"])}
    return out


def render(results: list[dict], epochs: int, threads: int, quick: bool, seconds: float) -> str:
    lines = ["## Backbone ranking before training vs fine-tuned accuracy (`benchmarks/bench_rank.py`, issue 14 item 1)",
             "", ("**Smoke run** (`--quick`; not the reference numbers). " if quick else "") + machine_line(threads),
             f"torch {torch.__version__}; torch intra-op threads {torch.get_num_threads()}. Ranking: `edge-tl rank`'s "
             "code (LogME on frozen penultimate features of train+val, and a logistic-regression probe, stratified "
             "5-fold). Fine-tuning: the build's training code with the demo recipe "
             f"({epochs} epochs after 2 warm-up epochs, early stopping patience 15; weights `none` train with the "
             "build's from-scratch recipe, its scratch stage, same number of epochs), one seed per task; accuracy on "
             "the task's test split (400 images) with a Wilson 95% interval. Spearman over all scored pairs, and "
             "over the four backbones with the weights the demo build would use (mobilenet_v2: the demo checkpoint; "
             "the others have no digits checkpoint: `none`). ImageNet weights are not in this machine's cache "
             "(offline), so they are not candidates. CPU flags: "
             f"{'avx512_vnni' if 'avx512_vnni' in Path('/proc/cpuinfo').read_text() else 'avx2 (no avx512_vnni)'}. "
             f"Total run {seconds:.0f} s.", ""]
    for r in results:
        lines += [f"### {r['name']}", "",
                  "| backbone | weights | LogME | probe CV accuracy [95%] | fine-tuned top-1 [95%] | fine-tune s |",
                  "|---|---|---:|---:|---:|---:|"]
        for x in sorted(r["rows"], key=lambda x: -x["logme"]):
            lines.append(f"| {x['backbone']} | {x['weights']} | {x['logme']:.3f} | {100 * x['probe']:.1f}% "
                         f"[{100 * x['probe_low']:.1f}, {100 * x['probe_high']:.1f}] | {100 * x['top1']:.1f}% "
                         f"[{100 * x['low']:.1f}, {100 * x['high']:.1f}] | {x['seconds']:.0f} |")
        ratio = r["rank_seconds"] / r["ft_seconds"]
        lines += ["", f"Spearman, all {len(r['rows'])} pairs: LogME **{r['rho_logme_all']:.2f}**, probe "
                  f"**{r['rho_probe_all']:.2f}**; the four backbones (build weights): LogME "
                  f"**{r['rho_logme_4']:.2f}**, "
                  f"probe **{r['rho_probe_4']:.2f}** (target >= 0.8: "
                  f"{'met' if min(r['rho_logme_all'], r['rho_logme_4']) >= 0.8 else '**missed**'} for LogME). "
                  f"Picked by the ranking: {r['picked']}; best after fine-tuning: {r['best_ft']['backbone']}/"
                  f"{r['best_ft']['weights']}.",
                  f"Ranking time {r['rank_seconds']:.1f} s ({r['scoring_seconds']:.1f} s scoring, the rest MACs and "
                  f"latency) vs {r['ft_seconds']:.0f} s fine-tuning all pairs: **{100 * ratio:.1f}%** "
                  f"(target < 10%: {'met' if ratio < 0.1 else '**missed**'}).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=None, help="epochs after the warm-up (default: the demo's 60)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    epochs = args.epochs or (3 if args.quick else BuildSpec.demo().train.epochs)
    torch.set_num_threads(1)  # OpenMP threads spin and crawl when other processes share the cores
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-rank-") as td:
        for name, shots, seed in TASKS[:1] if args.quick else TASKS:
            print(f"== {name}", flush=True)
            results.append(run_task(name, shots, seed, Path(td), epochs, args.threads))
    text = render(results, epochs, args.threads, args.quick, time.perf_counter() - start)
    print(text)
    print(f"\nwrote {write_section('bench_rank', text)}")
    np.seterr(all="ignore")


if __name__ == "__main__":
    main()
