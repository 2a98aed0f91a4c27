"""Issue 23: which activation calibration PTQ should use (``quantize.method``), chosen on two tasks.

For each finished run (the real-photo benchmark's runs, benchmarks/bench_photos.py, and demo builds), the pruned
FP32 ONNX model the quantize stage calibrated (the export stage's model.onnx) is quantized again by
edge_tl.workstation.quantize.quantize_int8 with each method it offers (MinMax, the default; Entropy, TensorRT's
rule over a 2048-bin histogram, edge_tl.workstation.quantize.ENTROPY_BINS; Percentile 99.99 and 99.999; ONNX
Runtime's quantize_static alone calibrated Entropy with 128 bins, its one candidate the whole range: the same
scales as MinMax on every run, found by this script), on the run's own calibration images
(Context.calibration: the build's draw from its training split), and scored Q/DQ in float (as TensorRT computes
it) on the run's decision set (validation pictures and their copies: what a choice may look at) and on its test
split (what no choice looked at). Top-1 moves by a picture or two on these splits; the choice is therefore made on
a score every picture contributes to: the KL divergence of the INT8 model's softmax from the FP32 model's (nats),
averaged over each validation picture's copies, paired per picture against MinMax. A method replaces MinMax only
where it lowers that divergence beyond noise (the paired 95% interval below 0) on both tasks.

    python benchmarks/bench_calib_method.py --photos /tmp/edge-tl-bench-photos --demo /tmp/edge-tl-bench-demo
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
from _results import machine_line, write_section  # noqa: E402
from _runs import demo_run, run_context  # noqa: E402

from edge_tl.workstation.pipeline.qat_stage import per_image_mean  # noqa: E402
from edge_tl.workstation.pipeline.stages import onnx_logits  # noqa: E402
from edge_tl.workstation.quantize import quantize_int8  # noqa: E402
from edge_tl.workstation.stats import paired, paired_mean, wilson  # noqa: E402

#: (label, quantize_int8 method, percentile); the first is the incumbent every other is paired against
METHODS = (("minmax", "minmax", None), ("entropy", "entropy", None), ("percentile 99.99", "percentile", 99.99),
           ("percentile 99.999", "percentile", 99.999))


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per row, in nats."""
    from scipy.special import log_softmax

    log_p, log_q = log_softmax(p_logits.astype(np.float64), axis=1), log_softmax(q_logits.astype(np.float64), axis=1)
    return (np.exp(log_p) * (log_p - log_q)).sum(1)


def score_run(run: Path) -> dict:
    """Every method's per-picture KL on the decision set and right/wrong on test, with the FP32 model's."""
    ctx = run_context(run)
    fp32 = ctx.folder("export") / "model.onnx"
    xd, yd = ctx.decision_set()
    xt, yt = ctx.arrays("test")
    n_val = len(ctx.data_split.labels("val"))  # the decision set repeats these images; counted, not decoded
    calib = ctx.calibration()
    ref_d, ref_t = onnx_logits(fp32, xd), onnx_logits(fp32, xt)
    out = {"task": "digits" if ctx.spec.is_demo else "photos", "name": run.name, "calib": len(calib),
           "fp32_test": ref_t.argmax(1) == yt, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="edge-tl-calib-") as td:
        for label, method, pct in METHODS:
            t0 = time.perf_counter()
            path = Path(td) / f"{label.replace(' ', '-')}.onnx"
            quantize_int8(fp32, path, calib, method=method, per_channel=ctx.spec.quantize.per_channel,
                          **({"percentile": pct} if pct else {}))
            secs = time.perf_counter() - t0
            zd, zt = onnx_logits(path, xd, qdq="float"), onnx_logits(path, xt, qdq="float")
            out["methods"][label] = {"kl": per_image_mean(_kl(ref_d, zd), n_val),
                                     "decision": float((zd.argmax(1) == yd).mean()), "test": zt.argmax(1) == yt,
                                     "agree": zt.argmax(1) == ref_t.argmax(1), "seconds": secs}
            print(f"{run.name} {label}: KL {out['methods'][label]['kl'].mean():.4f}, {secs:.0f} s", file=sys.stderr,
                  flush=True)
    return out


