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
import torch  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from _runs import stage_dir, test_right  # noqa: E402
from rich.console import Console  # noqa: E402

from edge_tl.workstation.pipeline.report import stage_table, target_checks, verdict_cell  # noqa: E402
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

    from edge_tl.core.preprocess import PreprocessConfig
    from edge_tl.workstation.data import DataSplit
    from edge_tl.workstation.train.datasets import eval_arrays

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


def _seed_record(res, seed: int, wall: float) -> dict:
    """What the seeds table needs from one build (kept as JSON in the work folder, so a long run resumes)."""
    st = res.stages
    acc = {k: 100 * st[k]["top1"] for k in ("finetune", "prune", "export", "quantize")}
    acc["kernels"] = 100 * st["quantize"]["top1_ort_cpu_kernels"]
    q = st["qat"]  # the shipped INT8 model (PTQ, QAT or mixed precision; edge_tl.workstation.pipeline.qat_stage)
    acc["shipped"] = 100 * q["top1"]
    qat = q["candidates"].get("qat")
    ref_top1, ref_n = reference_int8_top1(res)
    manifest = json.loads((res.bundle_dir / "manifest.json").read_text())
    hashes = {f"{stage} model.pt": _sha(next(res.run_dir.glob(f"stages/{stage}-*/model.pt")))
              for stage in ("finetune", "prune")}
    hashes.update({name: manifest["artifacts"][name]["sha256"] for name in ("model.onnx", "model.int8.onnx")})
    return {"seed": seed, "wall_s": wall, "test_images": res.stats["test_images"], "acc": acc,
            "qat_top1": 100 * qat["top1"] if qat else None, "selected": q["selected"],
            "ptq_val_cost": q["candidates"]["ptq"].get("decision_cost_points",
                                                       q["candidates"]["ptq"]["val_cost_points"]),
            "val_images": q["val_images"],
            "kept_float_layers": q["kept_float_layers"], "qat_seconds": (q.get("qat") or {}).get("train_seconds"),
            "macs_removed": st["prune"]["macs_removed"], "importance": st["prune"].get("importance"),
            "importance_auto": st["prune"].get("auto_choice"),
            "manifest_int8": 100 * manifest["stages"]["qat"]["top1"],
            "reference_int8": 100 * ref_top1, "reference_n": ref_n, "hashes": hashes}


def _paired_costs(run_dir: Path) -> dict:
    """Issue 13's two costs against the fine-tuned model on the same test images (paired bootstrap 95% interval,
    edge_tl.workstation.stats.paired), from the stage folders the run's ``run.json`` names."""
    from edge_tl.workstation.stats import paired

    right = {k: test_right(run_dir, k) for k in ("finetune", "prune", "qat")}
    out = {}
    for cost, later in (("pruning cost", "prune"), ("shipped INT8 cost vs fine-tuned", "qat")):
        pr = paired(right["finetune"], right[later])
        out[cost] = {"diff": pr.diff_points, "ci": list(pr.ci_points)}
    return out


def _int8_candidates(run_dir: Path) -> dict:
    """The qat stage's INT8 candidates (PTQ, QAT, mixed) with what each rule would have scored them on."""
    m = json.loads((stage_dir(run_dir, "qat") / "metrics.json").read_text())
    return {k: {f: c.get(f) for f in ("decision_top1", "val_top1", "top1")} for k, c in m["candidates"].items()}


def _build_once(work: Path, name: str, seed: int, quick: bool, console: Console) -> dict:
    done = work / f"{name}.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        if "int8_candidates" not in rec and (work / name / "run.json").is_file():  # a record from before these
            rec["paired"] = _paired_costs(work / name)
            rec["int8_candidates"] = _int8_candidates(work / name)
            done.write_text(json.dumps(rec, indent=1))
        return rec
    over = {**(QUICK if quick else {}), "seed": seed, "report.compare_scratch": False, "report.latency_iters": 5}
    state = work / name / "run.json"
    prior = json.loads(state.read_text()) if state.is_file() else {}
    start = time.perf_counter()
    res = run_build(load_spec(None, over), work / name, overwrite=True, console=console)
    wall = time.perf_counter() - start
    if not res.ran and prior.get("status") == "done":  # a finished build found in --work: its own build time
        wall = float(prior.get("seconds", wall))
    rec = _seed_record(res, seed, wall)
    rec["paired"] = _paired_costs(res.run_dir)
    rec["int8_candidates"] = _int8_candidates(res.run_dir)
    done.write_text(json.dumps(rec, indent=1))
    return rec


