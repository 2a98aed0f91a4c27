"""Issue 14 item 5: the effect of the augmentation policies at 5 and 10 training images per class on the demo.

The demo's target task (digits 5-9, validation 20 and test 80 images per class) with 5 and 10 training images
per class, each `train.augment` policy fine-tuned with the build's own training code (the demo recipe:
mobilenet_v2 at 32x32 from models/demo_source.pt, no flips: the demo is `data.kind = "digits"`) on seeds 0-2
(the seed draws the training images and seeds training). Test top-1 per run with its 95% Wilson interval;
across seeds the mean with a t 95% interval and the worst seed.

    .venv/bin/python benchmarks/bench_augment.py
    .venv/bin/python benchmarks/bench_augment.py --quick     # one seed, 3 epochs (smoke run)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _finetune import finetune, load_task, t_interval, wilson  # noqa: E402
from _results import machine_line, write_section  # noqa: E402

from edge_tl.workstation import demo  # noqa: E402
from edge_tl.workstation.spec import BuildSpec  # noqa: E402

POLICIES = ("none", "light", "trivialaugment", "randaugment")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = args.epochs or (3 if args.quick else BuildSpec.demo().train.epochs)
    start = time.perf_counter()
    results: dict[tuple[int, str], list[float]] = {}
    n_test = 0
    with tempfile.TemporaryDirectory(prefix="bench-augment-") as td:
        for shots in args.shots:
            for seed in seeds:
                root = demo.target_task(Path(td) / f"s{shots}-{seed}", shots=shots, seed=seed)
                for policy in POLICIES:
                    d = BuildSpec.demo().model_dump(mode="json")
                    d["seed"] = seed
                    d["train"].update(augment=policy, epochs=epochs)
                    spec = BuildSpec.model_validate(d)
                    split, arrays = load_task(root, spec)
                    r = finetune(spec, split, arrays, spec.model.backbone, str(demo.demo_checkpoint()), seed)
                    n_test = len(arrays["test"][1])
                    results.setdefault((shots, policy), []).append(r["top1"])
                    print(f"shots {shots} seed {seed} {policy}: {100 * r['top1']:.2f}% ({r['seconds']:.0f} s)",
                          flush=True)
    lines = ["## Augmentation at 5 and 10 images per class (`benchmarks/bench_augment.py`, issue 14 item 5)", "",
             ("**Smoke run** (`--quick`; not the reference numbers). " if args.quick else "") + machine_line(),
             f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
             f"{time.perf_counter() - start:.0f} s in all.", "",
             "Demo target task (digits 5-9; 80 test images per class, 400 in all), the demo recipe (mobilenet_v2 at "
             f"32x32 from `models/demo_source.pt`, {epochs} epochs + 2 warm-up, early stopping on the 100 validation "
             "images, no flips), fine-tuned with the build's training code for each `train.augment` policy; seeds "
             f"{seeds} (each seed draws other training images). Per seed: test top-1 with its 95% Wilson interval. "
             "Across seeds: mean with its t 95% interval, and the worst seed. `light` is what `auto` resolves to for "
             "`data.kind = \"digits\"` (the demo's default).", "",
             "| images per class | policy | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (95% CI) | worst |",
             "|---|---|" + "---|" * len(seeds) + "---|---|"]
    for shots in args.shots:
        for policy in POLICIES:
            vals = results[(shots, policy)]
            cells = []
            for v in vals:
                lo, hi = wilson(round(v * n_test), n_test)
                cells.append(f"{100 * v:.1f}% ({100 * lo:.1f}–{100 * hi:.1f})")
            lo, hi = t_interval(vals)
            mean = sum(vals) / len(vals)
            lines.append(f"| {shots} | {policy} | " + " | ".join(cells) +
                         f" | {100 * mean:.1f}% ({100 * lo:.1f}–{100 * hi:.1f}) | {100 * min(vals):.1f}% |")
    write_section("augment", "\n".join(lines))


if __name__ == "__main__":
    main()