def _pct(right: np.ndarray) -> str:
    lo, hi = wilson(int(right.sum()), right.size)
    return f"{100 * right.mean():.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _task_rows(task: str, runs: list[dict]) -> tuple[list[str], dict[str, bool], dict[str, bool]]:
    """The task's table rows (pooled over its runs) and, per method, whether it beats MinMax beyond noise and
    whether it is worse beyond noise."""
    base = METHODS[0][0]
    fp32 = np.concatenate([r["fp32_test"] for r in runs])
    kl_base = np.concatenate([r["methods"][base]["kl"] for r in runs])
    rows, beats, worse = [], {}, {}
    for label, _, _ in METHODS:
        kl = np.concatenate([r["methods"][label]["kl"] for r in runs])
        test = np.concatenate([r["methods"][label]["test"] for r in runs])
        agree = np.concatenate([r["methods"][label]["agree"] for r in runs])
        dec = np.mean([r["methods"][label]["decision"] for r in runs])
        secs = np.mean([r["methods"][label]["seconds"] for r in runs])
        if label == base:
            vs = "-"
        else:
            d = paired_mean(kl, kl_base)
            beats[label], worse[label] = d.ci[1] < 0, d.ci[0] > 0
            vs = f"{d.diff:+.4f} [{d.ci[0]:+.4f}, {d.ci[1]:+.4f}]"
        cost = paired(fp32, test)
        rows.append(f"| {task} | {label} | {kl.mean():.4f} | {vs} | {100 * dec:.1f}% | {_pct(test)} | "
                    f"{cost.diff_points:+.1f} [{cost.ci_points[0]:+.1f}, {cost.ci_points[1]:+.1f}] | "
                    f"{100 * agree.mean():.1f}% | {secs:.0f} |")
    return rows, beats, worse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=Path("/tmp/edge-tl-bench-photos"),
                    help="bench_photos.py's --work folder (its runs s<seed>-imagenet)")
    ap.add_argument("--demo", type=Path, default=Path("/tmp/edge-tl-bench-demo"),
                    help="where the demo builds demo-s<seed> are (built there when missing)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    photo_runs = [args.photos / f"s{s}-imagenet" for s in seeds]
    missing = [str(p) for p in photo_runs if not (p / "bundle" / "manifest.json").is_file()]
    if missing:
        raise SystemExit(f"no finished photo run at {', '.join(missing)}: run benchmarks/bench_photos.py first")
    runs = photo_runs + [demo_run(args.demo / f"demo-s{s}") for s in seeds]
    t0 = time.perf_counter()
    scored = [score_run(r) for r in runs]
    rows, beats, worse = [], {}, {}
    for task in ("photos", "digits"):
        r, beats[task], worse[task] = _task_rows(task, [s for s in scored if s["task"] == task])
        rows += r
    winners = [m for m, _, _ in METHODS[1:] if beats["photos"][m] and beats["digits"][m]]
    losers = [m for m, _, _ in METHODS[1:] if worse["photos"][m] and worse["digits"][m]]
    calib = ", ".join(f"{s['name']} {s['calib']}" for s in scored)
    verdict = (f"{winners[0]} lowers the divergence beyond noise on both tasks: it replaces MinMax" if winners else
               "no method lowers the divergence beyond noise on both tasks: MinMax stays the default")
    body = "\n".join([
        "## PTQ calibration: MinMax, Entropy or Percentile (issue 23)", "", machine_line(), "",
        __doc__.split("\n\n")[1].replace("\n", " "), "",
        f"Runs: the photo recipe's builds and the demo's, seeds {args.seeds}; calibration images per run: {calib}. "
        f"{time.perf_counter() - t0:.0f} s in all.", "",
        "| task | method | KL(FP32, INT8) on the decision set (nats, per picture) | - MinMax (paired 95%) | "
        "decision-set top-1 | test top-1 (pooled) | INT8 cost on test (FP32 - INT8, points) | test top-1 same as "
        "FP32 | seconds to quantize |", "|---|---|---|---|---|---|---|---|---|", *rows, "",
        "- FP32 (the pruned model, ONNX) on test: " + ", ".join(
            f"{t} {_pct(np.concatenate([s['fp32_test'] for s in scored if s['task'] == t]))}"
            for t in ("photos", "digits")) + ".",
        f"- Verdict: {verdict}.",
        f"- Further from the FP32 model beyond noise on both tasks: {', '.join(losers) or 'none'}."])
    write_section("calib-method", body)
    print(body)


if __name__ == "__main__":
    main()