def seeds_table(work: Path, quick: bool, seeds: list[int], console: Console, heldout: bool = False) -> str:
    """The demo at each seed: each stage's top-1 (95% Wilson interval) and cost, mean and worst; the INT8 model
    as written (Q/DQ in float) and on ONNX Runtime's CPU kernels; the manifest's INT8 top-1 against an
    independent re-measurement; and a second build of the first seed for the model hashes. The section is
    rewritten after every build (a long run shows what it has so far; ``--work`` resumes it). ``heldout``: seeds
    that no design choice looked at, in their own section, without the second build."""
    recs, again = [], None
    # every seed first, the reproducibility build last (on a busy machine the accuracy columns come first)
    order = [(f"seed-{sd}", sd) for sd in seeds] + ([] if heldout else [(f"seed-{seeds[0]}-again", seeds[0])])
    section = "build-seeds-heldout" if heldout else "build-seeds"
    for name, seed in order:
        rec = _build_once(work, name, seed, quick, console)
        if name.endswith("-again"):
            again = rec
        else:
            recs.append(rec)
        write_section(section, _seeds_text(recs, again, seeds, quick, heldout))
    return _seeds_text(recs, again, seeds, quick, heldout)


def _importance_cell(r: dict) -> str:
    """prune.importance = "auto": the criterion kept, and each criterion's test top-1 (was the better kept?)."""
    auto = r.get("importance_auto")
    if not auto:
        return r.get("importance") or "?"
    c = auto["candidates"]
    return f"{auto['chosen']} (" + " / ".join(f"{k} {100 * v['top1']:.2f}%" for k, v in c.items()) + ")"


def _intervals(recs: list[dict], cost: str) -> str:
    """Each seed's cost with its paired 95% interval (the test split's own noise: one image is 0.25 point)."""
    cells = [f"s{r['seed']} {r['paired'][cost]['diff']:+.2f} [{r['paired'][cost]['ci'][0]:+.2f}, "
             f"{r['paired'][cost]['ci'][1]:+.2f}]" for r in recs if "paired" in r]
    return f" (per seed, paired bootstrap 95% interval: {'; '.join(cells)})" if cells else ""


def _keep_summary(recs: list[dict]) -> list[str]:
    """prune.recovery_keep = "last": each criterion's recovered model as kept (the last epoch) against the best
    epoch on validation (what "best" would have kept), test top-1 difference in points."""
    diffs = [(r["seed"], k, 100 * (c["top1"] - c["best_epoch_top1"]))
             for r in recs if r.get("importance_auto")
             for k, c in r["importance_auto"]["candidates"].items() if c.get("best_epoch_top1") is not None]
    if not diffs:
        return []
    d = [x for _, _, x in diffs]
    return ["", "Recovery keeps the last epoch (`prune.recovery_keep = \"last\"`): its test top-1 minus that of the "
            "best epoch on validation, per seed and criterion: " + ", ".join(f"s{s} {k} {x:+.2f}" for s, k, x in diffs)
            + f"; mean {np.mean(d):+.2f}, {sum(x > 0 for x in d)} higher, {sum(x < 0 for x in d)} lower, "
            f"{sum(x == 0 for x in d)} equal."]


def _int8_choice_summary(recs: list[dict]) -> list[str]:
    """The PTQ / QAT choice on the seeds where QAT ran: test points lost against the better of the two, for
    the decision set (what ships) and for the validation images alone (PTQ on a tie in both)."""
    rows = [r["int8_candidates"] for r in recs if "qat" in (r.get("int8_candidates") or {})]
    if not rows:
        return []

    def regret(rule: str) -> list[float]:
        out = []
        for c in rows:
            pick = "qat" if c["qat"][rule] > c["ptq"][rule] else "ptq"
            out.append(100 * (max(c["ptq"]["top1"], c["qat"]["top1"]) - c[pick]["top1"]))
        return out

    dec, val = regret("decision_top1"), regret("val_top1")
    return ["", f"PTQ or QAT (the {len(rows)} seeds where QAT ran): test points lost against the better of the two "
            "when choosing on the decision set: " + ", ".join(f"{r:.2f}" for r in dec) + f" (total {sum(dec):.2f}); "
            "on the validation images alone: " + ", ".join(f"{r:.2f}" for r in val) + f" (total {sum(val):.2f})."]


def _importance_summary(recs: list[dict]) -> list[str]:
    """How prune.importance = "auto" chose, against what the validation images alone would have chosen: test
    points lost against the better criterion on test (regret), per rule."""
    rows = [r["importance_auto"] for r in recs if r.get("importance_auto")]
    if not rows or "decision_top1" not in next(iter(rows[0]["candidates"].values())):
        return []

    def regret(rule: str) -> list[float]:
        out = []
        for a in rows:
            c = a["candidates"]
            pick = max(c, key=lambda k: (c[k][rule], c[k]["val_top1"], -c[k]["val_loss"]))
            out.append(100 * (max(v["top1"] for v in c.values()) - c[pick]["top1"]))
        return out

    dec, val = regret("decision_top1"), regret("val_top1")
    return ["", f"Pruning criterion (`prune.importance = \"auto\"`, {rows[0]['decision_images']} decision images): "
            f"the criterion kept was the better one on test on {sum(r == 0 for r in dec)} of {len(dec)} seeds; test "
            "points lost against the better one: " + ", ".join(f"{r:.2f}" for r in dec) + f" (total {sum(dec):.2f}). "
            "Choosing on the validation images alone (the rule before 2026-11-30 afternoon) would have lost "
            + ", ".join(f"{r:.2f}" for r in val) + f" (total {sum(val):.2f})."]


