"""Issue 14 items 3 and 2: does the negative-transfer guard fire on a hurtful source and never on the good one
(seeds 0-4), and what does mode = "auto" pick on the demo?

Guard: for each seed, the demo build (`edge-tl build`'s own `run_build`, the shipped demo spec, scratch baseline
on) runs twice in one run folder: from `models/demo_dead.pt` (the good source with every ReLU6 unit dead,
`python models/make_dead_checkpoint.py`) and from `models/demo_source.pt` (digits 0-4, true labels); the data and
scratch stages are shared. Pruning is off (the guard decides before it). Target: detected on the hurtful
checkpoint on every seed, never on the good one.

Mode auto: the demo build with `train.mode = "auto"` (pruning off) on the same seeds: which mode it keeps, the
validation top-1 of both, the test top-1 of the kept one, and the finetune stage's time against `finetune` alone.

    .venv/bin/python benchmarks/bench_transfer.py              # both parts, seeds 0-4
    .venv/bin/python benchmarks/bench_transfer.py --only guard --seeds 0
    .venv/bin/python benchmarks/bench_transfer.py --quick      # seed 0 only (smoke run)
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from rich.console import Console  # noqa: E402

from edge_tl.workstation.pipeline.run import run_build  # noqa: E402
from edge_tl.workstation.spec import BuildSpec  # noqa: E402
from edge_tl.workstation.stats import wilson  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HURTFUL = REPO / "models" / "demo_dead.pt"


def _spec(seed: int, **train) -> BuildSpec:
    d = BuildSpec.demo().model_dump(mode="json")
    d["seed"] = seed
    d["prune"]["enabled"] = False
    d["train"].update(train)
    return BuildSpec.model_validate(d)


def _build(spec: BuildSpec, run: Path, weights: str | None = None) -> tuple[dict, float]:
    if weights:
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"weights": weights})})
    start = time.perf_counter()
    run_build(spec, run, overwrite=True, console=Console(file=io.StringIO(), width=200))
    return json.loads((run / "metrics.json").read_text()), time.perf_counter() - start


def _acc(top1: float, n: int) -> str:
    lo, hi = wilson(round(top1 * n), n)
    return f"{100 * top1:.1f}% ({100 * lo:.1f}–{100 * hi:.1f})"


def guard(seeds: list[int], work: Path) -> str:
    import subprocess

    if not HURTFUL.is_file():  # derived from models/demo_source.pt in a second, not stored
        subprocess.run([sys.executable, str(HURTFUL.with_name("make_dead_checkpoint.py"))], check=True)
    rows, fired = [], {"hurtful": [], "good": []}
    for seed in seeds:
        run = work / f"guard-s{seed}"
        for name, weights in (("hurtful", str(HURTFUL)), ("good", "demo")):
            m, secs = _build(_spec(seed), run, weights)
            t, st = m["transfer"], m["stages"]
            g = t["negative_transfer"]
            n = m["stats"]["test_images"]
            fired[name].append(g["fired"])
            lo, hi = g["ci95_points"]
            rows.append(f"| {seed} | {name} | {100 * g['pretrained_val_top1']:.0f}% "
                        f"| {100 * g['scratch_val_top1']:.0f}% "
                        f"| {g['diff_points']:+.0f} ({lo:+.0f} to {hi:+.0f}) | {g['p_pretrained_better']:.2g} | "
                        f"{g['verdict']} | **{'yes' if g['fired'] else 'no'}** | {t['continued_from']} | "
                        f"{_acc(st['finetune']['top1'], n)} | {_acc(st['scratch']['top1'], n)} | "
                        f"{_acc(st['quantize']['top1'], n)} | {secs:.0f} s |")
            print(rows[-1], flush=True)
    ok = all(fired["hurtful"]) and not any(fired["good"])
    return "\n".join([
        "## Negative-transfer guard: hurtful vs good source checkpoint (`benchmarks/bench_transfer.py`, issue 14 "
        "item 3)", "", machine_line(), f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads.", "",
        "The shipped demo build (digits 5-9, 10 training images per class, mobilenet_v2 at 32x32, 60 epochs + 2 "
        "warm-up, scratch baseline on, `train.continue_with = \"auto\"`), pruning off, per seed from two sources: "
        "*hurtful* = `models/demo_dead.pt` (the good source with every ReLU6 unit dead, "
        "`models/make_dead_checkpoint.py`), "
        "*good* = `models/demo_source.pt` (digits 0-4). The guard pairs the fine-tuned and the from-scratch model "
        "on the 100 validation images: it stays quiet only when a one-sided exact McNemar test says the pretrained "
        "start is better (p < 0.05). Validation top-1 of the best epoch; difference with its paired-bootstrap 95% "
        "interval; test top-1 (400 images) with 95% Wilson intervals; *shipped* = the INT8 model of the model "
        "that continued.", "",
        "| seed | source | val pretrained | val scratch | diff (points, 95% CI) | McNemar p (pretrained better) | "
        "verdict | guard fired | continued | test fine-tuned | test scratch | test shipped (INT8) | build |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"Detected on the hurtful checkpoint: {sum(fired['hurtful'])}/{len(seeds)} seeds; on the good one: "
        f"{sum(fired['good'])}/{len(seeds)}. Target (every seed on the hurtful one, never on the good one): "
        f"**{'met' if ok else 'missed'}**."])


def mode_auto(seeds: list[int], work: Path) -> str:
    rows = []
    for seed in seeds:
        run = work / f"mode-s{seed}"
        m, secs = _build(_spec(seed, mode="auto"), run)
        ft = m["stages"]["finetune"]
        a = ft["mode_auto"]
        tried = a["tried"]
        n = m["stats"]["test_images"]
        rows.append(f"| {seed} | {100 * tried['feature-extract']['val_top1']:.0f}% "
                    f"({tried['feature-extract']['epochs_run']} ep, {tried['feature-extract']['train_seconds']:.0f} s) "
                    f"| {100 * tried['finetune']['val_top1']:.0f}% ({tried['finetune']['epochs_run']} ep, "
                    f"{tried['finetune']['train_seconds']:.0f} s) | **{a['chosen']}** | {_acc(ft['top1'], n)} | "
                    f"{secs:.0f} s |")
        print(rows[-1], flush=True)
    return "\n".join([
        "## mode = \"auto\" on the demo (`benchmarks/bench_transfer.py --only mode`, issue 14 item 2)", "",
        machine_line(), "",
        "The demo build with `train.mode = \"auto\"` (pruning off): feature extraction (frozen backbone, head only, "
        "62 epochs at lr_head) and fine-tuning (2 head-only warm-up epochs, then all layers with the backbone at "
        "lr_backbone, 60 epochs) from the same checkpoint and seed, early stopping on validation (patience 15); "
        "the higher best validation top-1 (100 images) is kept. Test top-1 of the kept model with its 95% Wilson "
        "interval; build = the whole build's wall clock (scratch baseline included, pruning off).", "",
        "| seed | feature-extract val | finetune val | kept | test top-1 (kept) | build |",
        "|---|---|---|---|---|---|", *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--only", choices=("guard", "mode"))
    ap.add_argument("--quick", action="store_true", help="smoke run: seed 0 only")
    args = ap.parse_args()
    if args.quick:
        args.seeds = args.seeds[:1]
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as td:
        if args.only in (None, "guard"):
            write_section("transfer-guard", guard(args.seeds, Path(td)))
        if args.only in (None, "mode"):
            write_section("mode-auto", mode_auto(args.seeds, Path(td)))


if __name__ == "__main__":
    main()
