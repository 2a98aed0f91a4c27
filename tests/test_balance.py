"""Class imbalance (train.balance): the sampler, the class-weighted and focal losses, auto, and the report's
per-class metrics and balanced-accuracy targets."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the workstation extra (torch) is not installed")

from edge_tl.workstation.train.balance import (  # noqa: E402
    FocalLoss,
    class_weights,
    fit_kwargs,
    make_sampler,
    resolve,
)

LABELS = np.array([0] * 90 + [1] * 10 + [2] * 20)


def test_sampler_draws_the_classes_evenly():
    sampler = make_sampler(LABELS, 3, seed=0)
    drawn = np.concatenate([LABELS[list(sampler)] for _ in range(50)])  # 50 epochs of 120 draws
    share = np.bincount(drawn, minlength=3) / len(drawn)
    assert share == pytest.approx([1 / 3] * 3, abs=0.02)  # unbalanced: 0.75 / 0.083 / 0.167
    assert len(list(sampler)) == len(LABELS)
    again = make_sampler(LABELS, 3, seed=0)
    assert list(again) == list(make_sampler(LABELS, 3, seed=0))  # seeded


def test_class_weights_are_sklearn_balanced_weights():
    from sklearn.utils.class_weight import compute_class_weight

    w = class_weights(LABELS, 3)
    assert w == pytest.approx([120 / (3 * 90), 120 / (3 * 10), 120 / (3 * 20)])
    assert w == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=LABELS))
    assert class_weights(np.array([0, 0, 2]), 3)[1] == 0  # a class with no images gets no weight


def test_weighted_loss_and_focal_loss():
    logits = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2] * 4)
    w = torch.tensor([0.5, 4.0, 2.0])
    ce = torch.nn.functional.cross_entropy(logits, target, weight=w)
    assert FocalLoss(w, gamma=0.0)(logits, target) == pytest.approx(float(ce), rel=1e-6)  # gamma 0: weighted CE
    # focal down-weights well-classified images: the loss of confident, right predictions nearly vanishes
    confident = torch.nn.functional.one_hot(target, 3).float() * 10
    assert float(FocalLoss(w, 2.0)(confident, target)) < 1e-6 < float(FocalLoss(w, 0.0)(confident, target))
    kw = fit_kwargs(resolve("loss", LABELS, 3, 3.0), LABELS, 3, seed=0)
    assert torch.allclose(kw["loss_fn"].weight, torch.tensor(class_weights(LABELS, 3), dtype=torch.float32))
    assert isinstance(fit_kwargs(resolve("loss", LABELS, 3, 3.0, "focal", 1.5), LABELS, 3, 0)["loss_fn"], FocalLoss)
    assert fit_kwargs(resolve("none", LABELS, 3, 3.0), LABELS, 3, 0) == {}


def test_auto_picks_the_sampler_only_above_the_threshold():
    setup = resolve("auto", LABELS, 3, threshold=3.0)
    assert setup["used"] == "sampler" and setup["class_ratio"] == 9.0 and setup["train_counts"] == [90, 10, 20]
    assert resolve("auto", LABELS, 3, threshold=10.0)["used"] == "none"
    assert resolve("auto", np.array([0, 0, 1, 1]), 2, threshold=3.0)["used"] == "none"
    assert resolve("loss", LABELS, 3, 3.0, "focal", 2.0)["focal_gamma"] == 2.0


def test_fit_trains_with_a_sampler_and_a_weighted_loss(tmp_path):
    from PIL import Image

    from edge_tl.core.preprocess import PreprocessConfig
    from edge_tl.workstation.train import build, finetune_phases, fit
    from edge_tl.workstation.train.datasets import TrainDataset, eval_arrays

    rng = np.random.default_rng(0)
    labels = np.array([0] * 9 + [1] * 3)
    paths = []
    for i, y in enumerate(labels):
        arr = np.clip(rng.normal(200 if y else 40, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    pre = PreprocessConfig(input_size=(16, 16), resize=16)
    ds, val = TrainDataset(paths, labels, pre), eval_arrays(paths, labels, pre)
    for mode in ("sampler", "loss"):
        model = build("mobilenet_v3_small", 2, seed=0)
        kw = fit_kwargs(resolve(mode, labels, 2, 2.0), labels, 2, seed=0)
        res = fit(model, "mobilenet_v3_small", ds, val, finetune_phases("finetune", 1, 1, 1e-3, 1e-3, True),
                  batch_size=4, device="cpu", **kw)
        assert res.epochs_run == 2 and np.isfinite([h["train_loss"] for h in res.history]).all()


def test_spec_balance_fields():
    from edge_tl.core.errors import EdgeTLError
    from edge_tl.workstation.spec import BuildSpec, load_spec

    assert BuildSpec().train.balance == "auto"
    spec = load_spec(None, {"train.balance": "loss", "train.balance_loss": "focal", "train.focal_gamma": 1.0})
    assert (spec.train.balance, spec.train.balance_loss) == ("loss", "focal")
    with pytest.raises(EdgeTLError, match="train.balance"):
        load_spec(None, {"train.balance": "oversample"})


def _ctx(train_counts, ratio=3.0):
    """The two Context attributes the report's imbalance rule reads (data_split.summary.counts, spec.data)."""
    summary = SimpleNamespace(counts={"train": train_counts})
    return SimpleNamespace(data_split=SimpleNamespace(summary=summary),
                           spec=SimpleNamespace(data=SimpleNamespace(imbalance_ratio=ratio)))


def test_report_per_class_metrics():
    from edge_tl.workstation.pipeline.report import class_metrics

    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 0, 2])
    m = class_metrics(y, pred, ["a", "b", "c"])
    assert m["precision"] == pytest.approx([3 / 4, 2 / 3, 1.0])
    assert m["recall"] == pytest.approx([3 / 4, 1.0, 1 / 2])
    assert m["f1"][0] == pytest.approx(0.75) and m["support"] == [4, 2, 2]
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 1 + 0.5) / 3)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["confusion"] == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_targets_use_balanced_accuracy_when_classes_are_imbalanced():
    from edge_tl.workstation.pipeline.report import target_view

    stages = {"finetune": {"top1": 0.9, "balanced_top1": 0.6}, "scratch": {"top1": 0.5, "balanced_top1": 0.3},
              "quantize": {"top1": 0.88, "balanced_top1": 0.55}, "prune": {"enabled": False}}
    comp = {"transfer_top1": 0.9, "scratch_top1": 0.5, "train_images": 10, "weights": "demo"}
    view, _, c = target_view(_ctx({"a": 40, "b": 4}), stages, comp, {})
    assert view["finetune"]["top1"] == 0.6 and view["quantize"]["top1"] == 0.55 and view["prune"] == {"enabled": False}
    assert (c["transfer_top1"], c["scratch_top1"]) == (0.6, 0.3)
    same, _, c2 = target_view(_ctx({"a": 10, "b": 9}), stages, comp, {})
    assert same is stages and c2 is comp
