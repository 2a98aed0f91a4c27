"""Structured pruning with Torch-Pruning on the four torchvision backbones (random weights, 32x32 inputs)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="pruning is part of the workstation stack (torch)")
torchvision = pytest.importorskip("torchvision", reason="pruning is part of the workstation stack")
pytest.importorskip("torch_pruning", reason="pruning needs torch-pruning")

from torch import nn  # noqa: E402

from edge_tl.core.errors import EdgeTLError  # noqa: E402
from edge_tl.workstation.modelstats import count_macs_params  # noqa: E402
from edge_tl.workstation.prune import channel_report, find_classifier, prune_to_macs  # noqa: E402

BACKBONES = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "squeezenet1_1"]
SIZE = (32, 32)
NUM_CLASSES = 5


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=NUM_CLASSES)


def conv_linear_macs(model: nn.Module) -> int:
    """Multiply-accumulates of one image through ``model``'s convolutions and matmuls (torch.utils.flop_counter
    counts 2 FLOPs per MAC), independent of Torch-Pruning's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, *SIZE))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


@pytest.mark.parametrize("name", BACKBONES)
def test_prune_half_the_macs(name):
    model = make(name)
    macs0, params0 = count_macs_params(model, SIZE)
    result = prune_to_macs(model, torch.zeros(1, 3, *SIZE), target_macs_ratio=0.5, round_to=8)
    pruned = result.model

    macs1, params1 = count_macs_params(pruned, SIZE)
    assert (result.macs_before, result.macs_after, result.params_after) == (macs0, macs1, params1)
    assert macs1 <= 0.5 * macs0
    # the target is met as counted by a second, independent method: PyTorch's own FLOP counter over the aten
    # convolution / matmul ops (it sees only conv and linear layers; Torch-Pruning's counter adds the
    # normalisation layers and activations, a few percent more)
    conv0, conv1 = conv_linear_macs(model), conv_linear_macs(pruned)
    assert conv1 <= 0.5 * conv0
    assert conv0 <= macs0 <= 1.15 * conv0 and conv1 <= macs1 <= 1.15 * conv1
    assert macs1 >= 0.3 * macs0  # the search stops near the target, not at the maximum ratio
    assert result.macs_removed >= 0.5 and params1 < params0
    assert 0.0 < result.pruning_ratio < 0.9 and result.trials

    # classifier kept, channel counts TensorRT-friendly, depthwise convs still depthwise
    classifier = dict(pruned.named_modules())[find_classifier(pruned)]
    assert out_features(classifier) == NUM_CLASSES
    convs = channel_report(pruned)
    for conv_name, c_in, c_out, groups in convs:
        if conv_name == find_classifier(pruned):
            continue
        assert c_out % 8 == 0, (conv_name, c_out)
        if groups > 1:
            assert groups == c_in == c_out, (conv_name, c_in, c_out, groups)
    assert sum(1 for *_, g in convs if g > 1) == (0 if name == "squeezenet1_1" else
                                                   sum(1 for *_, g in channel_report(model) if g > 1))

    # it still runs at another batch size; the original is untouched and keeps its training flag
    pruned.eval()
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, *SIZE)).shape == (2, NUM_CLASSES)
    assert count_macs_params(model, SIZE) == (macs0, params0)
    assert pruned.training is False and model.training is True and result.model is pruned


def test_ignored_layers_keep_their_channels_and_training_flag():
    model = make("mobilenet_v3_small").eval()
    stem = dict(model.named_modules())["features.0.0"]
    result = prune_to_macs(model, torch.zeros(1, 3, *SIZE), 0.4, ignored_layers=["features.0.0"])
    assert dict(result.model.named_modules())["features.0.0"].out_channels == stem.out_channels == 16
    assert result.model.training is False
    # the same by module object
    result2 = prune_to_macs(model, torch.zeros(1, 3, *SIZE), 0.4, ignored_layers=[stem])
    assert dict(result2.model.named_modules())["features.0.0"].out_channels == 16
    assert result2.macs_after == result.macs_after


