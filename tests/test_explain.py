"""Grad-CAM explanations (issue 14, item 6): real Captum Grad-CAM on tiny torch models, the automatic layer choice
on the real torchvision backbones, the per-class agreement and the report's figure."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the workstation extra (torch) is not installed")
pytest.importorskip("captum", reason="the workstation extra (captum) is not installed")

from torch import nn  # noqa: E402

from edge_tl.workstation.explain import (  # noqa: E402
    explain,
    grad_cam,
    map_agreement,
    pick_examples,
    target_layer,
)


class Tiny(nn.Module):
    """features (two conv blocks) -> global average pool -> linear: the layout of torchvision's classifiers."""

    def __init__(self, width: int = 4, classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU()),
                                      nn.Sequential(nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU()))
        self.classifier = nn.Linear(width, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def bright_patch_model(width: int = 4) -> Tiny:
    """Class 0's score rises with the brightness of any pixel, class 1's falls: Grad-CAM of class 0 must light up
    where the image is bright."""
    m = Tiny(width)
    with torch.no_grad():
        for block in m.features:
            conv = block[0]
            conv.weight.zero_()
            conv.bias.zero_()
            centre = conv.kernel_size[0] // 2
            for o in range(conv.out_channels):
                for i in range(conv.in_channels):
                    conv.weight[o, i, centre, centre] = 1.0 / conv.in_channels
        m.classifier.weight.copy_(torch.tensor([[1.0] * width, [-1.0] * width]))
        m.classifier.bias.zero_()
    return m.eval()


def patch_images(n: int, size: int = 16) -> np.ndarray:
    x = np.zeros((n, 3, size, size), dtype=np.float32)
    for i in range(n):  # a bright 4x4 patch, a different corner per image
        r, c = (0, 0) if i % 2 == 0 else (size - 4, size - 4)
        x[i, :, r:r + 4, c:c + 4] = 1.0
    return x


def test_grad_cam_shape_range_and_where_it_looks():
    m = bright_patch_model()
    x = patch_images(4)
    layer = target_layer(m, (16, 16), min_cells=4)
    assert layer == "features.1"  # the last conv block with a map of >= 4x4 (8x8 here)
    cams = grad_cam(m, layer, x, np.zeros(4, dtype=int))
    assert cams.shape == (4, 16, 16) and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() == pytest.approx(1.0)
    for i, cam in enumerate(cams):  # the map's peak is in the bright patch's corner
        r, c = np.unravel_index(np.argmax(cam), cam.shape)
        if i % 2 == 0:
            assert r < 6 and c < 6
        else:
            assert r >= 10 and c >= 10
    # class 1's score falls with brightness: its positive Grad-CAM is empty (all zeros, not NaN)
    neg = grad_cam(m, layer, x, np.ones(4, dtype=int))
    assert np.isfinite(neg).all() and neg.max() == 0.0
    assert target_layer(m, (16, 16), min_cells=9) == "features.0"  # none is big enough: the first block


@pytest.mark.parametrize("backbone, size, want", [
    ("mobilenet_v2", 224, "features.18"),  # 7x7: the last conv block itself
    ("mobilenet_v2", 32, "features.6"),  # the demo's 32x32: features.7.. are 2x2 and 1x1
    ("mobilenet_v3_small", 32, "features.3"),
    ("squeezenet1_1", 32, "features.4"),
])
def test_target_layer_is_the_last_conv_block_with_a_map(backbone, size, want):
    from edge_tl.workstation.train import build

    assert target_layer(build(backbone, 5, seed=0), (size, size)) == want


def test_map_agreement_and_picks():
    a = np.random.default_rng(0).random((3, 8, 8))
    corr, iou = map_agreement(a, a)
    np.testing.assert_allclose(corr, 1.0) and np.testing.assert_allclose(iou, 1.0)
    corr, iou = map_agreement(a, 1 - a)
    np.testing.assert_allclose(corr, -1.0)
    assert (iou == 0).all()  # top 20% of a is the bottom 20% of 1 - a
    corr, _ = map_agreement(np.zeros((1, 8, 8)), a[:1])
    assert np.isnan(corr).all()  # a constant map has no correlation
    y = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 1, 0, 1, 1, 0])
    assert pick_examples(y, pred, per_class=1, max_images=12) == [0, 1, 3, 5]
    assert pick_examples(y, pred, per_class=1, max_images=3) == [0, 1, 3]
    # a class with no wrong answer (or no right one) gives what it has
    assert pick_examples(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0]), per_class=2) == [0, 1, 2, 3]
    assert pick_examples(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]), per_class=1) == [0, 2, 3]


def test_explain_writes_the_figure_and_per_class_numbers(tmp_path):
    ft = bright_patch_model()
    pruned = bright_patch_model(width=2)  # thinner, same blocks: what Torch-Pruning leaves
    x = patch_images(6)
    y = np.array([0, 0, 0, 1, 1, 1])
    shipped = np.array([0, 1, 0, 1, 0, 1])
    e = explain(ft, pruned, x, y, shipped, ["bright", "dark"], tmp_path / "gradcam.png", mean=(0.5,) * 3,
                std=(0.5,) * 3, max_images=4)
    assert e.layer == "features.1" and e.figure == "gradcam.png"
    assert (tmp_path / "gradcam.png").stat().st_size > 1000
    assert e.examples == [0, 1, 3, 4]
    bright, dark = e.per_class
    assert bright["images"] == 3 and bright["correlation"] == pytest.approx(1.0) and bright["iou_top20"] == 1.0
    assert dark["correlation"] is None and dark["constant_maps"] == 3  # class 1's maps are all zero
