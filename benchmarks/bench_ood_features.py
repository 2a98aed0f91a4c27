"""Issue 25 item 1, the next step: would a score on the model's features tell pictures of no class apart better
than the logit scores the bundle ships (energy, RESULTS "ood": AUROC 0.79 on the digits, 0.87 on the photos)?
Writes the ``ood-features`` section of benchmarks/RESULTS.md. An experiment, not a product feature (the bundle's
ONNX model has no feature output): on the demo, the shipped model's FP32 PyTorch form (the pruned model, before
INT8); on the photos, the ImageNet EfficientNet-Lite0 backbone frozen with a linear head (see evaluate_photos).

For a finished run: the pruned model's penultimate features (the classifier's input) of its training pictures fit
each score; its test split is in distribution; the no-class sets are those of benchmarks/bench_ood.py (the demo:
digits 0-4, the source task's test split). Scores, higher = more in distribution:

- energy: logsumexp of the logits (what ships);
- cosine to the nearest class mean of the L2-normalised training features;
- kNN: minus the cosine distance to the k-th nearest training feature (Sun et al., ICML 2022), k = 1 and 5;
- Mahalanobis to the nearest class mean with a shared, Ledoit-Wolf-shrunk covariance (Lee et al., NeurIPS 2018;
  shrinkage because a few dozen training pictures cannot fill a covariance of hundreds of dimensions);
- energy with ReAct (Sun et al., NeurIPS 2021): the features clipped at the 90th percentile of the training
  pictures' features before the classifier (a Clip node the exported graph could carry).

With ``--photo-runs WORK`` also the real-photo benchmark's finished runs (benchmarks/bench_photos.py): each run's
pruned model, its training photos, its test split, the no-class photos of benchmarks/bench_ood.py.

    python benchmarks/bench_ood_features.py --run runs/demo [RUN ...] [--photos /tmp/edge-tl-bench-photos]
        [--photo-runs /tmp/edge-tl-bench-photos]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from _runs import run_split  # noqa: E402
from bench_ood import auroc, auroc_ci  # noqa: E402
from PIL import Image  # noqa: E402

SCORES = ("energy", "class-mean cosine", "kNN k=1", "kNN k=5", "Mahalanobis (shrunk)", "energy, ReAct p90")
REACT_PERCENTILE = 90


def _images(paths) -> list[Image.Image]:
    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(img.convert("RGB"))
    return out


def features(run: Path):
    """(fn(images) -> (features, logits), the split, the classifier's (weight, bias)) of the run's pruned model."""
    import torch

    from edge_tl.workstation.explain import run_model

    model, parent = run_model(run)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    grabbed: list[torch.Tensor] = []
    head.register_forward_hook(lambda mod, inp, out: grabbed.append(inp[0].detach()))
    pre = parent.bundle.preprocessor

    def run_images(images: list) -> tuple[np.ndarray, np.ndarray]:
        feats, logits = [], []
        with torch.no_grad():
            for i in range(0, len(images), 64):
                x = torch.from_numpy(np.stack([pre(img) for img in images[i:i + 64]]).astype(np.float32))
                grabbed.clear()
                logits.append(model(x).numpy())
                feats.append(grabbed[-1].flatten(1).numpy())
        return np.concatenate(feats), np.concatenate(logits)

    split = run_split(run)
    return run_images, split, (head.weight.detach().numpy(), head.bias.detach().numpy())


def scores(train_f: np.ndarray, train_y: np.ndarray, f: np.ndarray, logits: np.ndarray,
           head: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    from scipy.special import logsumexp
    from sklearn.covariance import LedoitWolf

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    tu, fu = unit(train_f), unit(f)
    classes = np.unique(train_y)
    means = unit(np.stack([tu[train_y == c].mean(0) for c in classes]))
    sims = np.sort(fu @ tu.T, axis=1)[:, ::-1]
    centred = np.concatenate([train_f[train_y == c] - train_f[train_y == c].mean(0) for c in classes])
    prec = LedoitWolf().fit(centred).precision_
    raw_means = np.stack([train_f[train_y == c].mean(0) for c in classes])
    maha = np.stack([np.einsum("nd,de,ne->n", f - m, prec, f - m) for m in raw_means], axis=1).min(1)
    weight, bias = head
    clipped = np.minimum(f, np.percentile(train_f, REACT_PERCENTILE)) @ weight.T + bias
    return {"energy, ReAct p90": logsumexp(clipped, axis=1),
            "energy": logsumexp(logits, axis=1), "class-mean cosine": (fu @ means.T).max(1),
            "kNN k=1": sims[:, 0], "kNN k=5": sims[:, min(4, sims.shape[1] - 1)], "Mahalanobis (shrunk)": -maha}


def evaluate(run: Path) -> dict:
    from edge_tl.workstation import demo

    src = demo.source_task(run / "source-ood")
    return evaluate_sets(run, {"digits 0-4 (near)": _images(sorted((src / "test").rglob("*.png")))})


def evaluate_sets(run: Path, sets: dict[str, list]) -> dict:
    """Every score of the run's pruned model: its test split against each set of pictures of no class."""
    fn, split, head = features(run)
    train_paths = split.paths("train")
    train_y = split.labels("train")
    train_f, _ = fn(_images(train_paths))
    test_f, test_l = fn(_images(split.paths("test")))
    inside = scores(train_f, train_y, test_f, test_l, head)
    res: dict = {"train": len(train_paths), "test": len(test_f), "sets": {}}
    for name, images in sets.items():
        f, logits = fn(images)
        outside = scores(train_f, train_y, f, logits, head)
        res["sets"][name] = {"n": len(f), **{s: (auroc(inside[s], outside[s]), *auroc_ci(inside[s], outside[s]))
                                             for s in SCORES}}
    return res


def evaluate_photos(root: Path, seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> dict:
    """The photos, with no fine-tuned run at hand (bench_photos takes 15-28 min a seed on 2 cores): the ImageNet
    EfficientNet-Lite0 backbone as is, a logistic-regression head on its features as the classifier (the frozen
    features mode; RESULTS "photo-modes": 78.1% against fine-tuning's 80.0%), a stratified 70/30 split per seed."""
    import torch
    from bench_ood import no_class_photos
    from photos import prepare
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from edge_tl.core.preprocess import PreprocessConfig, Preprocessor
    from edge_tl.workstation.train.backbones import create_model

    prepare(root / "gcompris")
    names = sorted(p.name for p in (root / "gcompris" / "images").iterdir() if p.is_dir())
    paths = [(q, i) for i, c in enumerate(names) for q in sorted((root / "gcompris" / "images" / c).iterdir())]
    model = create_model("efficientnet_lite0", len(names), "imagenet").eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    grabbed: list[torch.Tensor] = []
    head.register_forward_hook(lambda mod, inp, out: grabbed.append(inp[0].detach()))
    pre = Preprocessor(PreprocessConfig(input_size=(224, 224), resize=256, mean=(0.5,) * 3, std=(0.5,) * 3))

    def feats(images: list) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 32):
                grabbed.clear()
                model(torch.from_numpy(np.stack([pre(img) for img in images[i:i + 32]]).astype(np.float32)))
                out.append(grabbed[-1].flatten(1).numpy())
        return np.concatenate(out)

    f_all = feats(_images([q for q, _ in paths]))
    y_all = np.asarray([i for _, i in paths])
    ood = {name: feats(images) for name, images in no_class_photos(root).items()}
    res: dict = {"train": 0, "test": 0, "sets": {}}
    for seed in seeds:
        tr, te = train_test_split(np.arange(len(y_all)), test_size=0.3, stratify=y_all, random_state=seed)
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(f_all[tr], y_all[tr])
        res["train"], res["test"] = len(tr), len(te)
        res.setdefault("right", []).append(int((clf.predict(f_all[te]) == y_all[te]).sum()))
        head = (clf.coef_, clf.intercept_)
        inside = scores(f_all[tr], y_all[tr], f_all[te], clf.decision_function(f_all[te]), head)
        for name, f in ood.items():
            outside = scores(f_all[tr], y_all[tr], f, clf.decision_function(f), head)
            row = res["sets"].setdefault(f"{name}, seed {seed}", {"n": len(f)})
            for s in SCORES:
                row[s] = (auroc(inside[s], outside[s]), *auroc_ci(inside[s], outside[s]))
    return res


def _cells(row: dict) -> str:
    """A table row's AUROC cells, one per score, each with its interval."""
    return " | ".join(f"{row[s][0]:.3f} [{row[s][1]:.3f}, {row[s][2]:.3f}]" for s in SCORES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, nargs="*", default=[Path("runs/demo")])
    ap.add_argument("--photos", type=Path, default=None, help="the photos' work folder (benchmarks/bench_photos.py)")
    ap.add_argument("--photo-runs", type=Path, default=None,
                    help="a work folder of benchmarks/bench_photos.py: score its finished runs' pruned models")
    args = ap.parse_args()
    lines = ["## Out-of-distribution: scores on the features, an experiment (issue 25 item 1)", "", machine_line(), "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "AUROC with its bootstrap 95% interval (1.0: every test picture scores above every no-class one).", "",
             "| run | no-class set | n | " + " | ".join(SCORES) + " |", "|---|---|---|" + "---|" * len(SCORES)]
    tail: list[str] = []
    demo_means: dict[str, list[float]] = {s: [] for s in SCORES}
    for run in args.run:
        res = evaluate(run)
        for name, row in res["sets"].items():
            lines.append(f"| {run.name} ({res['train']} train, {res['test']} test) | {name} | {row['n']} | "
                         f"{_cells(row)} |")
            for sc in SCORES:
                demo_means[sc].append(row[sc][0])
    if args.run:
        tail.append(f"The demo runs' pruned models (FP32, before INT8; {len(args.run)} run(s)): mean AUROC on digits "
                    "0-4: " + ", ".join(f"{sc} {np.mean(v):.3f}" for sc, v in demo_means.items()) + ".")
    if args.photo_runs is not None:
        from bench_ood import no_class_photos

        sets = no_class_photos(args.photo_runs)
        means: dict[str, list[float]] = {s: [] for s in SCORES}
        for run in sorted(args.photo_runs.glob("s*-imagenet")):
            if not (run / "bundle" / "manifest.json").is_file():
                continue
            res = evaluate_sets(run, sets)
            for name, row in res["sets"].items():
                lines.append(f"| photos {run.name}, pruned FP32 ({res['train']} train, {res['test']} test) | {name} | "
                             f"{row['n']} | {_cells(row)} |")
                for sc in SCORES:
                    means[sc].append(row[sc][0])
        tail.append("The photo runs' pruned models (the recipe, FP32, before INT8): mean AUROC over the runs and both "
                    "no-class sets: " + ", ".join(f"{sc} {np.mean(v):.3f}" for sc, v in means.items()) + ".")
    if args.photos is not None:
        res = evaluate_photos(args.photos)
        for name, row in res["sets"].items():
            lines.append(f"| photos, ImageNet Lite0 frozen + linear head ({res['train']} train, {res['test']} test) "
                         f"| {name} | {row['n']} | {_cells(row)} |")
        from edge_tl.workstation.stats import wilson

        mean = {sc: np.mean([row[sc][0] for row in res["sets"].values()]) for sc in SCORES}
        right, n = sum(res["right"]), res["test"] * len(res["right"])
        low, high = wilson(right, n)
        lines += ["", f"The photos' linear head (frozen ImageNet Lite0, FP32, not pruned) scored {right}/{n} = "
                  f"{100 * right / n:.1f}% [95% Wilson {100 * low:.1f}, {100 * high:.1f}] top-1 pooled over "
                  f"seeds {', '.join(str(s) for s in range(len(res['right'])))} (per seed "
                  + ", ".join(f"{100 * r / res['test']:.1f}%" for r in res["right"])
                  + "); mean AUROC over the seeds and both no-class sets: "
                  + ", ".join(f"{sc} {v:.3f}" for sc, v in mean.items()) + ". Compare RESULTS \"ood\": the shipped "
                  "photo bundles (fine-tuned on the 98 photos, pruned, INT8) score 0.87 on average with the same "
                  "energy score; the feature scores are no better than energy on the frozen model's own logits."]
    lines += [x for t in tail for x in ("", t)]
    print("\n".join(lines))
    write_section("ood-features", "\n".join(lines))


if __name__ == "__main__":
    main()
