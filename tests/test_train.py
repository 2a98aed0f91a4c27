"""Backbones, weights loading, pruned checkpoints and the training loop (small and fast, real torch)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the workstation extra (torch) is not installed")

from edge_tl.core.errors import EdgeTLError  # noqa: E402
from edge_tl.core.preprocess import PreprocessConfig  # noqa: E402
from edge_tl.workstation.spec import BACKBONES  # noqa: E402
from edge_tl.workstation.train import build, create_model, evaluate, finetune_phases, fit, load_state, save_state  # noqa: E402
from edge_tl.workstation.train.backbones import checkpoint_state_dict, head_name, imagenet_state_dict  # noqa: E402
from edge_tl.workstation.train.datasets import TrainDataset, decision_views, eval_arrays  # noqa: E402


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_gets_a_new_head(backbone):
    model = build(backbone, 7, dropout=0.3).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 7)
    head = model.get_submodule(head_name(backbone))
    assert (head.out_features if hasattr(head, "out_features") else head.out_channels) == 7


def test_local_checkpoint_loads_except_a_head_of_another_size(tmp_path):
    src = build("mobilenet_v3_small", 5)
    path = tmp_path / "src.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()}, path)
    model = create_model("mobilenet_v3_small", 3, str(path))
    w = model.features[0][0].weight
    assert w.dtype == torch.float32
    assert torch.equal(w, src.features[0][0].weight.half().float())
    assert model.classifier[3].out_features == 3


def test_checkpoint_of_another_backbone_is_refused(tmp_path):
    path = tmp_path / "sq.pt"
    torch.save(build("squeezenet1_1", 5).state_dict(), path)
    with pytest.raises(EdgeTLError, match="do not fit mobilenet_v2: .*missing"):
        create_model("mobilenet_v2", 5, str(path))


def test_pickled_objects_are_not_loaded(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build("squeezenet1_1", 3), path)  # a whole pickled module, not a state_dict
    with pytest.raises(EdgeTLError, match="weights_only=True"):
        checkpoint_state_dict(path)
    with pytest.raises(EdgeTLError, match="does not exist"):
        checkpoint_state_dict(tmp_path / "missing.pt")


def test_imagenet_weights_offline_error_names_file_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    try:
        state = imagenet_state_dict("squeezenet1_1")
    except EdgeTLError as exc:
        msg = str(exc)
        assert "squeezenet1_1-b8a52dc0.pth" in msg
        assert str(tmp_path / "th" / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth") in msg
    else:  # this machine is online: the real weights came down
        assert "features.0.weight" in state


def test_pruned_checkpoint_round_trips(tmp_path):
    from edge_tl.workstation.prune import prune_to_macs

    model = build("mobilenet_v3_small", 4).eval()
    pruned = prune_to_macs(model, torch.zeros(1, 3, 32, 32), target_macs_ratio=0.5, round_to=8).model.eval()
    save_state(pruned, tmp_path / "p.pt")
    again = load_state("mobilenet_v3_small", 4, tmp_path / "p.pt").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(pruned(x), again(x), atol=1e-6)
    dw = again.features[2].block[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels and dw.out_channels % 8 == 0
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in model.parameters())


def _tiny_task(tmp_path, n=12):
    """Two visually distinct classes: bright images and dark images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(n):
        label = i % 2
        base = 200 if label else 40
        arr = np.clip(rng.normal(base, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
        p = tmp_path / f"{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
        labels.append(label)
    return paths, np.array(labels)


def test_fit_learns_keeps_best_and_is_repeatable(tmp_path):
    paths, labels = _tiny_task(tmp_path)
    pre = PreprocessConfig(input_size=(40, 40), resize=40, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = TrainDataset(paths, labels, pre, augment="light", hflip=True)
    val = eval_arrays(paths, labels, pre)
    assert val[0].shape == (12, 3, 40, 40)
    runs = []
    for _ in range(2):
        model = build("squeezenet1_1", 2, seed=1)
        res = fit(model, "squeezenet1_1", ds, val, finetune_phases("finetune", 3, 1, 1e-3, 1e-3, True),
                  batch_size=4, seed=1, device="cpu")
        runs.append((res, model))
    (a, model), (b, _) = runs
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert [h["phase"] for h in a.history] == ["warmup", "finetune", "finetune", "finetune"]
    top1, _, _ = evaluate(model, *val)
    assert top1 == pytest.approx(a.best_val_top1)  # the best checkpoint is what the model holds
    assert a.best_val_top1 > 0.5


def test_feature_extraction_trains_only_the_head(tmp_path):
    paths, labels = _tiny_task(tmp_path, n=8)
    pre = PreprocessConfig(input_size=(16, 16), resize=16)
    model = build("mobilenet_v3_small", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, "mobilenet_v3_small", TrainDataset(paths, labels, pre), eval_arrays(paths, labels, pre),
        finetune_phases("feature-extract", 2, 0, 1e-2, 1e-4, True), batch_size=4, device="cpu")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("classifier.3.") for k in changed)


def test_distillation_pulls_the_student_towards_the_teacher(tmp_path):
    """With distill_weight=1 the labels are ignored: a student trained on a teacher that outputs the OPPOSITE
    class learns the teacher's answers, not the labels. The teacher itself is left untouched."""
    from torch import nn

    from edge_tl.core.errors import EdgeTLError
    from edge_tl.workstation.train import recovery_phases

    paths, labels = _tiny_task(tmp_path)
    pre = PreprocessConfig(input_size=(40, 40), resize=40, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds, val = TrainDataset(paths, labels, pre), eval_arrays(paths, labels, pre)

    class Flipped(nn.Module):  # bright -> class 0, dark -> class 1: the labels reversed
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3), keepdim=False)[:, None]
            return torch.cat([8 * m, -8 * m], dim=1)

    teacher = Flipped()
    flipped_val = (val[0], 1 - val[1])
    def student():  # mean colour -> linear layer: learns either rule in a few steps
        torch.manual_seed(0)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))

    taught, labelled = student(), student()
    for model, weight, check in ((taught, 1.0, flipped_val), (labelled, 0.0, val)):
        fit(model, "mobilenet_v2", ds, check, recovery_phases(10, 0.1, True), batch_size=4, device="cpu",
            teacher=teacher, distill_weight=weight, distill_temperature=2.0, patience=20)
    assert evaluate(taught, *flipped_val)[0] == 1.0  # agrees with the teacher, against the labels
    assert evaluate(labelled, *val)[0] == 1.0  # weight 0: the teacher is ignored
    with pytest.raises(EdgeTLError, match="distill weight"):
        fit(student(), "mobilenet_v2", ds, val, recovery_phases(1, 1e-3, True), device="cpu", teacher=teacher,
            distill_weight=1.5)


