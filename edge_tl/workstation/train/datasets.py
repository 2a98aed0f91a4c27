"""Training and evaluation data for the training loop.

Evaluation uses :class:`edge_tl.core.preprocess.Preprocessor`, the very code the device runs, so the accuracy
measured here is the accuracy of the shipped preprocessing. Training adds light augmentation on top of the
same resize: a small random affine (and optional flips), then the same scale / mean / std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edge_tl.core.preprocess import PreprocessConfig, Preprocessor, to_rgb


def eval_arrays(paths: list[Path], labels: np.ndarray, pre: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(N x C x H x W float32 through the device's Preprocessor, N int64 labels)."""
    return Preprocessor(pre).batch([_open(p) for p in paths]), np.asarray(labels, dtype=np.int64)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(img)
        return rgb.copy() if rgb is img else rgb


class TrainDataset(torch.utils.data.Dataset):
    """Decoded, resized images kept in memory; each ``__getitem__`` draws a new augmentation."""

    def __init__(self, paths: list[Path], labels: np.ndarray, pre: PreprocessConfig, augment: str = "light",
                 hflip: bool = True):
        """``augment``: a policy of :mod:`edge_tl.workstation.train.augment` (not 'auto': resolve it first)."""
        from torchvision.transforms import v2

        from edge_tl.workstation.train.augment import steps as augment_steps

        self.pre = Preprocessor(pre)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.images = [torch.from_numpy(np.asarray(self.pre.resize_crop(_open(p))).copy()).permute(2, 0, 1)
                       for p in paths]
        steps = augment_steps(augment, hflip, tuple(pre.input_size))
        self.augment = v2.Compose(steps) if steps else None
        cfg = pre
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
        self.scale = float(cfg.scale)
        self.bgr = cfg.channel_order == "BGR"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]
        if self.augment is not None:
            img = self.augment(img)
        x = (img.float() * self.scale - self.mean) / self.std
        if self.bgr:
            x = x.flip(0)
        return x, self.labels[i]

    def as_arrays(self) -> np.ndarray:
        """The un-augmented images, preprocessed exactly like the device does (for calibration)."""
        return np.stack([self.pre.normalize(img.permute(1, 2, 0).numpy()) for img in self.images])


def decision_views(paths: list[Path], labels: np.ndarray, pre: PreprocessConfig, views: int, *, hflip: bool,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The images of ``paths`` as the device preprocesses them, followed by ``views`` copies of each drawn with the
    ``light`` augmentation (a small random affine; flips when ``hflip``): the set on which the build chooses
    between candidates (pruning importance, PTQ / QAT / mixed precision).

    Two candidates that differ on 2 of 100 validation images are otherwise decided by those 2 images; on a few
    slightly moved copies of each, every image scores a share of its copies right instead of 0 or 1. The draw
    is seeded (torch's global generator is left as it was)."""
    if views <= 0 or not len(paths):
        return eval_arrays(paths, labels, pre)
    return with_views(TrainDataset(paths, labels, pre, augment="light", hflip=hflip), views, seed)


def with_views(dataset: TrainDataset, views: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels): ``dataset``'s images as the device preprocesses them (:meth:`TrainDataset.as_arrays`, the
    same arrays as :func:`eval_arrays`), then ``views`` copies of each drawn with its own augmentation, all the
    images once per view. The draw is seeded; torch's global generator is left as it was. The decision set
    (:func:`decision_views`) and the head fitted on frozen features (:mod:`edge_tl.workstation.train.head`)."""
    x = dataset.as_arrays().astype(np.float32)
    y = np.asarray(dataset.labels, dtype=np.int64)
    if views <= 0:
        return x, y
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        extra = np.stack([dataset[i][0].numpy() for _ in range(views) for i in range(len(dataset))])
    return np.concatenate([x, extra.astype(np.float32)]), np.tile(y, views + 1)