def _seeds_text(recs: list[dict], again: dict | None, seeds: list[int], quick: bool, heldout: bool = False) -> str:
    from edge_tl.workstation.stats import wilson

    rows, costs = [], {k: [] for k in COSTS}
    for r in recs:
        acc, n = r["acc"], r["test_images"]
        for k, (a, b) in COSTS.items():
            costs[k].append(acc[a] - acc[b])
        cells = []
        for k in ("finetune", "prune", "export", "quantize", "qat", "shipped", "kernels"):
            v = r["qat_top1"] if k == "qat" else acc[k]
            if v is None:
                cells.append("not run")
                continue
            lo, hi = wilson(round(v * n / 100), n)
            cells.append(f"{v:.2f}% ({100 * lo:.1f}–{100 * hi:.1f})" + (f" **{r['selected']}**" if k == "shipped"
                                                                         else ""))
        rows.append(f"| {r['seed']} | " + " | ".join(cells) + " | "
                    + " | ".join(f"{costs[k][-1]:+.2f}" for k in COSTS) + f" | {100 * r['macs_removed']:.1f}% | "
                    f"{_importance_cell(r)} | "
                    f"{r['ptq_val_cost']:+.2f} | {r['wall_s']:.0f} |")
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    worst = lambda v: max(v) if v else float("nan")  # noqa: E731
    blank = "| " * 8
    done = [r["seed"] for r in recs]
    walls = [r["wall_s"] for r in recs + ([again] if again else [])]
    status = ("" if len(done) == len(seeds) and (again or heldout) else
              f" **Partial: seeds {done} of {seeds} done{'' if again else ', second build not yet done'}.**")
    int8 = costs["INT8 cost vs ONNX FP32"]
    kept = "; ".join(f"seed {r['seed']}: " + ", ".join(r["kept_float_layers"]) for r in recs if r["kept_float_layers"])
    lines = [
        ("## (d') The demo at held-out seeds (no design choice looked at them)" if heldout else
         "## (d) The demo across seeds") + f"{' (QUICK smoke run: fewer epochs)' if quick else ''}", "",
        machine_line()
        + f" torch intra-op threads {torch.get_num_threads()} (training numerics depend on it: the same seed trains "
        "to other weights with another thread count).", "",
        f"`python benchmarks/bench_build.py --only seeds{' --heldout' if heldout else ''}` (seeds {seeds}): the "
        "shipped demo spec with `seed` changed "
        "(it draws the 10 training images per class and seeds training), scratch comparison off."
        + (f" Each build took {min(walls):.0f}-{max(walls):.0f} s here (wall clock)."
           if walls else "") + status + f" Top-1 on the {recs[0]['test_images'] if recs else '?'} test images with "
        "its 95% Wilson interval (one image is 0.25 points). Every INT8 accuracy is the Q/DQ model as written, Q/DQ "
        "evaluated in float (what TensorRT computes): *PTQ* (ONNX Runtime quantize_static, the manifest's "
        "`stages.quantize.top1`), *QAT* (NVIDIA ModelOpt, `quantize.mode = \"auto\"` runs it unless PTQ's cost on "
        "the decision set, the validation images and 20 augmented copies of each, is within 0.5 point with 95% "
        "confidence; *not run* otherwise) and *shipped* (the better of the two on the decision set, or mixed "
        "precision; the manifest's "
        "`stages.qat.top1`, the bundle's `model.int8.onnx`, with "
        "which one in bold). *PTQ, ORT CPU kernels* is the PTQ model on ONNX Runtime's fused CPU integer kernels, "
        f"whose numerics depend on the CPU (this one: {cpu_flags()}). Cost = earlier stage minus later stage, in "
        "points (negative: the later stage scored higher). *PTQ decision cost* is what auto decides on (FP32 ONNX - "
        "PTQ on the decision set); *importance* the pruning criterion `auto` kept on the decision set, with each "
        "criterion's test top-1 after recovery; *build s* the build's wall time.", "",
        "| seed | fine-tuned | pruned + recovered | ONNX FP32 | PTQ INT8 | QAT INT8 | shipped INT8 | "
        "PTQ, ORT CPU kernels | " + " | ".join(COSTS) + " | MACs removed | importance | PTQ decision cost | build s |",
        "|---|" + "---|" * (11 + len(COSTS)), *rows,
        f"| mean {blank}" + " | ".join(f"{mean(costs[k]):+.2f}" for k in COSTS) + " | | | | |",
        f"| worst {blank}" + " | ".join(f"{worst(costs[k]):+.2f}" for k in COSTS) + " | | | | |", "",
        "Target *INT8 cost vs FP32 ONNX <= 0.5 point (mean of seeds), <= 1.0 (worst)*: "
        f"mean {mean(int8):+.2f}, worst {worst(int8):+.2f} -> "
        + ("met" if int8 and mean(int8) <= 0.5 and worst(int8) <= 1.0 else "missed" if int8 else "not measured")
        + (f" (over seeds {done} only)" if len(done) != len(seeds) else "") + ".", "",
        "Target (issue 13) *pruning >= 50% of MACs costs <= 1.0 point on the worst seed*: worst "
        f"{worst(costs['pruning cost']):+.2f} -> "
        + ("met" if recs and worst(costs["pruning cost"]) <= 1.0 else "missed" if recs else "not measured")
        + _intervals(recs, "pruning cost") + ".", "",
        "Target (issue 13) *shipped INT8 (QAT or mixed) within 0.5 point of the FP32 fine-tuned model on the worst "
        f"seed*: worst {worst(costs['shipped INT8 cost vs fine-tuned']):+.2f}"
        + _intervals(recs, "shipped INT8 cost vs fine-tuned") + " -> "
        + ("met" if recs and worst(costs["shipped INT8 cost vs fine-tuned"]) <= 0.5 else "missed" if recs else
           "not measured") + f"; against the FP32 ONNX model (the same pruned network: quantization's own cost) "
        f"worst {worst(costs['shipped INT8 cost vs ONNX FP32']):+.2f}, mean "
        f"{mean(costs['shipped INT8 cost vs ONNX FP32']):+.2f}."
        + (f" Layers kept in float: {kept}." if kept else " No seed shipped mixed precision."), "",
        "Manifest INT8 top-1 against an independent re-measurement (ONNX's pure-numpy reference evaluator, "
        "`onnx.reference`, on the test images re-read and preprocessed with the bundle's preprocess.json; "
        "target: within 1 point):", "",
        "| seed | manifest `stages.qat.top1` (shipped) | onnx.reference | difference (points) |", "|---|---|---|---|",
        *[f"| {r['seed']} | {r['manifest_int8']:.2f}% | {r['reference_int8']:.2f}% | "
          f"{r['manifest_int8'] - r['reference_int8']:+.2f} |" for r in recs]]
    lines += _importance_summary(recs) + _keep_summary(recs) + _int8_choice_summary(recs)
    if again and recs:
        first = recs[0]
        lines += ["", f"Reproducibility: seed {seeds[0]} built twice on this machine, each in a fresh run folder "
                  "(sha256, first 16 hex digits):", "",
                  "| file | first build | second build | identical |", "|---|---|---|---|"]
        lines += [f"| {name} | `{a[:16]}` | `{again['hashes'][name][:16]}` | "
                  f"{'yes' if a == again['hashes'][name] else '**no**'} |" for name, a in first["hashes"].items()]
    return "\n".join(lines)


