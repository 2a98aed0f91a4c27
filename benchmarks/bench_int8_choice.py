"""Which INT8 model a build should ship: the rule of the ``qat`` stage (edge_tl.workstation.pipeline.qat_stage)
replayed on finished runs. Writes the ``int8-choice`` section of benchmarks/RESULTS.md.

For each run (the real-photo benchmark's runs and demo builds, with quantize.mode = "auto"), every INT8 candidate
the stage built (PTQ, QAT, mixed precision) is scored again on the run's decision set (its validation pictures
and their augmented copies, what the stage chose on) and on its test split (what no choice looked at). Two rules:
"higher": the higher decision-set top-1 ships (PTQ on a tie; the rule before 2026-12-07); "beyond noise": a
trained candidate replaces PTQ only when its gain on the decision set has a one-sided 95% lower bound above 0
(copies of one picture counted as one unit, edge_tl.workstation.pipeline.qat_stage.cost_bound).

    python benchmarks/bench_int8_choice.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from _runs import run_context  # noqa: E402

from edge_tl.workstation.pipeline.qat_stage import gain_over, pick_int8  # noqa: E402
from edge_tl.workstation.pipeline.stages import onnx_predictions  # noqa: E402
from edge_tl.workstation.stats import paired, wilson  # noqa: E402


def replay(run: Path) -> dict:
    ctx = run_context(run)
    spec = ctx.spec
    xd, yd = ctx.decision_set()
    yt = ctx.arrays("test")[1]
    qat = ctx.folder("qat")
    files = {"ptq": ctx.folder("quantize") / "model.int8.onnx", "qat": qat / "model.qat.onnx",
             "mixed": qat / "model.mixed.onnx"}
    m = json.loads((qat / "metrics.json").read_text())
    cands = {}
    for name, path in files.items():
        if name in m["candidates"] and path.is_file():
            cands[name] = {"decision_correct": onnx_predictions(path, xd) == yd,
                           "test_correct": np.load(qat / f"test_predictions_{name}.npy") == yt}
            cands[name]["decision_top1"] = float(cands[name]["decision_correct"].mean())
    n_val = len(ctx.arrays("val")[1])
    higher = max(cands, key=lambda k: (cands[k]["decision_top1"], -list(cands).index(k)))
    noise = pick_int8(cands, n_val)
    gains = {k: gain_over("ptq", cands["ptq"], c, n_val) for k, c in cands.items() if k != "ptq"}
    return {"task": "digits" if spec.is_demo else "photos", "cands": cands, "higher": higher, "noise": noise,
            "gains": gains}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path, nargs="+")
    a = ap.parse_args()
    rows, pooled = [], {}
    for run in a.runs:
        r = replay(run)
        task, c = r["task"], r["cands"]
        dec = ", ".join(f"{k} {100 * v['decision_top1']:.1f}%" for k, v in c.items())
        test = ", ".join(f"{k} {100 * v['test_correct'].mean():.1f}%" for k, v in c.items())
        gain = "; ".join(f"{k} - ptq {g['gain_points']:+.2f} (lower bound {g['gain_lower_points']:+.2f})"
                         for k, g in r["gains"].items())
        rows.append(f"| {task} {run.name} | {dec} | {gain or '-'} | {test} | {r['higher']} | {r['noise']} |")
        p = pooled.setdefault(task, {"higher": [], "noise": []})
        p["higher"].append(c[r["higher"]]["test_correct"])
        p["noise"].append(c[r["noise"]]["test_correct"])
    lines = ["## Which INT8 model ships: the higher on the decision set, or only a gain beyond noise (issue 23)", "",
             machine_line(), "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| run | decision-set top-1 | trained candidate's gain over PTQ (points, decision set) | test top-1 | "
             "ships (higher) | ships (beyond noise) |", "|---|---|---|---|---|---|", *rows, ""]
    for task, p in pooled.items():
        hi, no = np.concatenate(p["higher"]), np.concatenate(p["noise"])
        lo_h, up_h = wilson(int(hi.sum()), len(hi))
        lo_n, up_n = wilson(int(no.sum()), len(no))
        d = paired(no, hi)
        lines.append(f"- {task}, pooled test top-1 of the shipped model over {len(p['noise'])} runs: beyond noise "
                     f"{100 * no.mean():.1f}% [{100 * lo_n:.1f}, {100 * up_n:.1f}], higher {100 * hi.mean():.1f}% "
                     f"[{100 * lo_h:.1f}, {100 * up_h:.1f}] (n = {len(no)}); beyond noise - higher: {d.text()}.")
    write_section("int8-choice", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
