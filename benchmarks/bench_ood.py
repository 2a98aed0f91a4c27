"""Issue 25 item 1: which out-of-distribution score tells pictures of no class apart, on evidence. Writes the ``ood``
section of benchmarks/RESULTS.md.

For each shipped bundle (the real-photo benchmark's runs, benchmarks/bench_photos.py, and a demo build), the INT8
model (Q/DQ in float, as TensorRT computes it) scores its own test split (in distribution) and pictures of no
class; AUROC of each score (energy = logsumexp of the logits, max logit, max calibrated softmax), with a bootstrap
95% interval, and what the shipped rule (energy, threshold keeping 95% of validation) does at its threshold: the
share of test pictures kept and of no-class pictures let through.

Pictures of no class, none of them seen by any choice:
- photos: GCompris' own other pictures (gcompris-qt-data, the package the photos come from): the 24 animal
  photos of explore_farm_animals.rcc and explore_world_animals.rcc (near: real photos, other subjects) and 60
  pieces of paintings from paintings.rcc (far: every 4th of the package's 267 puzzle pieces of public-domain
  paintings);
- digits (the demo, classes 5-9): the test split of the source task, digits 0-4 (near: the same scans, other
  digits), and the 140 GCompris photos (far).

    python benchmarks/bench_ood.py [--photos /tmp/edge-tl-bench-photos] [--demo RUN ...]
    (--demo: finished demo builds; by default /tmp/edge-tl-bench-demo/demo-s0, built there if the folder is absent)
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from _runs import demo_run, stage_dir, test_split  # noqa: E402
from PIL import Image  # noqa: E402
from rcc import RccFile  # noqa: E402

from edge_tl.core.bundle import Bundle  # noqa: E402
from edge_tl.core.postprocess import OOD_SCORES, ood_scores  # noqa: E402
from edge_tl.workstation.calibrate import fit_ood_rule  # noqa: E402
from edge_tl.workstation.pipeline.stages import onnx_logits  # noqa: E402

RCC_DIR = "./usr/share/gcompris-qt/rcc/"
ANIMALS = ("explore_farm_animals.rcc", "explore_world_animals.rcc")
PAINTINGS = "paintings.rcc"
PHOTO_EXT = (".webp", ".jpg", ".jpeg", ".png")
BOOT = 2000


def _rcc_members(deb: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tar_path = Path(tmp) / "data.tar"
        with open(tar_path, "wb") as out:
            subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=out, check=True)
        with tarfile.open(tar_path) as tar:
            return {n: tar.extractfile(RCC_DIR + n).read() for n in names}


def _rcc_images(blob: bytes, prefix: str = "") -> list[Image.Image]:
    with tempfile.NamedTemporaryFile(suffix=".rcc") as f:
        f.write(blob)
        f.flush()
        rcc = RccFile.open(f.name)
        out = []
        for path, data in rcc.walk():
            if not path.lower().endswith(PHOTO_EXT) or not path.startswith(prefix):
                continue
            with Image.open(io.BytesIO(data)) as img:
                out.append(img.convert("RGB"))
        return out


def no_class_photos(photos_root: Path) -> dict[str, list[Image.Image]]:
    deb = sorted((photos_root / ".gcompris-qt-data-cache").glob("gcompris-qt-data_*.deb"))[-1]
    blobs = _rcc_members(deb, (*ANIMALS, PAINTINGS))
    animals = [img for n in ANIMALS for img in _rcc_images(blobs[n], "gcompris/src/activities/")]
    paintings = _rcc_images(blobs[PAINTINGS], "gcompris/src/activities/")[::4][:60]
    return {"animal photos (near)": animals, "pieces of paintings (far)": paintings}


def _logits(bundle: Bundle, images: list) -> np.ndarray:
    x = np.stack([bundle.preprocessor(img) for img in images]).astype(np.float32)
    return onnx_logits(bundle.model_path("int8"), x, qdq="float")


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an in-distribution picture > that of a no-class one), ties half (Mann-Whitney)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(inside, outside).statistic / (len(inside) * len(outside)))


def auroc_ci(inside: np.ndarray, outside: np.ndarray, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    vals = [auroc(rng.choice(inside, len(inside)), rng.choice(outside, len(outside))) for _ in range(BOOT)]
    return float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))


def evaluate(run: Path, sets: dict[str, list]) -> dict:
    bundle = Bundle.open(run / "bundle")
    t = bundle.postprocess.temperature
    test = _logits(bundle, test_split(run)[0])
    val = np.load(stage_dir(run, "qat") / "val_logits.npy")
    rule = fit_ood_rule(val, "energy", 0.95, t)
    out = {"test_images": len(test), "sets": {}}
    for name, images in sets.items():
        ood = _logits(bundle, images)
        row = {"n": len(images)}
        for score in OOD_SCORES:
            a, b = ood_scores(test, score, t), ood_scores(ood, score, t)
            row[score] = (auroc(a, b), *auroc_ci(a, b))
        e_in, e_out = ood_scores(test, "energy", t), ood_scores(ood, "energy", t)
        row["kept_test"] = float(np.mean(e_in >= rule.threshold))
        row["let_through"] = float(np.mean(e_out >= rule.threshold))
        out["sets"][name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=Path, default=Path("/tmp/edge-tl-bench-photos"))
    ap.add_argument("--demo", type=Path, nargs="*", default=[Path("/tmp/edge-tl-bench-demo/demo-s0")])
    ap.add_argument("--print-only", action="store_true", help="print the table, leave RESULTS.md as it is (an A/B "
                    "arm of bench_photos.py --set)")
    a = ap.parse_args()
    photo_sets = no_class_photos(a.photos)
    runs = {f"photos {r.name}": (r, photo_sets) for r in sorted(a.photos.glob("s*-imagenet"))
            if (r / "bundle" / "manifest.json").is_file()}
    if a.demo:
        from edge_tl.workstation import demo

        gc = [Image.open(p).convert("RGB") for p in sorted((a.photos / "gcompris" / "images").rglob("*"))
              if p.suffix.lower() in PHOTO_EXT]
        for run in map(demo_run, a.demo):
            src = demo.source_task(run / "source-ood")
            digits = [Image.open(p).convert("RGB") for p in sorted((src / "test").rglob("*.png"))]
            runs[f"digits {run.name}"] = (run, {"digits 0-4 (near)": digits, "GCompris photos (far)": gc})
    results = {name: evaluate(run, sets) for name, (run, sets) in runs.items()}
    lines = ["## Out-of-distribution score: pictures of no class (issue 25 item 1)", "", machine_line(), "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "AUROC (1.0: every test picture scores above every no-class one; 0.5: no better than chance) with its "
             "bootstrap 95% interval; at the shipped threshold (energy, 95% of validation kept): test pictures "
             "kept / no-class pictures let through.", "",
             "| bundle | no-class set | n | energy | max logit | max softmax | kept / let through |",
             "|---|---|---|---|---|---|---|"]
    pooled: dict[str, dict[str, list[float]]] = {}
    for name, res in results.items():
        for set_name, row in res["sets"].items():
            cells = [f"{row[s][0]:.3f} [{row[s][1]:.3f}, {row[s][2]:.3f}]" for s in OOD_SCORES]
            lines.append(f"| {name} ({res['test_images']} test) | {set_name} | {row['n']} | " + " | ".join(cells)
                         + f" | {100 * row['kept_test']:.0f}% / {100 * row['let_through']:.0f}% |")
            task = name.split()[0]
            for s in OOD_SCORES:
                pooled.setdefault(task, {}).setdefault(s, []).append(row[s][0])
    lines += ["", "Mean AUROC per task over its bundles and no-class sets: " + "; ".join(
        f"{task}: " + ", ".join(f"{s} {np.mean(v):.3f}" for s, v in scores.items()) for task, scores in pooled.items())
        + "."]
    if not a.print_only:
        write_section("ood", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
