"""Issue 14 item 1: does the backbone ranking (edge-tl rank: LogME + linear probe, no fine-tuning) agree with
the accuracies after fine-tuning, and what does it cost against the fine-tuning it replaces?

Candidates: the four backbones, each pretrained on the same source task (digits 0-4, `models/pretrain_demo.py
--backbone B`, made once into --sources and reused; mobilenet_v2's is the stored demo checkpoint). ImageNet
weights can't be downloaded here, and random-init (`none`) pairs are not transfer candidates: the ranking lists
them after every pretrained pair by design (edge_tl.workstation.rank.order_candidates; frozen random features
scored 89-95% on the probe while training those nets from scratch reached 20-72%, the 2026-11-30 05:27 run).

Two offline tasks from scikit-learn's digits: the demo (digits 5-9, 10 images per class, split seed 0) and a
second task (digits 5-9, 5 images per class, another draw: split seed 1). On each, every pretrained pair is
ranked by `edge-tl rank`'s code and fine-tuned with the build's own training code (`edge_tl.workstation.train`,
the demo's recipe, --epochs) and tested on the task's test split (accuracy with a Wilson 95% interval).
Spearman's rank correlation between each estimate and the fine-tuned accuracy over the four backbones; the
ranking's scoring time against the fine-tuning time of the four.

    .venv/bin/python benchmarks/bench_rank.py            # full (both tasks)
    .venv/bin/python benchmarks/bench_rank.py --quick    # the demo task only, 3 epochs
"""

from __future__ import annotations

import argparse
import json
import subprocess
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
from edge_tl.workstation.spec import BACKBONES, BuildSpec  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

TASKS = (("demo: digits 5-9, 10 shots, split seed 0", 10, 0), ("second: digits 5-9, 5 shots, split seed 1", 5, 1))


def _rho(a: list[float], b: list[float]) -> float:
    r = spearmanr(a, b).statistic  # rounded: with 4 items one swap gives 1 - 12/60 = 0.8, not 0.7999999999999999
    return float("nan") if r != r else round(float(r), 9)


def sources(folder: Path, epochs: int) -> dict[str, dict]:
    """One digits 0-4 checkpoint per backbone: the stored demo one for mobilenet_v2, the others pretrained here
    (``models/pretrain_demo.py --backbone B``) once and reused from ``folder``."""
    out = {}
    folder.mkdir(parents=True, exist_ok=True)
    for b in BACKBONES:
        if b == BuildSpec.demo().model.backbone:
            path = demo.demo_checkpoint()
        else:
            path = folder / f"{b}-digits0-4-e{epochs}.pt"
            if not path.is_file():
                print(f"== pretraining {b} on digits 0-4 ({epochs} epochs) -> {path}", flush=True)
                subprocess.run([sys.executable, str(REPO / "models" / "pretrain_demo.py"), "--backbone", b,
                                "--epochs", str(epochs), "--out", str(path)], check=True)
        info = json.loads(path.with_suffix(".json").read_text())
        out[b] = {"path": str(path), "test_top1": info["test_top1"], "seconds": info["seconds"],
                  "sha256": info["sha256"]}
    return out


def run_task(name: str, shots: int, seed: int, work: Path, epochs: int, threads: int, srcs: dict) -> dict:
    spec = BuildSpec.demo()
    spec = spec.model_copy(update={"seed": seed, "train": spec.train.model_copy(update={"epochs": epochs}),
                                   "report": spec.report.model_copy(update={"latency_threads": threads})})
    root = demo.target_task(work, shots=shots, seed=seed)
    # every checkpoint against every backbone: the pairs that do not fit are skipped in a moment
    ranking = rank_spec(spec, root, name, weights=[s["path"] for s in srcs.values()], latency_iters=20)
    split, arrays = load_task(root, spec)
    rows = []
    ft_seconds = 0.0
    for c in ranking.scored:
        res = finetune(spec, split, arrays, c.backbone, c.weights, seed)
        n = len(arrays["test"][1])
        low, high = wilson(int(round(res["top1"] * n)), n)
        ft_seconds += res["seconds"]
        rows.append({"backbone": c.backbone, "weights": Path(c.weights).name, "logme": c.logme,
                     "probe": c.probe.accuracy, "probe_low": c.probe.low, "probe_high": c.probe.high,
                     "top1": res["top1"], "low": low, "high": high, "seconds": res["seconds"],
                     "score_seconds": c.seconds, "latency": c.latency_ms, "macs": c.macs})
        print(f"  {c.backbone}/{Path(c.weights).name}: LogME {c.logme:.3f} probe {c.probe.accuracy:.3f} -> "
              f"fine-tuned {res['top1']:.3f} ({res['seconds']:.0f} s)", flush=True)
    acc = [r["top1"] for r in rows]
    return {"name": name, "rows": rows, "rank_seconds": ranking.seconds, "scoring_seconds": ranking.scoring_seconds,
            "ft_seconds": ft_seconds, "images": ranking.images, "test": len(arrays["test"][1]),
            "rho_logme": _rho([r["logme"] for r in rows], acc), "rho_probe": _rho([r["probe"] for r in rows], acc),
            "picked": ranking.best.backbone, "best_ft": max(rows, key=lambda r: r["top1"])["backbone"]}


