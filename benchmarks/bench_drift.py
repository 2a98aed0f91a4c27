"""Issue 25 item 3 target: serve's drift check (edge_tl.core.drift) on real streams. Writes the ``drift`` section
of benchmarks/RESULTS.md.

For each shipped bundle (a demo build, the real-photo benchmark's runs), with the bundle's own drift reference
(fitted by the build: the confidence on validation, the input statistics on training and validation pictures, a
threshold per signal) and the shipped INT8 model (Q/DQ in float):

- an undrifted stream: 2,000 requests drawn at random (seeded) from the test split, which no choice looked at;
- a drifted stream: the test pictures through a simulated new camera: a warm colour cast (red x1.25, blue x0.75),
  a Gaussian blur (radius 1.5% of the shorter side) and a 12 degree rotation, 200 requests.

It reports whether any full window of the undrifted stream was flagged (the target: none in 2,000), the request at
which the drifted stream was first flagged (the target: within the first 200), the PSI of each signal at that
point, and the model's top-1 on the test pictures and on their drifted copies (the drop D a continual build must
win back).

    python benchmarks/bench_drift.py [--photos /tmp/edge-tl-bench-photos ...] [--demo RUN ...] [--held-out NAME ...]
    [--print-only]
    (--demo: finished demo builds; by default /tmp/edge-tl-bench-demo/demo-s0, built there if the folder is absent)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from _runs import demo_run, test_split  # noqa: E402
from PIL import Image  # noqa: E402

from edge_tl.core.bundle import Bundle  # noqa: E402
from edge_tl.core.drift import DriftMonitor, input_signals  # noqa: E402
from edge_tl.workstation.demo import new_camera  # noqa: E402
from edge_tl.workstation.pipeline.stages import onnx_logits  # noqa: E402
from edge_tl.workstation.stats import paired, wilson  # noqa: E402

UNDRIFTED, DRIFTED = 2000, 200


def _signals(bundle: Bundle, images: list[Image.Image]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    x = np.stack([bundle.preprocessor(img) for img in images]).astype(np.float32)
    logits = onnx_logits(bundle.model_path("int8"), x, qdq="float")
    return {"confidence": bundle.postprocess.scores(logits).max(axis=1), **input_signals(x)}, logits.argmax(1)


def _first_flag(ref, signals: dict[str, np.ndarray], order: np.ndarray) -> tuple[int | None, dict]:
    mon = DriftMonitor(ref)
    for i, j in enumerate(order):
        mon.observe(**{k: float(v[j]) for k, v in signals.items()})
        st = mon.status()
        if any(s["drifted"] for s in st.values()):
            return i + 1, st
    return None, mon.status()


def evaluate(run: Path, seed: int = 0) -> dict:
    bundle = Bundle.open(run / "bundle")
    ref = bundle.postprocess.drift
    if ref is None:
        raise SystemExit(f"{run}: the bundle has no drift reference (rebuild it with this edge-tl)")
    images, y = test_split(run)
    sig, pred = _signals(bundle, images)
    dsig, dpred = _signals(bundle, [new_camera(img) for img in images])
    rng = np.random.default_rng(seed)
    quiet_at, quiet = _first_flag(ref, sig, rng.integers(0, len(images), UNDRIFTED))
    flag_at, flagged = _first_flag(ref, dsig, rng.integers(0, len(images), DRIFTED))
    clean, drifted = pred == y, dpred == y
    return {"window": ref.window, "thresholds": ref.thresholds, "test": len(y), "quiet_flag_at": quiet_at,
            "quiet_psi": {k: v["psi"] for k, v in quiet.items()}, "flag_at": flag_at,
            "flag_psi": {k: v["psi"] for k, v in flagged.items()},
            "top1": (float(clean.mean()), *wilson(int(clean.sum()), len(y))),
            "top1_drifted": (float(drifted.mean()), *wilson(int(drifted.sum()), len(y))),
            "drop": paired(clean, drifted).as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=Path, nargs="*", default=[Path("/tmp/edge-tl-bench-photos")],
                    help="bench_photos.py work folders (their s*-imagenet runs)")
    ap.add_argument("--held-out", nargs="*", default=[], metavar="RUN",
                    help="run folder names built after the drift check's design was chosen (marked in the table)")
    ap.add_argument("--print-only", action="store_true", help="print the table, leave RESULTS.md as it is")
    ap.add_argument("--demo", type=Path, nargs="*", default=[Path("/tmp/edge-tl-bench-demo/demo-s0")])
    a = ap.parse_args()
    photo_runs = sorted((r for d in a.photos for r in d.glob("s*-imagenet")
                         if (r / "bundle" / "manifest.json").is_file()), key=lambda r: int(r.name[1:].split("-")[0]))
    runs = [*map(demo_run, a.demo), *photo_runs]
    rows = []
    for run in runs:
        bundle = Bundle.open(run / "bundle")
        if bundle.postprocess.drift is None:
            print(f"{run}: no drift reference in its bundle (built before it existed): skipped")
            continue
        r = evaluate(run)
        psi_q = ", ".join(f"{k} {v:.3f}" for k, v in r["quiet_psi"].items() if v is not None)
        psi_d = ", ".join(f"{k} {v:.3f}" for k, v in r["flag_psi"].items() if v is not None)
        d = r["drop"]
        thr = ", ".join(f"{k.removeprefix('input_')} {v:.2f}" for k, v in r["thresholds"].items())
        name = f"{run.name} (held out)" if run.name in a.held_out else run.name
        rows.append(f"| {name} | {r['test']} | {r['window']} / {thr} | "
                    f"{'none' if r['quiet_flag_at'] is None else 'at ' + str(r['quiet_flag_at'])} ({psi_q}) | "
                    f"{'not flagged' if r['flag_at'] is None else 'request ' + str(r['flag_at'])} ({psi_d}) | "
                    f"{100 * r['top1'][0]:.1f}% -> {100 * r['top1_drifted'][0]:.1f}% "
                    f"(D = {d['diff_points']:+.1f} [{d['ci_points'][0]:+.1f}, {d['ci_points'][1]:+.1f}]) |")
    lines = ["## Drift on the device: undrifted and drifted streams (issue 25 item 3)", "", machine_line(), "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| bundle | test pictures | window / PSI thresholds | flag in 2,000 undrifted (last PSI) | "
             "first flag, drifted (PSI then) | top-1 test -> drifted (drop, paired 95% interval) |",
             "|---|---|---|---|---|---|", *rows, "",
             "A window is only compared once full, so request 200 is the earliest a 200-request window can flag. "
             "The photo runs' test splits hold 21 pictures, so their undrifted streams repeat each about 95 times: the "
             "thresholds are fitted for a field of as many distinct pictures as the validation split holds."]
    if a.held_out:
        lines.append("")
        lines.append("*(held out)*: no choice looked at these bundles: they were built after the design of the drift "
                     "check (thresholds per signal fitted on simulated streams, the warmth and sharpness signals) "
                     "was chosen on the other rows.")
    if not a.print_only:
        write_section("drift", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
