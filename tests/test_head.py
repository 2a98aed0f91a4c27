"""The frozen backbone's head fitted by L-BFGS (train.head) and the recovery by feature distillation
(prune.recovery_distill = features): small, real torch and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the workstation extra (torch) is not installed")

from edge_tl.core.errors import EdgeTLError  # noqa: E402
from edge_tl.core.preprocess import PreprocessConfig  # noqa: E402
from edge_tl.workstation.train import build, finetune_phases, fit, recovery_phases  # noqa: E402
from edge_tl.workstation.train.datasets import TrainDataset, eval_arrays, with_views  # noqa: E402
from edge_tl.workstation.train.head import HEAD_C, features, fit_head, solver  # noqa: E402

PRE = PreprocessConfig(input_size=(32, 32), resize=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def _task(tmp_path, classes=3, per_class=6):
    """Classes told apart by colour (red, green, blue tinted noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths, labels = [], []
    for c in range(classes):
        for i in range(per_class):
            arr = np.clip(rng.normal(90, 30, (24, 24, 3)), 0, 255)
            arr[..., c % 3] += 90 + 20 * (c // 3)
            p = tmp_path / f"{c}-{i}.png"
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p)
            paths.append(p)
            labels.append(c)
    return paths, np.array(labels)


def test_solver_follows_the_head_and_refuses_lbfgs_on_a_conv_head():
    assert solver("efficientnet_lite0", "auto") == solver("mobilenet_v2", "auto") == "lbfgs"
    assert solver("squeezenet1_1", "auto") == "sgd"
    assert solver("mobilenet_v2", "sgd") == "sgd"
    with pytest.raises(EdgeTLError, match="1x1 convolution"):
        solver("squeezenet1_1", "lbfgs")


@pytest.mark.parametrize("classes", [3, 2])
def test_the_fitted_head_is_scikit_learns_optimum(tmp_path, classes):
    """The model's logits after fit_head give scikit-learn's own probabilities on the same features (the binary
    case too, where scikit-learn keeps one logit), and the backbone is left as it was."""
    from sklearn.linear_model import LogisticRegression

    paths, labels = _task(tmp_path, classes)
    ds = TrainDataset(paths, labels, PRE, augment="light", hflip=False)
    model = build("mobilenet_v3_small", classes, seed=0).eval()
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.3.")}
    got = fit_head(model, "mobilenet_v3_small", ds, views=2, seed=0)
    assert got.images == 3 * len(paths) and got.views == 2 and got.features == 1024
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in body.items())
    x, y = with_views(ds, 2, seed=0)
    f = features(model, "mobilenet_v3_small", x)
    ref = LogisticRegression(C=HEAD_C, max_iter=3000).fit(f.astype(np.float64), y)
    with torch.no_grad():
        probs = torch.softmax(model.eval()(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(f.astype(np.float64)), atol=1e-4)
    assert got.train_top1 == pytest.approx(float((probs[:len(paths)].argmax(1) == labels).mean()))


def test_views_are_seeded_and_leave_torchs_generator_alone(tmp_path):
    paths, labels = _task(tmp_path)
    ds = TrainDataset(paths, labels, PRE, augment="light", hflip=False)
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    a, ya = with_views(ds, 2, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    b, _ = with_views(ds, 2, seed=1)
    c, _ = with_views(ds, 2, seed=2)
    assert a.shape == (3 * len(paths), 3, 32, 32) and list(ya) == list(labels) * 3
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a[:len(paths)], ds.as_arrays())  # the images themselves come first, un-augmented


def test_feature_extract_with_lbfgs_is_one_step_that_changes_only_the_head(tmp_path):
    from edge_tl.workstation.train import recalibrate_bn

    paths, labels = _task(tmp_path)
    model = build("mobilenet_v3_small", 3, seed=0)
    ds = TrainDataset(paths, labels, PRE, augment="light", hflip=False)
    recalibrate_bn(model, ds, device="cpu")  # random weights: statistics of these images give features that vary
    before = {k: v.clone() for k, v in model.state_dict().items()}
    phases = finetune_phases("feature-extract", 30, 0, 1e-2, 1e-4, True, head="lbfgs", head_views=1)
    assert [(p.solver, p.epochs, p.views) for p in phases] == [("lbfgs", 1, 1)]
    res = fit(model, "mobilenet_v3_small", ds, eval_arrays(paths, labels, PRE), phases, device="cpu")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"classifier.3.weight", "classifier.3.bias"}
    assert res.epochs_run == 1 and len(res.history) == 1 and res.history[0]["head_fit"]["views"] == 1
    assert res.best_val_top1 == 1.0  # colours: linearly separable on any features