COSTS = {"pruning cost": ("finetune", "prune"), "export cost": ("prune", "export"),
         "INT8 cost vs ONNX FP32": ("export", "quantize"), "INT8 cost vs fine-tuned": ("finetune", "quantize"),
         "ORT kernels vs INT8 as written": ("quantize", "kernels"),
         "shipped INT8 cost vs ONNX FP32": ("export", "shipped"),
         "shipped INT8 cost vs fine-tuned": ("finetune", "shipped")}


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
    ap.add_argument("--heldout", action="store_true", help="seeds section: write it as the held-out seeds' section "
                    "(default seeds 5-9, no second build)")
    ap.add_argument("--work", type=Path, help="keep run folders here (the seeds section resumes from it); "
                                              "default: a temporary folder")
    args = ap.parse_args()
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="bench-build-") as td:
        work = args.work or Path(td)
        work.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "demo"):
            write_section("build-demo", demo_table(work, args.quick, console))
        if args.only in (None, "transfer"):
            write_section("build-transfer", transfer_table(work, args.quick, args.seeds, console))
        if args.only in (None, "seeds"):
            seeds = args.seed_runs if args.seed_runs != [0, 1, 2, 3, 4] or not args.heldout else [5, 6, 7, 8, 9]
            section = "build-seeds-heldout" if args.heldout else "build-seeds"
            write_section(section, seeds_table(work, args.quick, seeds, console, heldout=args.heldout))
        print("wrote benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
