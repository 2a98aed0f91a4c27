"""Issue 23 item 2: the real-photo benchmark. ImageNet EfficientNet-Lite0 fine-tuned on the GCompris photos
(benchmarks/photos.py: 140 photos, 5 classes, fetched with apt-get from Debian's gcompris-qt-data, read from its
Qt resource file) with the photo recipe (models/recipes/photos_lite0.toml) at 224 px, seeds 0-4 (each seed draws
its own stratified split and trains with its own seed), the from-scratch baseline (same backbone, same recipe,
weights none) on the same splits. Writes the ``photos`` section of benchmarks/RESULTS.md.

With 21 test images per seed a single split says little: every figure carries its 95% interval, and the seeds are
pooled (105 test images, each photo counted in the seeds whose test split drew it).

    python benchmarks/bench_photos.py                      # seeds 0-4, scratch too: about 45 min on 2 cores
    python benchmarks/bench_photos.py --seeds 0 --work DIR # one seed (DIR keeps finished seeds: a rerun resumes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from _runs import stage_dir, test_right  # noqa: E402
from photos import prepare  # noqa: E402
from rich.console import Console  # noqa: E402

from edge_tl.core.errors import EdgeTLError  # noqa: E402
from edge_tl.workstation.pipeline.run import run_build  # noqa: E402
from edge_tl.workstation.spec import load_spec  # noqa: E402
from edge_tl.workstation.stats import paired, wilson  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "models" / "recipes" / "photos_lite0.toml"


def _build(data: Path, run_dir: Path, seed: int, weights: str, console: Console, extra: dict | None = None) -> dict:
    overrides = {"data.root": str(data), "seed": seed, "model.weights": weights, **(extra or {})}
    if weights == "none":  # the baseline: the fine-tune only (its INT8 model is not compared: PTQ, no explanations)
        overrides.update({"prune.enabled": False, "quantize.mode": "ptq", "report.explain": False})
    spec = load_spec(RECIPE, overrides, {})
    t0 = time.perf_counter()
    try:
        res = run_build(spec, run_dir, overwrite=True, console=console)
    except EdgeTLError as exc:  # the build refused to ship (e.g. a recovery at chance): that is the result
        return _refused(run_dir, seed, weights, exc.one_line(), time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rec = {"seed": seed, "weights": weights, "wall_s": wall, "test_images": res.stats.get("test_images"),
           "right": {k: test_right(run_dir, k).tolist() for k in ("finetune",) + (("prune", "qat") if weights != "none"
                                                                              else ())},
           "latency_ms": metrics.get("latency_ms"), "stages": {}}
    for k in ("finetune", "prune", "qat"):
        st = res.stages.get(k) or {}
        rec["stages"][k] = {f: st.get(f) for f in ("top1", "val_top1", "macs_removed", "selected", "importance",
                                                    "recovery_attempts", "recipe") if f in st}
    return rec


def _refused(run_dir: Path, seed: int, weights: str, error: str, wall: float | None = None) -> dict:
    """The record of a build that stopped with an error: its fine-tune (finished and cached) is still scored."""
    return {"seed": seed, "weights": weights, "wall_s": wall, "refused": error,
            "right": {"finetune": test_right(run_dir, "finetune").tolist()}, "stages": {}}


def _pooled(recs: list[dict], stage: str) -> str:
    right = np.concatenate([np.asarray(r["right"][stage]) for r in recs])
    lo, hi = wilson(int(right.sum()), len(right))
    return f"{100 * right.mean():.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n = {len(right)})"


def _per_seed(recs: list[dict], stage: str) -> str:
    cells = []
    for r in recs:
        right = np.asarray(r["right"][stage])
        lo, hi = wilson(int(right.sum()), len(right))
        cells.append(f"s{r['seed']} {100 * right.mean():.0f} [{100 * lo:.0f}, {100 * hi:.0f}]")
    return "; ".join(cells)


def _paired(recs: list[dict], a: str, b: str) -> tuple[str, str]:
    pooled = paired(np.concatenate([r["right"][a] for r in recs]), np.concatenate([r["right"][b] for r in recs]))
    cells = []
    for r in recs:
        p = paired(np.asarray(r["right"][a]), np.asarray(r["right"][b]))
        cells.append(f"s{r['seed']} {p.diff_points:+.1f} [{p.ci_points[0]:+.1f}, {p.ci_points[1]:+.1f}]")
    return (f"{pooled.diff_points:+.1f} points [{pooled.ci_points[0]:+.1f}, {pooled.ci_points[1]:+.1f}] "
            f"(McNemar p = {pooled.mcnemar_p:.2g})", "; ".join(cells))


def _decision(run_dir: Path) -> tuple[float, float]:
    """The pruned model's and the unpruned model's top-1 on the build's decision set (the prune stage's metrics)."""
    m = json.loads((stage_dir(run_dir, "prune") / "metrics.json").read_text())
    return m["decision_top1"], m["unpruned_decision_top1"]


def _against(tl: list[dict], work: Path, other: Path, label: str) -> list[str]:
    """Lines: this arm minus the other arm's finished runs of the same seeds (same splits, same test photos)."""
    theirs = {r["seed"]: r for r in (json.loads(p.read_text()) for p in sorted(other.glob("s*-imagenet.json")))
              if "refused" not in r}
    both = [(r, theirs[r["seed"]]) for r in tl if r["seed"] in theirs]
    if not both:
        return [f"- Against {other}: no finished seed in common."]
    out = []
    for stage, what in (("prune", "pruned FP32"), ("qat", "shipped INT8")):
        pr = paired(np.concatenate([a["right"][stage] for a, _ in both]),
                    np.concatenate([b["right"][stage] for _, b in both]))
        out.append(f"- Against {label} (same splits, seeds {', '.join(str(a['seed']) for a, _ in both)}), "
                   f"{what}, this recipe - that: {pr.text()}.")
    dec = [(a["seed"], _decision(work / f"s{a['seed']}-imagenet"), _decision(other / f"s{a['seed']}-imagenet"))
           for a, _ in both]
    out.append("- Pruned FP32 on each build's decision set (its 21 validation photos and 20 augmented copies of "
               "each; this recipe / that, unpruned): "
               + "; ".join(f"s{sd} {100 * x[0]:.1f} / {100 * y[0]:.1f} ({100 * x[1]:.1f})" for sd, x, y in dec)
               + f"; mean {100 * np.mean([x[0] for _, x, _ in dec]):.1f} / "
               f"{100 * np.mean([y[0] for _, _, y in dec]):.1f}.")
    ms = [(a["latency_ms"]["qat"], a["stages"]["qat"].get("selected"), b["latency_ms"]["qat"],
           b["stages"]["qat"].get("selected")) for a, b in both if a.get("latency_ms") and b.get("latency_ms")]
    out.append("- Shipped INT8 latency, this recipe / that (ms, ORT CPU, 1 thread, separate runs; the INT8 model "
               "that shipped): " + ", ".join(f"{x:.2f} ({xs}) / {y:.2f} ({ys})" for x, xs, y, ys in ms) + ".")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-tl-bench-photos"))
    ap.add_argument("--scratch-seeds", default="0,1,2,3,4", help="seeds of the from-scratch baseline ('' for "
                    "none): the issue's +30-point target is judged on the same seeds as the rest")
    ap.add_argument("--retry-failed", action="store_true", help="build again a seed whose build stopped with an "
                    "error (default: report the error as that seed's result)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an A/B arm: a recipe key "
                    "changed (JSON value, e.g. prune.global_pruning=false) for every build; prints, writes no "
                    "section (use its own --work)")
    ap.add_argument("--against", type=Path, help="the --work folder of the other arm (same seeds): the photos "
                    "section adds the paired differences against it")
    ap.add_argument("--against-label", default="the other arm", help="what --against ran, in words")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = {k: json.loads(v) for k, _, v in (x.partition("=") for x in args.set)}
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    counts = prepare(work / "gcompris")
    data = work / "gcompris" / "images"
    console = Console(file=sys.stderr, highlight=False)
    done: dict[str, dict] = {}
    scratch_seeds = [int(x) for x in args.scratch_seeds.split(",") if x.strip()]
    runs = [(seed, "imagenet") for seed in seeds] + [(seed, "none") for seed in scratch_seeds]
    for seed, weights in runs:
        name = f"s{seed}-{weights}"
        path = work / f"{name}.json"
        state = json.loads((work / name / "run.json").read_text()) if (work / name / "run.json").is_file() else {}
        if not path.is_file() and state.get("status") == "failed" and not args.retry_failed:
            path.write_text(json.dumps(_refused(work / name, seed, weights, state.get("error", "failed"))))
        if not path.is_file():
            console.print(f"[bold]seed {seed}, weights {weights}[/]")
            rec = _build(data, work / name, seed, weights, console, extra)
            path.write_text(json.dumps(rec))
        done[name] = json.loads(path.read_text())
    everyone = [done[f"s{s}-imagenet"] for s in seeds]
    tl = [r for r in everyone if "refused" not in r]  # the seeds that shipped a bundle
    refused = [r for r in everyone if "refused" in r]
    sc = [done[f"s{s}-none"] for s in seeds if f"s{s}-none" in done]
    classes = ", ".join(f"{k} {v}" for k, v in counts.items())
    lines = ["## Real photos: ImageNet EfficientNet-Lite0 on the GCompris photos (issue 23)", "",
             machine_line(torch.get_num_threads()), "",
             f"Data: {sum(counts.values())} photos, {len(counts)} classes ({classes}), "
             "from Debian's `gcompris-qt-data` (`categorization.rcc`, read by benchmarks/rcc.py); per seed a "
             "stratified 70/15/15 split. Licences: public domain, CC0-1.0, CC-BY(-SA) per photo; authors and "
             "sources in each class's README (benchmarks/photos.py copies them to ATTRIBUTION/), e.g. fishes: "
             "Karelj (Wikimedia Commons, public domain). Recipe: models/recipes/photos_lite0.toml (224 px, "
             "resize 256, mean = std = 0.5; the ImageNet features frozen and the head fitted by L-BFGS on the "
             "training photos and 4 augmented copies of each; 40% of the MACs pruned from the blocks' expanded "
             "channels, ranked across layers (one global ranking) by their contribution on the training photos; "
             "recovery by distillation of the unpruned model's features and every block's output on "
             "mixup-blended photos (function matching), 20 epochs, the head then fitted again; INT8 by "
             "quantize.mode = auto, QAT keeping its last epoch, a trained INT8 model replacing PTQ only when it "
             "scores higher on the decision set beyond noise). "
             f"Seeds {', '.join(map(str, seeds))}; intervals are Wilson 95% (accuracies) and paired bootstrap 95% "
             "(differences on the same images).", "",
             "| model | pooled test top-1 | per seed (95% interval) |", "|---|---|---|",
             f"| Lite0 ImageNet, trained FP32 (the recipe's train stage) | {_pooled(everyone, 'finetune')} | "
             f"{_per_seed(everyone, 'finetune')} |"]
    if sc:
        lines.append(f"| Lite0 from scratch (same recipe, weights none) | {_pooled(sc, 'finetune')} | "
                     f"{_per_seed(sc, 'finetune')} |")
    lines += [f"| pruned (40% MACs), FP32 | {_pooled(tl, 'prune')} | {_per_seed(tl, 'prune')} |",
              f"| shipped INT8 (Q/DQ in float) | {_pooled(tl, 'qat')} | {_per_seed(tl, 'qat')} |", ""]
    cost_p, cells_p = _paired(tl, "finetune", "prune")
    cost_q, cells_q = _paired(tl, "finetune", "qat")
    lines += [f"- Seed {r['seed']}: the build stopped and shipped nothing: {r['refused']}" for r in refused]
    lines += [f"- Pruning cost (trained - pruned, pooled over the seeds that shipped): {cost_p}; per seed: "
              f"{cells_p}.",
              f"- INT8 cost (trained - shipped INT8, pooled): {cost_q}; per seed: {cells_q}.",
              "- The recipe before (2026-12-05, same splits and seeds): fine-tuning at lr 1e-2 / 1e-4, L1 on all "
              "channels, recovery by logit distillation: 80.0% [71.4, 86.5] trained, 67.9% pruned and 76.2% INT8 "
              "(seeds 0-3; seed 4's recovery ended at chance), build 15.3-27.5 min.",
              "- Earlier A/B arms (this machine, same splits, seeds 0-4, `--set` / `--against`): the recipe's "
              "recovery (the features and every block's output distilled, QAT's last epoch) against the features "
              "alone distilled and QAT's best epoch on validation (2026-12-06): pruned FP32 +6.67 points [+0.95, "
              "+13.33] (McNemar p = 0.065), shipped INT8 +7.62 [+0.95, +14.29] (p = 0.057), decision sets 82.1% "
              "against 80.2%; one channel ranking "
              "across layers against one per layer (2026-12-06): pruned top-1 on the decision sets 80.2% against "
              "74.6% (higher on every seed), on test +0.95 points [-4.76, +6.67]; QAT's last epoch against its best "
              "on validation, both with block distillation (2026-12-06): shipped INT8 +2.86 points [+0.00, +6.67] "
              "(3 photos to 0), PTQ or mixed shipped on 3 seeds instead of 1; mixup in the recovery "
              "(prune.recovery_mixup = 1.0, the unpruned model matched on blended photos; 2026-12-07): pruned top-1 "
              "-0.95 points [-4.76, +1.90], decision sets 83.8% against 82.1%, shipped INT8 +0.00 [-3.81, +3.81], "
              "energy AUROC of the shipped bundles on pictures of no class 0.872 against 0.853 (higher on 8 of 10 "
              "sets, lower on both of seed 2): within noise, not adopted; BatchNorm frozen in the recovery "
              "(prune.recovery_bn = \"frozen\", statistics re-estimated on the training photos once after pruning, "
              "then kept; 2026-12-07): pruned top-1 -3.81 points [-9.52, +0.95], shipped INT8 -2.86 [-7.62, +1.90], "
              "decision sets 82.0% against 82.1%, energy AUROC on pictures of no class 0.881 against 0.868 (higher "
              "on 5 of 10 sets; +0.09 on seed 4, the seed a one-seed pilot chose it on, which did not carry to the "
              "others): not adopted; the unpruned model's own BatchNorm statistics kept through the recovery, not "
              "re-estimated (seed 4 only): AUROC 0.727 against 0.765, dropped. A lower recovery rate "
              "(prune.recovery_lr = 3e-4 against 1e-3, 2026-12-07): pruned top-1 +0.00 points [-3.81, +3.81], "
              "shipped INT8 +0.00 [-3.81, +3.81], decision sets 79.6% against 82.1%, energy AUROC 0.855 against "
              "0.868 (higher on 2 of 10 sets): not adopted."
              " 20 recovery epochs against 10 (prune.recovery_epochs = 20, 2026-12-07): pruned top-1 -2.86 points "
              "[-6.67, +0.00], shipped INT8 -0.95 [-4.76, +2.86], decision sets 81.8% against 82.1%, energy AUROC "
              "0.872 against 0.868 (higher on 5 of 10 sets), build 4.3-5.6 min against 3.3-5.7: not adopted."
              " Mixup and 20 recovery epochs together (function matching, Beyer et al. 2022: prune.recovery_mixup = "
              "1.0 and prune.recovery_epochs = 20, 2026-12-07): pruned top-1 -1.90 points [-5.71, +1.90], shipped "
              "INT8 +0.00 [-4.76, +4.76], decision sets 84.9% against 82.1% (higher on 4 of 5 seeds), energy AUROC "
              "0.890 against 0.868 (higher on 6 of 10 sets; seeds 1 and 4, the lowest, 0.862 and 0.817 against 0.775 "
              "and 0.765), build 4.3-7.3 min against 3.1-5.7: within noise on test; then confirmed on seeds 5-9, "
              "which no choice had looked at (2026-12-07; the recipe there: trained 85.7%, pruned 84.8%, "
              "shipped INT8 85.7%): pruned top-1 +4.76 points [+0.95, +9.52] (McNemar p = 0.063), shipped "
              "INT8 +3.81 [+0.95, +7.62] (p = 0.13), decision sets 86.4% against 84.1% (higher on 4 of 5 "
              "seeds), energy AUROC 0.885 against 0.855 (higher on 6 of 10 sets; seeds 6 and 9, the lowest, "
              "0.843 / 0.918 and 0.821 / 0.894 against 0.704 / 0.832 and 0.683 / 0.869), build 4.2-7.8 min "
              "against 2.2-5.2: adopted, the recipe above since 2026-12-07 (every arm before it was against "
              "10 recovery epochs without mixup)."]
    if sc:
        same = [done[f"s{r['seed']}-imagenet"] for r in sc if f"s{r['seed']}-imagenet" in done]
        pairs = [(np.asarray(t["right"]["finetune"]), np.asarray(r["right"]["finetune"]))
                 for t, r in zip(same, sc, strict=True)]
        pooled = paired(np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs]))
        lines.append(f"- Transfer gain (ImageNet - scratch, seeds {', '.join(str(r['seed']) for r in sc)}, the same "
                     f"test images): {pooled.diff_points:+.1f} points [{pooled.ci_points[0]:+.1f}, "
                     f"{pooled.ci_points[1]:+.1f}] (McNemar p = {pooled.mcnemar_p:.2g}).")
    macs = [r["stages"]["prune"].get("macs_removed") for r in tl]
    sel = [r["stages"]["qat"].get("selected") for r in tl]
    walls = [r["wall_s"] for r in tl if r.get("wall_s")]
    speed = [r["latency_ms"]["finetune"] / r["latency_ms"]["qat"] for r in tl if r.get("latency_ms")]
    lines += [f"- MACs removed: {', '.join(f'{100 * m:.1f}%' for m in macs if m is not None)}; shipped INT8 model: "
              f"{', '.join(map(str, sel))}.",
              f"- Build time (the recipe, 224 px, this machine): {', '.join(f'{w / 60:.1f}' for w in walls)} min "
              f"(worst {max(walls) / 60:.1f}).",
              f"- Shipped model vs eager Lite0 FP32 (batch 1, ONNX Runtime CPU INT8 kernels vs torch, 1 thread, "
              f"same run): {', '.join(f'{s:.2f}x' for s in speed)}.", ""]
    if args.against:
        lines[-1:-1] = _against(tl, work, args.against, args.against_label)
    if extra:
        lines.insert(1, f"A/B arm, not the recipe: {', '.join(args.set)}; not written to RESULTS.md.")
        print("\n".join(lines))
        return
    write_section("photos", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