def test_feature_distillation_trains_the_pruned_body_and_refits_the_head(tmp_path):
    """A narrower student (pruned) learns to reproduce the teacher's features through a linear map; the labels
    reach it only through the head, fitted again after every epoch; the teacher is not touched."""
    from edge_tl.workstation.prune import prune_to_macs

    paths, labels = _task(tmp_path)
    ds = TrainDataset(paths, labels, PRE, augment="light", hflip=False)
    teacher = build("mobilenet_v3_small", 3, seed=0).eval()
    fit_head(teacher, "mobilenet_v3_small", ds, views=0)
    student = prune_to_macs(teacher, torch.zeros(1, 3, 32, 32), 0.5, importance="l1").model
    assert student.classifier[0].in_features < teacher.classifier[0].in_features  # the widths differ
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    body = {k: v.clone() for k, v in student.state_dict().items()}
    res = fit(student, "mobilenet_v3_small", ds, eval_arrays(paths, labels, PRE), recovery_phases(3, 1e-3, False),
              teacher=teacher, distill_on="features", keep="last", device="cpu", batch_size=6)
    assert len(res.history) == 3
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in body.items() if "classifier.3" not in k)
    head = {k: v.clone() for k, v in student.state_dict().items() if k.startswith("classifier.3.")}
    fit_head(student, "mobilenet_v3_small", ds, views=0)  # the last epoch's refit is the optimum on these features
    for k, v in head.items():
        np.testing.assert_allclose(v.numpy(), student.state_dict()[k].numpy(), atol=1e-5)
    assert all(p.requires_grad for p in student.parameters())
    with pytest.raises(EdgeTLError, match="distillation target"):
        fit(student, "mobilenet_v3_small", ds, eval_arrays(paths, labels, PRE), recovery_phases(1, 1e-3, False),
            teacher=teacher, distill_on="outputs", device="cpu")


def test_block_distillation_teaches_every_block_and_needs_their_widths(tmp_path):
    """prune.recovery_distill = blocks: a hint at every block's output besides the features, each squared error
    over the teacher's mean square there; zero for the teacher's own copy, lower after the recovery; a student
    whose blocks lost output width is refused."""
    import copy

    from edge_tl.workstation.prune import BLOCK_TYPES, prune_to_macs, stream_layers
    from edge_tl.workstation.train import recalibrate_bn
    from edge_tl.workstation.train.fit import _FeatureDistiller

    paths, labels = _task(tmp_path)
    ds = TrainDataset(paths, labels, PRE, augment="light", hflip=False)
    teacher = build("mobilenet_v3_small", 3, seed=0)
    # BatchNorm's statistics of these pictures: an untrained net's defaults (mean 0, variance 1) shrink every
    # block's output towards 0 (1e-21 at the last), where no relative error means anything
    recalibrate_bn(teacher, ds, batch_size=6, seed=0, device="cpu")
    teacher.eval()
    x = torch.from_numpy(eval_arrays(paths, labels, PRE)[0])
    blocks = [n for n, m in teacher.named_modules() if type(m).__name__ in BLOCK_TYPES]
    twin = _FeatureDistiller(copy.deepcopy(teacher).eval(), teacher, "mobilenet_v3_small", torch.device("cpu"),
                             blocks=True)
    assert twin.names[1:] == blocks and len(blocks) == 11  # MobileNetV3-Small's inverted-residual blocks
    assert len(twin.hooks) == 2 * (1 + len(blocks))  # the student's and the teacher's
    twin.remove()

    student = prune_to_macs(teacher, torch.zeros(1, 3, 32, 32), 0.3, importance="l1",
                            ignored_layers=stream_layers(teacher)).model

    def block_loss(net):
        grab = _FeatureDistiller(net, teacher, "mobilenet_v3_small", torch.device("cpu"), blocks=True)
        with torch.no_grad():
            net.eval()(x)
            loss = float(grab.loss(grab.proj, x))
        grab.remove()
        return loss

    assert block_loss(copy.deepcopy(teacher)) == 0.0
    before = block_loss(student)
    assert before > 0
    # BatchNorm frozen (its running statistics): the loss trained is the loss measured here, in eval mode
    fit(student, "mobilenet_v3_small", ds, eval_arrays(paths, labels, PRE), recovery_phases(3, 1e-3, True),
        teacher=teacher, distill_on="blocks", keep="last", device="cpu", batch_size=6)
    assert block_loss(student) < before
    narrow = prune_to_macs(teacher, torch.zeros(1, 3, 32, 32), 0.5, importance="l1").model  # every channel
    with pytest.raises(EdgeTLError, match="block-wise distillation"):
        _FeatureDistiller(narrow, teacher, "mobilenet_v3_small", torch.device("cpu"), blocks=True)


def test_recovery_mixup_matches_the_teacher_on_the_blended_images(tmp_path):
    """prune.recovery_mixup with a features target (function matching): the teacher is asked about the very batch
    the student saw, blended; without mixup every picture it is asked about is a training picture as it is."""
    import copy

    paths, labels = _task(tmp_path)
    ds = TrainDataset(paths, labels, PRE, augment="none", hflip=False)
    originals = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)

    def asked(mixup: float) -> tuple[list, list]:
        teacher = build("mobilenet_v3_small", 3, seed=0).eval()
        student = copy.deepcopy(teacher)
        seen: dict[str, list] = {"student": [], "teacher": []}
        for who, net in (("student", student), ("teacher", teacher)):
            net.register_forward_pre_hook(lambda m, inp, who=who: seen[who].append(inp[0].detach().clone()))
        fit(student, "mobilenet_v3_small", ds, eval_arrays(paths, labels, PRE), recovery_phases(1, 1e-3, True),
            teacher=teacher, distill_on="features", mixup=mixup, keep="last", device="cpu", batch_size=6, seed=3)
        return seen["student"], seen["teacher"]

    def is_original(batch: torch.Tensor) -> torch.Tensor:  # per row: equal to one training picture
        return (torch.cdist(batch.flatten(1), originals) < 1e-4).any(1)

    student, teacher = asked(1.0)
    assert len(teacher) == 3  # 18 pictures in batches of 6, one epoch
    assert all(any(torch.equal(t, s) for s in student) for t in teacher)
    assert not all(bool(is_original(t).all()) for t in teacher)
    _, plain = asked(0.0)
    assert len(plain) == 3 and all(bool(is_original(t).all()) for t in plain)
