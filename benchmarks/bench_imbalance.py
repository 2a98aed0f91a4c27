"""Issue 14 item 4: balanced accuracy with and without class balancing on an imbalanced variant of the demo.

The demo's target task (digits 5-9) with 40 training images for digits 5 and 6 and 4 for digits 7, 8 and 9
(ratio 10x; validation 20 and test 80 images per class, as in the demo). Each `train.balance` setting is
fine-tuned with the build's own training code (the demo recipe: mobilenet_v2 from the demo checkpoint, --epochs)
for seeds 0-2; the test split's balanced accuracy (mean per-class recall) is reported per seed with a bootstrap
95% interval, and across seeds as mean (t 95% interval) and worst seed.

    .venv/bin/python benchmarks/bench_imbalance.py            # full
    .venv/bin/python benchmarks/bench_imbalance.py --quick    # one seed, 3 epochs
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _finetune import balanced_accuracy, bootstrap_balanced, finetune, load_task, t_interval  # noqa: E402
from _results import machine_line, write_section  # noqa: E402

from edge_tl.workstation import demo  # noqa: E402
from edge_tl.workstation.spec import BuildSpec  # noqa: E402

COUNTS = {"5": 40, "6": 40, "7": 4, "8": 4, "9": 4}
SETTINGS = (("none", "none", "weighted-ce"), ("sampler", "sampler", "weighted-ce"),
            ("loss (weighted CE)", "loss", "weighted-ce"), ("loss (focal, gamma 2)", "loss", "focal"))
# train.balance = "auto" is not trained separately: on this data (10x > data.imbalance_ratio 3x) it resolves to
# "sampler" (tests/test_balance.py checks the rule), the same code path and seeds as the sampler rows.


def imbalanced_task(work: Path) -> Path:
    src = demo.target_task(work / "src", shots=None, seed=0)
    dst = work / "digits-5-9-imbalanced"
    for split in ("val", "test"):
        shutil.copytree(src / split, dst / split)
    for cls, n in COUNTS.items():
        files = sorted((src / "train" / cls).iterdir())[:n]
        (dst / "train" / cls).mkdir(parents=True)
        for f in files:
            shutil.copy2(f, dst / "train" / cls / f.name)
    return dst


def render(rows: dict[str, list[dict]], epochs: int, seeds: list[int], quick: bool, seconds: float) -> str:
    lines = ["## Class imbalance: balanced accuracy with and without balancing (`benchmarks/bench_imbalance.py`, "
             "issue 14 item 4)", "", ("**Smoke run** (`--quick`; not the reference numbers). " if quick else "")
             + machine_line(), f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads. CPU flags: "
             f"{'avx512_vnni' if 'avx512_vnni' in Path('/proc/cpuinfo').read_text() else 'avx2 (no avx512_vnni)'}. "
             "Data: the demo's digits 5-9 with training images per class "
             f"{', '.join(f'{k}: {v}' for k, v in COUNTS.items())} (10x), validation 20 and test 80 per class. "
             "Training: the build's fine-tune code and demo recipe (mobilenet_v2 from the demo checkpoint, 2 warm-up "
             f"epochs + {epochs} epochs, early stopping on validation), seeds {', '.join(map(str, seeds))}. "
             "Balanced accuracy = mean per-class recall on the test split; per seed with a bootstrap 95% interval "
             "(1000 resamples within each class), across seeds the mean with a t 95% interval and the worst seed. "
             f"Total run {seconds:.0f} s.", "",
             "| train.balance | balanced acc. mean [95%] | worst seed | per seed [bootstrap 95%] | "
             "recall of the 4-image classes (mean) |", "|---|---:|---:|---|---:|"]
    base = None
    for label, rs in rows.items():
        vals = [r["bal"] for r in rs]
        lo, hi = t_interval(vals)
        per = "; ".join(f"s{r['seed']} {100 * r['bal']:.1f} [{100 * r['lo']:.1f}, {100 * r['hi']:.1f}]" for r in rs)
        small = np.mean([r["small_recall"] for r in rs])
        lines.append(f"| {label} | {100 * np.mean(vals):.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | "
                     f"{100 * min(vals):.1f}% | {per} | {100 * small:.1f}% |")
        if base is None:
            base = (np.mean(vals), min(vals))
    lines += ["", "Gain over `none` (points; target >= 5):", ""]
    for label, rs in list(rows.items())[1:]:
        vals = [r["bal"] for r in rs]
        gain_mean, gain_worst = 100 * (np.mean(vals) - base[0]), 100 * (min(vals) - base[1])
        lines.append(f"- {label}: mean {gain_mean:+.1f}, worst seed {gain_worst:+.1f} "
                     f"({'met' if gain_mean >= 5 and gain_worst >= 5 else '**missed**'})")
    from edge_tl.workstation.train.balance import resolve

    labels = np.repeat(np.arange(len(COUNTS)), list(COUNTS.values()))
    lines += ["", f"`train.balance = \"auto\"` resolves to `{resolve('auto', labels, len(COUNTS), 3.0)['used']}` on "
              "this data (10x > `data.imbalance_ratio` 3x), so its numbers are the sampler row's (same code, seeds)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=None, help="epochs after the warm-up (default: the demo's 60)")
    args = ap.parse_args()
    epochs = args.epochs or (3 if args.quick else BuildSpec.demo().train.epochs)
    torch.set_num_threads(1)  # OpenMP threads spin and crawl when other processes share the cores
    seeds = [0] if args.quick else [0, 1, 2]
    start = time.perf_counter()
    spec = BuildSpec.demo()
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": epochs})})
    weights = str(demo.demo_checkpoint())
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-imbalance-") as td:
        root = imbalanced_task(Path(td))
        split, arrays = load_task(root, spec)
        y = arrays["test"][1]
        small = [split.classes.index(c) for c, n in COUNTS.items() if n == min(COUNTS.values())]
        for label, balance, loss in SETTINGS:
            for seed in seeds:
                res = finetune(spec, split, arrays, "mobilenet_v2", weights, seed, balance, loss)
                pred = res["pred"]
                lo, hi = bootstrap_balanced(y, pred, seed=seed)
                r = {"seed": seed, "bal": balanced_accuracy(y, pred), "lo": lo, "hi": hi, "top1": res["top1"],
                     "small_recall": float(np.mean([(pred[y == c] == c).mean() for c in small])),
                     "used": res["setup"]["used"]}
                rows.setdefault(label, []).append(r)
                print(f"  {label} seed {seed}: balanced {r['bal']:.3f} [{lo:.3f}, {hi:.3f}] top1 {r['top1']:.3f} "
                      f"({res['seconds']:.0f} s)", flush=True)
    Path(tempfile.gettempdir(), "bench_imbalance_rows.json").write_text(json.dumps(rows, default=float))
    text = render(rows, epochs, seeds, args.quick, time.perf_counter() - start)
    print(text)
    print(f"\nwrote {write_section('bench_imbalance', text)}")


if __name__ == "__main__":
    main()