def render(results: list[dict], srcs: dict, epochs: int, threads: int, quick: bool, seconds: float) -> str:
    lines = ["## Backbone ranking before training vs fine-tuned accuracy (`benchmarks/bench_rank.py`, issue 14 item 1)",
             "", ("**Smoke run** (`--quick`; not the reference numbers). " if quick else "") + machine_line(threads),
             f"torch {torch.__version__}; torch intra-op threads {torch.get_num_threads()}. CPU flags: "
             f"{'avx512_vnni' if 'avx512_vnni' in Path('/proc/cpuinfo').read_text() else 'avx2 (no avx512_vnni)'}. "
             "Candidates: the four backbones, each pretrained from scratch on the same source task (digits 0-4, "
             "`models/pretrain_demo.py --backbone B`; ImageNet weights can't be downloaded here). Ranking: `edge-tl "
             "rank`'s code (LogME on frozen penultimate features of train+val, and a logistic-regression probe, "
             "stratified 5-fold). Fine-tuning: the build's training code with the demo recipe "
             f"({epochs} epochs after 2 warm-up epochs, early stopping patience 15), one seed per task; accuracy on "
             "the task's test split (400 images) with a Wilson 95% interval. Random-init (`none`) pairs are not "
             "candidates here: `edge-tl rank` lists them after every pretrained pair (their frozen random features "
             "scored 89-95% on the probe while training them from scratch reached 20-72%: the 2026-11-30 05:27 "
             f"run of this script). Total run {seconds:.0f} s.", "",
             "| source checkpoint | digits 0-4 test top-1 | pretraining s | sha256 |", "|---|---:|---:|---|"]
    lines += [f"| {b} | {100 * s['test_top1']:.1f}% | {s['seconds']:.0f} | `{s['sha256'][:16]}` |"
              for b, s in srcs.items()]
    lines.append("")
    for r in results:
        lines += [f"### {r['name']}", "",
                  "| backbone | LogME | probe CV accuracy [95%] | fine-tuned top-1 [95%] | scoring s | fine-tune s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for x in sorted(r["rows"], key=lambda x: -x["logme"]):
            lines.append(f"| {x['backbone']} | {x['logme']:.3f} | {100 * x['probe']:.1f}% "
                         f"[{100 * x['probe_low']:.1f}, {100 * x['probe_high']:.1f}] | {100 * x['top1']:.1f}% "
                         f"[{100 * x['low']:.1f}, {100 * x['high']:.1f}] | {x['score_seconds']:.1f} | "
                         f"{x['seconds']:.0f} |")
        ratio = r["scoring_seconds"] / r["ft_seconds"]
        lines += ["", f"Spearman over the {len(r['rows'])} pretrained backbones: LogME **{r['rho_logme']:.2f}**, "
                  f"probe **{r['rho_probe']:.2f}** (target >= 0.8: "
                  f"{'met' if r['rho_logme'] >= 0.8 else '**missed**'} for LogME, "
                  f"{'met' if r['rho_probe'] >= 0.8 else '**missed**'} for the probe). "
                  f"Picked by the ranking: {r['picked']}; best after fine-tuning: {r['best_ft']}.",
                  f"Scoring time {r['scoring_seconds']:.1f} s (the whole ranking with MACs and ONNX latency "
                  f"{r['rank_seconds']:.1f} s) vs {r['ft_seconds']:.0f} s fine-tuning the same pairs: "
                  f"**{100 * ratio:.1f}%** (target < 10%: {'met' if ratio < 0.1 else '**missed**'}).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=None, help="epochs after the warm-up (default: the demo's 60)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sources", type=Path, default=Path(tempfile.gettempdir()) / "edge-tl-bench-rank-sources",
                    help="where the pretrained source checkpoints are made once and reused")
    ap.add_argument("--source-epochs", type=int, default=30, help="pretraining epochs (models/pretrain_demo.py)")
    args = ap.parse_args()
    epochs = args.epochs or (3 if args.quick else BuildSpec.demo().train.epochs)
    torch.set_num_threads(1)  # OpenMP threads spin and crawl when other processes share the cores
    start = time.perf_counter()
    srcs = sources(args.sources, args.source_epochs)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-rank-") as td:
        for name, shots, seed in TASKS[:1] if args.quick else TASKS:
            print(f"== {name}", flush=True)
            results.append(run_task(name, shots, seed, Path(td), epochs, args.threads, srcs))
    text = render(results, srcs, epochs, args.threads, args.quick, time.perf_counter() - start)
    print(text)
    print(f"\nwrote {write_section('bench_rank', text)}")
    np.seterr(all="ignore")


if __name__ == "__main__":
    main()
