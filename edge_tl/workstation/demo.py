"""The bundled demo: scikit-learn's handwritten digits as two ImageFolder tasks, offline and deterministic.

``load_digits()`` ships 1,797 real 8x8 scans (16 grey levels) inside scikit-learn. They are written as PNGs
(white digit on black, 8x8, 8-bit) in the ImageFolder layout:

- the **source** task, digits 0-4, split 70/15/15 into ``train/ val/ test/`` (``models/pretrain_demo.py``
  pretrains the demo backbone on it);
- the few-shot **target** task, digits 5-9: per class a fixed test set (``TEST_PER_CLASS``) and val set
  (``VAL_PER_CLASS``) are drawn first, then ``shots`` training images (``None`` = all the rest) from what is
  left, so 5, 10 and all shots share the same val/test images and can be compared.

Same seed, same files, byte for byte (PNG encoding is deterministic), so the data stage's hash is stable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_dir

SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
TEST_PER_CLASS = 80
VAL_PER_CLASS = 20
DEFAULT_SHOTS = 10
DEMO_SEED = 0
_VERSION = 1  # bump when the layout or the split rule changes (part of the folder name)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from edge_tl.core.importer import require

    datasets = require("sklearn.datasets", "the bundled demo (scikit-learn's handwritten digits)")
    d = datasets.load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(int)


def _write_pngs(root: Path, split_items: dict[str, list[tuple[int, int]]], images: np.ndarray) -> None:
    from PIL import Image

    for split, items in split_items.items():
        for idx, digit in items:
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[idx], mode="L").save(folder / f"{idx:04d}.png", optimize=False)


def _split_source(targets: np.ndarray, seed: int) -> dict[str, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[int, int]]] = {"train": [], "val": [], "test": []}
    for digit in SOURCE_DIGITS:
        idx = rng.permutation(np.flatnonzero(targets == digit))
        n_val = n_test = int(round(0.15 * len(idx)))
        out["test"] += [(int(i), digit) for i in idx[:n_test]]
        out["val"] += [(int(i), digit) for i in idx[n_test:n_test + n_val]]
        out["train"] += [(int(i), digit) for i in idx[n_test + n_val:]]
    return out


def _split_target(targets: np.ndarray, shots: int | None, seed: int) -> dict[str, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed + 1)
    out: dict[str, list[tuple[int, int]]] = {"train": [], "val": [], "test": []}
    for digit in TARGET_DIGITS:
        idx = rng.permutation(np.flatnonzero(targets == digit))
        test, val, pool = idx[:TEST_PER_CLASS], idx[TEST_PER_CLASS:TEST_PER_CLASS + VAL_PER_CLASS], \
            idx[TEST_PER_CLASS + VAL_PER_CLASS:]
        train = pool if shots is None else pool[:shots]
        out["test"] += [(int(i), digit) for i in test]
        out["val"] += [(int(i), digit) for i in val]
        out["train"] += [(int(i), digit) for i in train]
    return out


def _materialize(dest: Path, split_items: dict[str, list[tuple[int, int]]], images: np.ndarray,
                 about: dict) -> Path:
    if (dest / "demo.json").is_file():
        return dest
    with atomic_dir(dest, overwrite=True) as tmp:
        _write_pngs(tmp, split_items, images)
        counts = {s: len(v) for s, v in split_items.items()}
        (tmp / "demo.json").write_text(json.dumps({**about, "counts": counts}, indent=2) + "\n")
    return dest


def new_camera(img: Any) -> Any:
    """The simulated drift of a new camera: a warm colour cast, blur, a 12 degree rotation (PIL image in, out)."""
    from PIL import Image, ImageFilter

    r, g, b = img.convert("RGB").split()
    img = Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.25))), g, b.point(lambda v: int(v * 0.75))))
    img = img.filter(ImageFilter.GaussianBlur(radius=max(0.5, 0.015 * min(img.size))))
    return img.rotate(12, resample=Image.BILINEAR)


def field_task(root: str | Path, per_class: int, *, skip: int = DEFAULT_SHOTS, seed: int = DEMO_SEED,
               size: int = 32) -> Path:
    """Write (once) and return ``root/digits-5-9-field-...``: what a device with a new camera would see and a person
    label, as class folders: for each target digit, ``per_class`` pictures the demo's build never used (after its
    val/test images and its first ``skip`` training images), upscaled to ``size`` px and drifted
    (:func:`new_camera`)."""
    from PIL import Image

    images, targets = _digits()
    everything = _split_target(targets, None, seed)["train"]  # val/test excluded; the shots are the pool's start
    picked: list[tuple[int, int]] = []
    for digit in TARGET_DIGITS:
        pool = [i for i, d in everything if d == digit][skip:]
        if len(pool) < per_class:
            raise EdgeTLError(f"the demo has {len(pool)} unused pictures of {digit}, fewer than {per_class}",
                              f"ask for {len(pool)} or fewer per class")
        picked += [(i, digit) for i in pool[:per_class]]
    dest = Path(root) / f"digits-5-9-field{per_class}-skip{skip}-s{seed}-{size}px-v{_VERSION}"
    if (dest / "demo.json").is_file():
        return dest
    with atomic_dir(dest, overwrite=True) as tmp:
        for idx, digit in picked:
            (tmp / str(digit)).mkdir(exist_ok=True)
            pic = Image.fromarray(images[idx], mode="L").resize((size, size), Image.BILINEAR)
            new_camera(pic).save(tmp / str(digit) / f"{idx:04d}.png")
        (tmp / "demo.json").write_text(json.dumps({"task": "field", "per_class": per_class, "skip": skip,
                                                   "seed": seed, "size": size, "drift": "new_camera"}) + "\n")
    return dest


def source_task(root: str | Path, seed: int = DEMO_SEED) -> Path:
    """Write (once) and return ``root/digits-0-4-s<seed>-v1``: the source task as train/val/test folders."""
    images, targets = _digits()
    dest = Path(root) / f"digits-0-4-s{seed}-v{_VERSION}"
    about = {"task": "source", "digits": list(SOURCE_DIGITS), "seed": seed,
             "origin": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)"}
    return _materialize(dest, _split_source(targets, seed), images, about)


def target_task(root: str | Path, shots: int | None = DEFAULT_SHOTS, seed: int = DEMO_SEED) -> Path:
    """Write (once) and return the few-shot target task (digits 5-9) with ``shots`` training images per class
    (``None``: all the images not in val/test, about 80 per class)."""
    if shots is not None and shots < 1:
        raise EdgeTLError(f"demo shots must be >= 1, got {shots}", "use 5, 10, or 'all'")
    images, targets = _digits()
    tag = "all" if shots is None else str(shots)
    dest = Path(root) / f"digits-5-9-{tag}shot-s{seed}-v{_VERSION}"
    about = {"task": "target", "digits": list(TARGET_DIGITS), "shots": tag, "seed": seed,
             "test_per_class": TEST_PER_CLASS, "val_per_class": VAL_PER_CLASS,
             "origin": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)"}
    return _materialize(dest, _split_target(targets, shots, seed), images, about)


def parse_shots(text: str | int | None) -> int | None:
    """'5' -> 5, 'all' -> None."""
    if text is None or (isinstance(text, str) and text.lower() == "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise EdgeTLError(f"demo shots '{text}' is not a number", "use a whole number such as 10, or 'all'") from None


def repo_models_dir() -> Path:
    """``models/`` of the source checkout (where the demo checkpoint and recipes live)."""
    return Path(__file__).resolve().parents[2] / "models"


DEMO_CHECKPOINT = "demo_source.pt"


def demo_checkpoint() -> Path:
    path = repo_models_dir() / DEMO_CHECKPOINT
    if not path.is_file():
        raise EdgeTLError(f"the demo's pretrained checkpoint {path} is missing",
                          "regenerate it with: python models/pretrain_demo.py (or pass --weights none)")
    return path
