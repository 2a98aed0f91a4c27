"""Issue 25 targets: the field teaches the next model. On the demo (digits 5-9, seeds 0-4):

1. the parent: ``edge-tl build`` (the bundled demo recipe, Grad-CAM off) with ``--seed S``;
2. a simulated new camera (:func:`edge_tl.workstation.demo.new_camera`: a warm colour cast, a blur of 1.5% of the
   shorter side, a 12 degree rotation) on the parent's own test split (upscaled to the 32 px the field pictures
   have): the parent's drop D = clean - drifted top-1 (its shipped INT8 model, Q/DQ in float);
3. children ``edge-tl build --from PARENT --add FIELD --rehearsal replay|none``, FIELD = N new-camera pictures per
   class that the demo never used (:func:`edge_tl.workstation.demo.field_task`), N = 5, 10, 20 with replay and 10
   without; the build holds 30% of each field class out for its own gate, so a field class of n pictures trains on
   n - round(0.3 n) = N of them;
4. every child's INT8 model is scored on the parent's drifted test split (pictures neither build saw: the recovery
   of D) and on the clean one (forgetting), paired with the parent on the same pictures; then what the devices
   run under each gate rule (``continual.gain_score``: top1, log-loss, views, each applied to the evidence the
   build recorded in continual.json): the child where the rule ships it, else the parent (recovery 0,
   forgetting 0).

Writes the ``continual`` section of benchmarks/RESULTS.md.

``--task photos``: the same on the real photos (benchmarks/bench_photos.py's GCompris photos, the photo recipe
models/recipes/photos_lite0.toml at 224 px): per seed, 7 photos of each class (a seeded draw) are kept out of the
parent's data as the field source and drifted by the same new camera at their own size (about 320x240); the
parent is built on the rest. With 17 household photos, 7 a class is what leaves the parent a split of every
class: the build holds 2 of each out for its gate (10 held out, its minimum) and trains on 5. Arms: 5 a class with
replay and without. Writes the ``continual-photos`` section.

    python benchmarks/bench_continual.py                 # seeds 0-4, about 45 min on 2 cores
    python benchmarks/bench_continual.py --seeds 0       # one seed (--work keeps finished builds: a rerun resumes)
    python benchmarks/bench_continual.py --task photos   # seeds 0-4 on the photos, 14-17 min a seed
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from _runs import stage_dir, test_split  # noqa: E402
from PIL import Image  # noqa: E402

from edge_tl.core.bundle import Bundle  # noqa: E402
from edge_tl.workstation.continual import field_gain  # noqa: E402
from edge_tl.workstation.demo import field_task, new_camera  # noqa: E402
from edge_tl.workstation.pipeline.stages import onnx_logits  # noqa: E402
from edge_tl.workstation.spec import ContinualSpec  # noqa: E402
from edge_tl.workstation.stats import paired  # noqa: E402

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))
ARMS = (("replay", 5), ("replay", 10), ("replay", 20), ("none", 10))
PHOTO_TRAIN = 5  # field photos a class the photo children train on (one field per seed: every arm shares it)
PHOTO_ARMS = (("replay", PHOTO_TRAIN), ("none", PHOTO_TRAIN))
PHOTO_RECIPE = Path(__file__).resolve().parent.parent / "models" / "recipes" / "photos_lite0.toml"
SCORES = ("top1", "log-loss", "views")  # continual.gain_score: each rule's verdict on the same children
HOLDOUT = 0.3  # continual.field_holdout's default


def _field_size(n_train: int) -> int:
    """Pictures per field class so that the build trains on ``n_train`` of them (continual.plan's rounding)."""
    n = n_train
    while n - min(n - 1, max(1, round(n * HOLDOUT))) < n_train:
        n += 1
    return n


PHOTO_FIELD = _field_size(PHOTO_TRAIN)  # photos a class kept out of each parent as its field source (7)


def _build(run: Path, *args: str) -> tuple[int, float, str]:
    state = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    if state.get("status") in ("done", "failed") and (run / "bench.json").is_file():
        rec = json.loads((run / "bench.json").read_text())
        return rec["rc"], rec["seconds"], rec["error"]
    t0 = time.perf_counter()
    proc = subprocess.run([EDGE_TL, "build", "--out", str(run), "--overwrite", "--no-explain", *args],
                          capture_output=True, text=True)
    secs = time.perf_counter() - t0
    error = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.lower().startswith("error")), "")
    # exit 2 on a child: the build refused it before the gate (e.g. a recovery at chance on a few field photos
    # without replay): no model, the devices keep the parent
    stopped = proc.returncode == 2 and error and "--from" in args
    if proc.returncode not in (0, 3) and not stopped:
        raise SystemExit(f"edge-tl build {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    (run / "bench.json").write_text(json.dumps({"rc": proc.returncode, "seconds": secs, "error": error}))
    return proc.returncode, secs, error


def _right(bundle: Bundle, images: list[Image.Image], y: np.ndarray, model: Path | None = None) -> np.ndarray:
    """Right answers of ``model`` (default: the bundle's INT8 model; Q/DQ in float) with the bundle's
    preprocessing."""
    x = np.stack([bundle.preprocessor(img) for img in images]).astype(np.float32)
    return onnx_logits(model or bundle.model_path("int8"), x, qdq="float").argmax(1) == y


def _gated_model(child: Path) -> Path:
    """The INT8 model the continual gate judged (edge_tl.workstation.continual.judge), shipped or not."""
    return stage_dir(child, "qat") / "model.int8.onnx"


def _ci(p) -> str:
    return f"{p.diff_points:+.1f} [{p.ci_points[0]:+.1f}, {p.ci_points[1]:+.1f}]"


def photo_task(work: Path, seed: int) -> tuple[Path, Path]:
    """(the parent's data, the field): per class, ``PHOTO_FIELD`` photos of a seeded draw drifted by the new
    camera into the field, the others copied to the parent's class folders (made once per seed)."""
    from photos import prepare

    prepare(work / "gcompris")
    images = work / "gcompris" / "images"
    parent, field = work / f"s{seed}-photos" / "parent", work / f"s{seed}-photos" / "field"
    if (work / f"s{seed}-photos" / "done").is_file():
        return parent, field
    shutil.rmtree(work / f"s{seed}-photos", ignore_errors=True)
    rng = np.random.default_rng(seed)
    for cls in sorted(d.name for d in images.iterdir() if d.is_dir()):
        files = sorted((images / cls).iterdir())
        order = rng.permutation(len(files))
        (parent / cls).mkdir(parents=True)
        (field / cls).mkdir(parents=True)
        for rank, i in enumerate(order):
            if rank < PHOTO_FIELD:
                with Image.open(files[i]) as img:
                    new_camera(img.convert("RGB")).save(field / cls / f"{files[i].stem}.png")
            else:
                shutil.copy2(files[i], parent / cls / files[i].name)
    (work / f"s{seed}-photos" / "done").write_text("")
    return parent, field


def run_seed(work: Path, seed: int, task: str = "demo") -> dict:
    parent = work / f"s{seed}-parent"
    if task == "photos":
        data, photo_field = photo_task(work, seed)
        rc, secs, err = _build(parent, str(PHOTO_RECIPE), "--data", str(data), "--seed", str(seed))
    else:
        rc, secs, err = _build(parent, "--seed", str(seed))
    if rc != 0:
        raise SystemExit(f"the parent build of seed {seed} did not ship: {err}")
    images, y = test_split(parent)
    # the demo's field pictures are upscaled to 32 px before the camera; the photos keep their own size
    drifted = [new_camera(img if task == "photos" else img.resize((32, 32), Image.BILINEAR)) for img in images]
    pb = Bundle.open(parent / "bundle")
    rec = {"seed": seed, "parent_seconds": secs, "parent": {"clean": _right(pb, images, y).tolist(),
                                                            "drifted": _right(pb, drifted, y).tolist()}, "arms": {}}
    for rehearsal, n in (PHOTO_ARMS if task == "photos" else ARMS):
        field = photo_field if task == "photos" else field_task(work / "field", _field_size(n), seed=seed)
        child = work / f"s{seed}-{rehearsal}-{n}"
        rc, secs, err = _build(child, "--from", str(parent), "--add", str(field), "--rehearsal", rehearsal)
        arm: dict = {"seconds": secs, "shipped": rc == 0, "error": err, "model": None}
        if rc != 2:  # the child's model, judged by the gate whether it shipped or not
            model = _gated_model(child)
            arm["model"] = {"clean": _right(pb, images, y, model).tolist(),
                            "drifted": _right(pb, drifted, y, model).tolist()}
        gate = json.loads((child / "continual.json").read_text()) if (child / "continual.json").is_file() else {}
        arm["gate"] = {k: gate.get(k) for k in ("field_train", "field_holdout", "ships", "why_not", "adaptation",
                                                "forgetting") if k in gate}
        rec["arms"][f"{rehearsal}-{n}"] = arm
        print(f"seed {seed} {rehearsal}-{n}: {'shipped' if rc == 0 else 'refused: ' + err} ({secs:.0f} s)",
              file=sys.stderr, flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--task", choices=("demo", "photos"), default="demo")
    ap.add_argument("--work", type=Path, help="default: /tmp/edge-tl-bench-continual[-photos]")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    photos = args.task == "photos"
    work = args.work or Path("/tmp/edge-tl-bench-continual" + "-photos" * photos)
    work.mkdir(parents=True, exist_ok=True)
    recs = []
    for seed in seeds:
        path = work / f"s{seed}.json"
        if not path.is_file():
            path.write_text(json.dumps(run_seed(work, seed, args.task)))
        recs.append(json.loads(path.read_text()))
    arms = PHOTO_ARMS if photos else ARMS
    main_arm = "replay-5" if photos else "replay-10"

    def rule(a: dict, score: str) -> bool:  # the gate's verdict under continual.gain_score = score
        if a["model"] is None:  # the build stopped before the gate
            return False
        ad, fo = a["gate"]["adaptation"], a["gate"]["forgetting"]
        return bool(fo["passed"] and field_gain(ad, score)[0])

    def deployed(r: dict, arm: str, score: str | None) -> dict:
        """What the devices run: the child's model (score None: whatever the gate says), else the parent (also
        where the child's build stopped before the gate: there is no child model to score)."""
        a = r["arms"][arm]
        return a["model"] if a["model"] is not None and (score is None or rule(a, score)) else r["parent"]

    def cat(key: str, arm: str | None = None, score: str | None = None) -> np.ndarray:
        return np.concatenate([np.asarray((r["parent"] if arm is None else deployed(r, arm, score))[key])
                               for r in recs])

    p_clean, p_drift = cat("clean"), cat("drifted")
    drop = paired(p_clean, p_drift)
    per_seed_d = "; ".join(f"s{r['seed']} {_ci(paired(*(np.asarray(r['parent'][k]) for k in ('clean', 'drifted'))))}"
                           for r in recs)
    rows = []
    for rehearsal, n in arms:
        arm = f"{rehearsal}-{n}"
        secs = np.mean([r["arms"][arm]["seconds"] for r in recs])
        for score in (None, *SCORES):
            what = "child model" if score is None else f"as deployed, `{score}`"
            shipped = "-" if score is None else f"{sum(rule(r['arms'][arm], score) for r in recs)}/{len(recs)}"
            gain = paired(cat("drifted", arm, score), p_drift)
            forget = paired(p_clean, cat("clean", arm, score))
            share = gain.diff_points / drop.diff_points if drop.diff_points > 0 else float("nan")
            lo, hi = (gain.ci_points[0] / drop.diff_points, gain.ci_points[1] / drop.diff_points) \
                if drop.diff_points > 0 else (float("nan"),) * 2

            def seed_gain(r: dict, arm: str = arm, score: str | None = score) -> np.ndarray:
                return np.asarray(deployed(r, arm, score)["drifted"])

            worst = min(recs, key=lambda r: np.mean(seed_gain(r)) - np.mean(r["parent"]["drifted"]))
            w = paired(seed_gain(worst), np.asarray(worst["parent"]["drifted"]))
            rows.append(f"| {rehearsal} | {n} | {what} | {shipped} | "
                        f"{100 * cat('drifted', arm, score).mean():.1f}% | {_ci(gain)} | {100 * share:.0f}% "
                        f"[{100 * lo:.0f}, {100 * hi:.0f}] | s{worst['seed']} {_ci(w)} | {_ci(forget)} | "
                        f"{100 * cat('clean', arm, score).mean():.1f}% | {secs:.0f} |")

    default = ContinualSpec().gain_score

    def why(a: dict) -> str:  # the default rule's reasons, short (continual.json in each child's run folder)
        if a["model"] is None:
            return f"the build stopped: {a['error'].removeprefix('error: ')}"
        parts = [w for w, bad in (("no field gain beyond noise", not field_gain(a["gate"]["adaptation"], default)[0]),
                                  ("forgetting", not a["gate"]["forgetting"]["passed"])) if bad]
        return " + ".join(parts)

    refused = [f"s{r['seed']} {arm} ({why(a)})" for r in recs for arm, a in r["arms"].items()
               if not rule(a, default)]

    def held(a: dict) -> str:
        if a["model"] is None:
            return "the build stopped before the gate"
        ad = a["gate"]["adaptation"]
        return (f"{ad['images']} held out: top-1 {ad['diff_points']:+.1f} [{ad['diff_ci_points'][0]:+.1f}, "
                f"{ad['diff_ci_points'][1]:+.1f}], log-loss {ad['log_loss_gain']:+.3f} "
                f"[{ad['log_loss_gain_ci'][0]:+.3f}, {ad['log_loss_gain_ci'][1]:+.3f}], views "
                f"{ad['views_diff_points']:+.1f} [{ad['views_diff_ci_points'][0]:+.1f}, "
                f"{ad['views_diff_ci_points'][1]:+.1f}]")

    gates = ["- The gate's evidence on the held-out field pictures (child - parent: top-1 points, log-loss gain "
             f"in nats, top-1 points on 20 augmented copies of each; 95% intervals), replay with {main_arm[7:]} a "
             "class: " + "; ".join(f"s{r['seed']} {held(r['arms'][main_arm])}" for r in recs) + "."]
    demo_text = ("The bundled demo (digits 5-9, 10 training images per class, MobileNetV2 at 32 px from the digits 0-4 "
                 f"source), seeds {', '.join(map(str, seeds))}. Drift: `demo.new_camera` (warm colour cast, blur 1.5% "
                 "of the shorter side, 12 degree rotation) on the parent's own test split (400 pictures per seed, "
                 "upscaled to 32 px like the field pictures), which neither build trained or chose on. Children: "
                 "`edge-tl build --from PARENT --add FIELD --rehearsal replay|none`, FIELD = new-camera pictures the "
                 "demo never used, N per class trained on (30% more held out by the build for its own gate). Every "
                 "accuracy is the shipped INT8 model, Q/DQ in float; differences are paired on the same pictures "
                 "(bootstrap 95%), pooled over the seeds. A refused child ships nothing, so it counts as the parent.")
    photo_text = ("The real photos (GCompris, 5 classes, benchmarks/bench_photos.py) with the photo recipe "
                  "(models/recipes/photos_lite0.toml: ImageNet Lite0 at 224 px, frozen features, L-BFGS head, 40% "
                  f"of the MACs pruned), seeds {', '.join(map(str, seeds))}. Per seed {PHOTO_FIELD} photos of each "
                  "class (a seeded draw) are kept out of the parent as the field source and taken by "
                  "`demo.new_camera` (warm colour cast, blur 1.5% of the shorter side, 12 degree rotation) at their "
                  "own size; the parent is built on the other photos (stratified 70/15/15) and its own test split, "
                  "drifted the same way, measures D and the recovery. Children: `edge-tl build --from PARENT --add "
                  f"FIELD --rehearsal replay|none`, trained on {PHOTO_TRAIN} field photos a class, "
                  f"{PHOTO_FIELD - PHOTO_TRAIN} a class held out for the "
                  "gate (10 in all, the gate's minimum): with 17 household photos, 10 a class trained (14 a class "
                  "taken out) would leave the parent 3 household photos. Every accuracy is the shipped INT8 model, "
                  "Q/DQ in float; differences paired on the same pictures (bootstrap 95%), pooled over the seeds; a "
                  "refused child counts as the parent.")
    lines = [("## Continual build on the real photos: a new camera, five labelled field photos a class (issue 25)"
              if photos else "## Continual build: a new camera, a few labelled field pictures, the next model "
              "(issue 25)"), "", machine_line(), "", photo_text if photos else demo_text, "",
             f"- Parent on clean test pictures: {100 * p_clean.mean():.1f}%; on the drifted copies: "
             f"{100 * p_drift.mean():.1f}%. Drop D = {_ci(drop)} points (pooled); per seed: {per_seed_d}.", "",
             "| rehearsal | field pictures per class (trained) | model | shipped | drifted top-1 | gain on drifted "
             "(points) | share of D recovered | worst seed's gain | forgetting on clean (parent - child) | clean "
             "top-1 | seconds per child |",
             "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
             "*child model*: the INT8 model the continual gate judged, whether it shipped or not (what training "
             "achieved); *as deployed, `rule`*: what the devices run after the gate with `continual.gain_score = "
             "rule` (the parent where it refuses), each rule applied to the same children's recorded evidence "
             "(continual.json): `top1`, the top-1 gain's interval above 0; `log-loss` / `views`, that, or that "
             "score's interval above 0 with the top-1 gain not below 0; all of them: forgetting within 1 point. A "
             "child whose build stopped before the gate (listed below) has no model: every row counts it as the "
             "parent.", "",
             "Targets (issue 25): with 10 pictures per class and rehearsal, >= 70% of D recovered and <= 1 point "
             "forgotten (pooled).",
             *([f"- Refused with the default rule (`{default}`; the devices keep the parent): "
                + "; ".join(refused) + "."] if refused else []), *gates,
             f"- Parent builds: {np.mean([r['parent_seconds'] for r in recs]):.0f} s on average."]
    write_section("continual-photos" if photos else "continual", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
