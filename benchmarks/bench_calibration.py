"""Issue 14 items 7 and 6 on the demo: calibration of the shipped model and the cost of the Grad-CAM report.

For each seed the shipped demo spec is built with `seed` changed (the scratch comparison off: it does not touch
calibration) through the real pipeline (`run_build`, the same code as `edge-tl build`). From each build:
the temperature fitted on the validation split (NLL, INT8 Q/DQ in float), the test split's expected calibration
error (15 equal-width bins) and NLL before (T = 1) and after temperature scaling (manifest
`stages.qat.calibration`: the stage that picks the shipped INT8 model), and the seconds the Grad-CAM
section took (`plots/gradcam.json`) with its
per-class map correlation between the fine-tuned and the pruned model.

    .venv/bin/python benchmarks/bench_calibration.py                # seeds 0-4
    .venv/bin/python benchmarks/bench_calibration.py --seeds 0      # one seed
    .venv/bin/python benchmarks/bench_calibration.py --runs DIR     # keep/reuse the run folders (stage cache)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from rich.console import Console  # noqa: E402

from edge_tl.core.bundle import Bundle  # noqa: E402
from edge_tl.workstation.pipeline.run import run_build  # noqa: E402
from edge_tl.workstation.spec import BuildSpec  # noqa: E402


def one_seed(seed: int, runs: Path) -> dict:
    spec = BuildSpec.demo().model_copy(deep=True)
    spec.seed = seed
    spec.report.compare_scratch = False
    spec.report.explain = True  # measured here: what the Grad-CAM section costs
    start = time.perf_counter()
    res = run_build(spec, runs / f"demo-s{seed}", overwrite=True, console=Console(stderr=True, quiet=True))
    seconds = time.perf_counter() - start
    b = Bundle.open(res.bundle_dir)
    cal = b.manifest.stages["qat"].calibration
    gradcam = json.loads((res.run_dir / "plots" / "gradcam.json").read_text())
    return {"seed": seed, "build_s": seconds, "ran": res.ran, "top1": b.manifest.stages["qat"].top1,
            "postprocess_temperature": b.postprocess.temperature, **cal, "gradcam": gradcam}


def ci(r: dict, when: str) -> str:
    lo, hi = r[f"ece_{when}_ci95"]
    return f"{100 * r[f'ece_{when}']:.2f}% ({100 * lo:.2f}–{100 * hi:.2f})"


def render(rows: list[dict], seconds: float) -> str:
    bins = rows[0]["ece_bins"]
    lines = ["## Calibration of the shipped model, and the Grad-CAM report's cost (`benchmarks/bench_calibration.py`, "
             "issue 14 items 7 and 6)", "", machine_line(),
             "", f"`python benchmarks/bench_calibration.py --seeds {' '.join(str(r['seed']) for r in rows)}`: the "
             "demo spec with `seed` changed (scratch comparison off), built with the real pipeline. Temperature: "
             "fitted on the validation split (100 images) by minimising the NLL of the shipped INT8 model's logits "
             "(Q/DQ "
             f"evaluated in float, as TensorRT computes it); ECE with {bins} equal-width bins of the top-1 score and "
             "NLL on the 400 test images, before (T = 1) and after. The bundle's `postprocess.json` holds the "
             "temperature (`infer` and `serve` apply it).", "",
             "| seed | INT8 top-1 | temperature | ECE before (95% CI) | ECE after (95% CI) | NLL before | NLL after "
             "| Grad-CAM section (s) | build (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {100 * r['top1']:.2f}% | {r['temperature']:.3f} | "
                     f"{ci(r, 'before')} | {ci(r, 'after')} | {r['nll_before']:.3f} | "
                     f"{r['nll_after']:.3f} | {r['gradcam']['seconds']:.1f} | {r['build_s']:.0f} |")
    eb, ea = np.array([r["ece_before"] for r in rows]), np.array([r["ece_after"] for r in rows])
    nb, na = np.array([r["nll_before"] for r in rows]), np.array([r["nll_after"] for r in rows])
    lines += [f"| mean | | | {100 * eb.mean():.2f}% | {100 * ea.mean():.2f}% | {nb.mean():.3f} | {na.mean():.3f} | "
              f"{np.mean([r['gradcam']['seconds'] for r in rows]):.1f} | |",
              f"| worst | | | {100 * eb.max():.2f}% | {100 * ea.max():.2f}% | {nb.max():.3f} | {na.max():.3f} | "
              f"{np.max([r['gradcam']['seconds'] for r in rows]):.1f} | |", ""]
    better = int((ea < eb).sum())
    sure = sum(1 for r in rows if r["ece_diff_ci95"][0] > 0)
    lines += [f"Temperature scaling lowered the test ECE on {better} of {len(rows)} seeds (mean "
              f"{100 * eb.mean():.2f}% -> {100 * ea.mean():.2f}%, worst seed {100 * eb.max():.2f}% -> "
              f"{100 * ea.max():.2f}%); on {sure} of them the 95% paired-bootstrap interval of the difference "
              "(2000 resamples of the test images) excludes zero. Intervals: "
              + "; ".join(f"seed {r['seed']} before - after {100 * r['ece_diff_ci95'][0]:+.2f} to "
                          f"{100 * r['ece_diff_ci95'][1]:+.2f} points" for r in rows) + ".", ""]
    layer = rows[0]["gradcam"]["layer"]
    classes = [c["class"] for c in rows[0]["gradcam"]["per_class"]]
    lines += [f"Grad-CAM (`report.explain`, `--explain`; off by default): layer `{layer}`; how much pruning "
              "changed the attention: per "
              "class, the mean Pearson correlation of the fine-tuned and the pruned model's maps for the true class "
              f"({rows[0]['gradcam']['per_class'][0]['images']} test images per class):", "",
              "| seed | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for r in rows:
        cells = ["-" if c["correlation"] is None else f"{c['correlation']:.2f}" for c in r["gradcam"]["per_class"]]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "The Grad-CAM column is the wall-clock time of the report's Grad-CAM section (`plots/gradcam.json`: "
              "both models, 20 test images per class for the agreement plus the figure's images, and the figure) on "
              "this machine at the time of the run; `report.explain` stays off by default while that is over ~5 s.",
              "", f"Total {seconds:.0f} s (wall clock)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--runs", type=Path, default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="smoke run: seed 0 only (run_all.py --quick)")
    args = ap.parse_args()
    if args.quick:
        args.seeds = [0]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        runs = args.runs or Path(td)
        rows = []
        for seed in args.seeds:  # the section is rewritten after each seed: an interrupted run keeps what it has
            rows.append(one_seed(seed, runs))
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("reliability")}, default=float))
            path = write_section("calibration", render(rows, time.perf_counter() - start))
            print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
