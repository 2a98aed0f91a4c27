"""Training augmentation from torchvision's transforms v2, configured in the spec (``train.augment``, ``train.hflip``)
with defaults per data kind (``data.kind``).

Policies (each runs on the uint8 image already resized and centre-cropped by the device's preprocessing, before
the same scale / mean / std; evaluation never augments):

- ``none``: the images as they are;
- ``light``: a small random affine (rotation <= 10 deg, shift <= 8%, scale 0.9-1.1): shapes stay legible;
- ``crop-flip-color``: ``RandomResizedCrop`` (area 50-100%, aspect 3/4-4/3) and ``ColorJitter`` (brightness,
  contrast, saturation 0.3, hue 0.02): the usual recipe for photographs;
- ``trivialaugment``: ``TrivialAugmentWide`` (Mueller & Hutter 2021): one random op of random strength per image;
- ``randaugment``: ``RandAugment`` (Cubuk et al. 2020), 2 ops at magnitude 9;
- ``auto``: by ``data.kind``: photos -> crop-flip-color; digits and text -> light.

``train.hflip`` adds ``RandomHorizontalFlip`` to any policy; unset, it follows the kind: on for photos, off for
digits and text (a mirrored digit or letter is another symbol, or none).
"""

from __future__ import annotations

from typing import Any

POLICIES = ("none", "light", "crop-flip-color", "trivialaugment", "randaugment")
AUTO = {"photos": "crop-flip-color", "digits": "light", "text": "light"}
FLIPS = {"photos": True, "digits": False, "text": False}


def resolve(augment: str, hflip: bool | None, kind: str) -> dict[str, Any]:
    """The policy and flips a build uses (what the cache keys and the manifest record)."""
    policy = AUTO[kind] if augment == "auto" else augment
    flip = FLIPS[kind] if hflip is None else bool(hflip)
    return {"policy": policy, "hflip": flip, "data_kind": kind, "asked": {"augment": augment, "hflip": hflip},
            "transforms": describe(policy, flip)}


def steps(policy: str, hflip: bool, size: tuple[int, int] | None = None) -> list:
    """The transforms v2 steps of ``policy`` (``size``: the network input, for RandomResizedCrop)."""
    from torchvision.transforms import v2

    bilinear = v2.InterpolationMode.BILINEAR
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}")
    out: list = []
    if policy == "light":
        out.append(v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1), interpolation=bilinear))
    elif policy == "crop-flip-color":
        if size is not None:
            out.append(v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=bilinear, antialias=True))
        out.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02))
    elif policy == "trivialaugment":
        out.append(v2.TrivialAugmentWide(interpolation=bilinear))
    elif policy == "randaugment":
        out.append(v2.RandAugment(num_ops=2, magnitude=9, interpolation=bilinear))
    if hflip:
        out.append(v2.RandomHorizontalFlip())
    return out


def describe(policy: str, hflip: bool) -> list[str]:
    """Readable names of the steps (e.g. for the manifest), without building them."""
    names = {"none": [], "light": ["RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1))"],
             "crop-flip-color": ["RandomResizedCrop(input_size, scale=(0.5, 1.0))",
                                 "ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02)"],
             "trivialaugment": ["TrivialAugmentWide()"], "randaugment": ["RandAugment(num_ops=2, magnitude=9)"]}
    return list(names[policy]) + (["RandomHorizontalFlip()"] if hflip else [])