def test_taylor_importance_uses_a_labelled_batch():
    model = make("squeezenet1_1")
    x, y = torch.randn(4, 3, *SIZE), torch.tensor([0, 1, 2, 3])
    result = prune_to_macs(model, x[:1], 0.5, importance="taylor", taylor_batch=(x, y))
    assert result.macs_removed >= 0.5 and result.importance == "taylor"
    assert all(p.grad is None for p in result.model.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, words", [
    ({"target_macs_ratio": 0.0}, "fraction of MACs"),
    ({"target_macs_ratio": 1.5}, "fraction of MACs"),
    ({"importance": "magic"}, "unknown pruning importance"),
    ({"importance": "taylor"}, "labelled images"),
    ({"importance": "contribution"}, "batch of images"),
    ({"ignored_layers": ["no.such.layer"]}, "not a module"),
    ({"round_to": 0}, "round_to"),
    ({"target_macs_ratio": 0.95, "max_channel_ratio": 0.2}, "cannot remove 95%"),
])
def test_bad_requests_are_user_errors(kwargs, words):
    model = make("squeezenet1_1")
    with pytest.raises(EdgeTLError, match=words):
        prune_to_macs(model, torch.zeros(1, 3, *SIZE), **kwargs)


def test_find_classifier():
    assert find_classifier(make("squeezenet1_1")) == "classifier.1"  # a 1x1 Conv
    assert find_classifier(make("mobilenet_v2")) == "classifier.1"
    assert find_classifier(make("mobilenet_v3_large")) == "classifier.3"
    with pytest.raises(EdgeTLError, match="no Linear or Conv2d"):
        find_classifier(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_hidden_channels_only_keeps_the_residual_stream_and_the_features(name):
    """prune.channels = "hidden": every block's output (the residual stream), the stem and what the classifier
    sees keep their widths; the MACs target is still met, from the blocks' expanded channels alone."""
    from edge_tl.workstation.prune import stream_layers

    model = make(name).eval()
    keep = stream_layers(model)
    before = {n: out_features(m) for n, m in model.named_modules() if n in keep}
    result = prune_to_macs(model, torch.zeros(1, 3, *SIZE), 0.4, ignored_layers=keep)
    after = dict(result.model.named_modules())
    assert {n: out_features(after[n]) for n in keep} == before
    assert result.macs_removed >= 0.4
    width = {n: c_out for n, _, c_out, _ in channel_report(model)}
    narrower = {n for n, _, c_out, _ in channel_report(result.model) if c_out < width[n]}
    assert narrower and not narrower & set(keep)  # the expanded channels went, no kept layer's output did
    assert keep[0] == "features.0.0" and len(keep) > 10
    with pytest.raises(EdgeTLError, match="no inverted-residual blocks"):
        stream_layers(make("squeezenet1_1"))


def test_contribution_importance_prunes_the_channels_the_data_never_excites():
    """Channels whose activations are zero on the images are the ones removed, although their weights are the
    largest (L1 keeps them); the activations recorded for the ranking are not left on the models."""
    from edge_tl.workstation.prune import ACTIVATION_ATTR, _prune_copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].bias[:8] = -1e3  # channels 0-7 are dead on any image (ReLU of a very negative number)
        model[0].weight[:8] *= 10  # ... and have the largest weights
    x, y = torch.rand(8, 3, *SIZE), torch.tensor([0, 1, 2, 3] * 2)
    args = (x[:1], 0.5, ["6"], 1)
    by_data = _prune_copy(model, *args, "contribution", False, (x, y))
    by_weight = _prune_copy(model, *args, "l1", False, None)
    assert by_data[0].out_channels == by_weight[0].out_channels == 8
    assert bool((by_data[0].bias > -1).all())  # every dead channel went
    assert bool((by_weight[0].bias < -1).all())  # magnitude kept exactly the dead ones
    assert not any(hasattr(m, ACTIVATION_ATTR) for net in (model, by_data) for m in net.modules())
    result = prune_to_macs(model, x[:1], 0.3, importance="contribution", taylor_batch=(x, y), round_to=1)
    assert result.macs_removed >= 0.3 and not any(hasattr(m, ACTIVATION_ATTR) for m in model.modules())