def test_decision_set_is_validation_then_seeded_augmented_copies(tmp_path):
    """The build's choices between candidates are scored on the validation images followed by ``views`` lightly
    augmented copies of each: same labels, the same draw for the same seed, another for another seed, and
    torch's global generator left where it was (training after it must not change)."""
    import torch

    paths, labels = _tiny_task(tmp_path, n=6)
    pre = PreprocessConfig(input_size=(20, 20), resize=20, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    x, y = decision_views(paths, labels, pre, 3, hflip=False, seed=0)
    assert torch.equal(torch.rand(3), before)
    plain, _ = eval_arrays(paths, labels, pre)
    assert x.shape == (24, 3, 20, 20) and x.dtype == np.float32
    assert np.array_equal(y, np.tile(labels, 4))
    # the validation images exactly as the device preprocesses them (the qat stage reads validation top-1 off them)
    np.testing.assert_array_equal(x[:6], plain)
    assert all(np.abs(x[6 * k:6 * (k + 1)] - plain).mean() > 1e-3 for k in range(1, 4))  # each copy moved
    again, _ = decision_views(paths, labels, pre, 3, hflip=False, seed=0)
    other, _ = decision_views(paths, labels, pre, 3, hflip=False, seed=1)
    assert np.array_equal(x, again) and not np.array_equal(x[6:], other[6:])
    x0, y0 = decision_views(paths, labels, pre, 0, hflip=False, seed=0)
    assert np.array_equal(x0, plain) and np.array_equal(y0, labels)


def test_fit_keeps_the_last_epoch_when_asked(tmp_path):
    """keep = "last" (the recovery after pruning): the model ends with the final epoch's weights, whose validation
    top-1 is the history's last entry; the best epoch's weights are still handed back for the record."""
    paths, labels = _tiny_task(tmp_path)
    pre = PreprocessConfig(input_size=(40, 40), resize=40, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds, val = TrainDataset(paths, labels, pre, augment="light", hflip=True), eval_arrays(paths, labels, pre)
    model = build("squeezenet1_1", 2, seed=1)
    res = fit(model, "squeezenet1_1", ds, val, finetune_phases("finetune", 4, 0, 1e-3, 1e-3, True),
              batch_size=4, seed=1, device="cpu", keep="last")
    assert res.kept == "last" and res.as_dict()["kept"] == "last" and "best_state" not in res.as_dict()
    top1, loss, _ = evaluate(model, *val)
    assert top1 == pytest.approx(res.history[-1]["val_top1"]) and loss == pytest.approx(res.history[-1]["val_loss"])
    best = build("squeezenet1_1", 2, seed=1)
    best.load_state_dict(res.best_state)
    assert evaluate(best, *val)[0] == pytest.approx(res.best_val_top1)
