"""Scan an ImageFolder dataset (torch-free): splits, classes, skipped files, counts, a hash of the file list.

Layouts (torchvision's ImageFolder convention, one folder per class):

- ``root/train/<class>/*``, plus ``root/val/<class>/*`` and ``root/test/<class>/*`` when present; a missing
  val or test split is drawn from train with a stratified, seeded split;
- ``root/<class>/*``: the three splits are drawn with a stratified, seeded split.

Files that are not images, or that Pillow cannot decode, are listed in ``DataSummary.skipped`` (and in the
report) and left out, or fail the run with ``strict``. A missing folder, no classes, an empty class or a
class missing from train fail with one line. Strong imbalance is warned about and recorded.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_tl.core.bundle import DataSummary, lookalike_classes, unsafe_class_name
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import sha256_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")


class DataWarning(UserWarning):
    """Something about the data the user should know (imbalance, skipped files)."""


@dataclass
class DataSplit:
    """The result of a scan: everything later stages need, JSON-serializable via :meth:`to_json`."""

    root: str
    classes: list[str]
    items: dict[str, list[tuple[str, int]]]  # split -> [(path relative to root, class index)]
    summary: DataSummary
    fingerprint: str  # sha256 over paths, sizes and mtimes: the data stage's cache key
    warnings: list[str] = field(default_factory=list)

    def paths(self, split: str) -> list[Path]:
        return [Path(self.root) / rel for rel, _ in self.items[split]]

    def labels(self, split: str) -> np.ndarray:
        return np.asarray([label for _, label in self.items[split]], dtype=np.int64)

    def to_json(self) -> str:
        return json.dumps({"root": self.root, "classes": self.classes, "items": self.items,
                           "summary": self.summary.model_dump(mode="json"), "fingerprint": self.fingerprint,
                           "warnings": self.warnings}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> DataSplit:
        d = json.loads(text)
        items = {s: [(rel, int(lbl)) for rel, lbl in v] for s, v in d["items"].items()}
        return cls(d["root"], d["classes"], items, DataSummary.model_validate(d["summary"]), d["fingerprint"],
                   d.get("warnings", []))


def _check_image(path: Path) -> str | None:
    """None if Pillow can decode ``path``, else the reason it can't."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file (extension '{path.suffix or 'none'}')"
    from PIL import Image, UnidentifiedImageError

    from edge_tl.core.preprocess import image_size_problem, to_rgb

    try:
        with Image.open(path) as img:
            problem = image_size_problem(img.width, img.height)  # from the header, before decoding
            if problem:
                return f"unusable: {problem}"
            img.load()
            to_rgb(img)  # every later stage (training, golden PNGs, the device) starts from this conversion
    except EdgeTLError as exc:
        return f"unusable: {exc.problem}"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"unreadable: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}".rstrip(": ")
    return None


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _scan_class_folders(folder: Path, root: Path, skipped: list[dict[str, str]]) -> dict[str, list[str]]:
    """class name -> sorted relative paths of the decodable images under ``folder/<class>/`` (recursively)."""
    out: dict[str, list[str]] = {}
    for cdir in _class_dirs(folder):
        good = []
        for path in sorted(p for p in cdir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = path.relative_to(root).as_posix()
            reason = _check_image(path)
            if reason is None:
                good.append(rel)
            else:
                skipped.append({"file": rel, "reason": reason})
        out[cdir.name] = good
    return out


def _stratified(per_class: dict[str, list[str]], fractions: dict[str, float], seed: int) -> dict[str, dict[str, list]]:
    """Split each class's files into train/val/test (the splits named in ``fractions`` are drawn)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for cls_name, files in per_class.items():
        need = 1 + len(fractions)
        if len(files) < need:
            raise EdgeTLError(f"class '{cls_name}' has {len(files)} usable image(s), too few to split into "
                              f"train/{'/'.join(fractions)}", f"add images (at least {need}) or provide split folders")
        order = [files[i] for i in rng.permutation(len(files))]
        start = 0
        for split, frac in fractions.items():
            n = max(1, int(round(frac * len(files))))
            out[split][cls_name] = sorted(order[start:start + n])
            start += n
        out["train"][cls_name] = sorted(order[start:])
    return out


def _data_root(root: str | Path) -> Path:
    """``root`` resolved, or an EdgeTLError saying what to pass instead."""
    root = Path(root).expanduser()
    if not root.exists():
        raise EdgeTLError(f"data folder {root} does not exist", "pass --data with an ImageFolder root "
                          "(one sub-folder per class, or train/ val/ test/ of them)")
    if not root.is_dir():
        raise EdgeTLError(f"data path {root} is not a folder", "pass the folder that holds one sub-folder per class")
    return root.resolve()


def _layout(root: Path, val_fraction: float, test_fraction: float, seed: int,
            skipped: list[dict[str, str]]) -> tuple[dict[str, dict[str, list[str]]], str]:
    """(split -> class -> files, "folders" | "stratified"): train/ val/ test/ folders where they exist, the missing
    splits drawn from train (or everything drawn from one folder of classes), stratified and seeded."""
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" in split_dirs:
        found = {s: _scan_class_folders(d, root, skipped) for s, d in split_dirs.items()}
        missing = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in found}
        per_split = dict(found)
        if missing:
            drawn = _stratified(found["train"], missing, seed)
            per_split.update({s: drawn[s] for s in ("train", *missing)})
        return per_split, "folders" if not missing else "stratified"
    if _class_dirs(root) == [] and any(p.is_file() for p in root.iterdir()):
        raise EdgeTLError(f"data folder {root} holds files but no class folders",
                          "put each class's images in its own sub-folder (ImageFolder layout)")
    return _stratified(_scan_class_folders(root, root, skipped), {"val": val_fraction, "test": test_fraction},
                       seed), "stratified"


def _check_classes(root: Path, classes: list[str], per_split: dict[str, dict[str, list[str]]],
                   skipped: list[dict[str, str]], strict: bool) -> None:
    """Refuse what no later stage can use: no or one class, unsafe class names, a class missing from train,
    unusable files under ``strict``."""
    if not classes:
        raise EdgeTLError(f"data folder {root} has no class folders", "add one sub-folder of images per class")
    for name in classes:
        why = unsafe_class_name(name)
        if why:
            raise EdgeTLError(f"class folder {name!r} in {root} can't be a class name: {why}",
                              "rename the folder (letters, digits, spaces, - and _ are safe)")
    twins = lookalike_classes(classes)
    if twins:
        raise EdgeTLError(f"class folders {twins[0]!r} and {twins[1]!r} in {root} look alike (the same name after "
                          "Unicode normalisation and case folding)", "merge them, or rename one")
    if len(classes) < 2:
        raise EdgeTLError(f"data folder {root} has only one class ('{classes[0]}')", "a classifier needs >= 2 classes")
    if skipped and strict:
        listed = "; ".join(f"{s['file']} ({s['reason']})" for s in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise EdgeTLError(f"{len(skipped)} file(s) in {root} are not usable images: {listed}{more}",
                          "remove or fix them, or drop --strict to skip them")
    for split, per_class in per_split.items():
        for name, files in per_class.items():
            if name not in classes:
                raise EdgeTLError(f"class '{name}' is in {split}/ but not in train/", "use the same class folders in "
                                  "every split")
            if not files and split == "train":
                raise EdgeTLError(f"class '{name}' has no usable images in {split}", "add images or remove the folder")


def _notes(counts: dict[str, dict[str, int]], skipped: list[dict[str, str]], imbalance_ratio: float) -> list[str]:
    """The data's warnings: class imbalance in train, skipped files."""
    notes = []
    train = counts["train"]
    if max(train.values()) > imbalance_ratio * min(train.values()):
        big, small = max(train, key=train.get), min(train, key=train.get)
        notes.append(f"class imbalance: '{big}' has {train[big]} training images, '{small}' only "
                     f"{train[small]} (more than {imbalance_ratio:g}x)")
    if skipped:
        notes.append(f"{len(skipped)} file(s) skipped (not usable images); see the report")
    return notes


def _leaks(root: Path, items: dict[str, list[tuple[str, int]]], shown: int = 3) -> list[str]:
    """A warning naming the images that sit in more than one split with the same bytes (a copy in train/ and
    test/ is scored on what the model trained on). Only files whose size matches a file of another split are
    hashed, so a clean folder costs one stat per file."""
    by_size: dict[int, list[tuple[str, str]]] = {}
    for split in SPLITS:
        for rel, _ in items[split]:
            by_size.setdefault((root / rel).stat().st_size, []).append((split, rel))
    by_hash: dict[str, list[tuple[str, str]]] = {}
    for group in by_size.values():
        if len({split for split, _ in group}) > 1:
            for split, rel in group:
                by_hash.setdefault(sha256_file(root / rel), []).append((split, rel))
    pairs = [" = ".join(rel for _, rel in group) for group in by_hash.values() if len({s for s, _ in group}) > 1]
    if not pairs:
        return []
    more = f" and {len(pairs) - shown} more" if len(pairs) > shown else ""
    return [f"{len(pairs)} image(s) are in more than one split with the same bytes ({'; '.join(pairs[:shown])}"
            f"{more}): validation/test accuracy counts images the model may have trained on; remove the copies"]


def _fingerprints(root: Path, items: dict[str, list[tuple[str, int]]], classes: list[str],
                  skipped: list[dict[str, str]]) -> tuple[str, str]:
    """(sha256 of the file list: what the data is, sha256 with sizes and mtimes: whether a stage must re-run)."""
    listing, fp = hashlib.sha256(), hashlib.sha256()
    for split in SPLITS:
        for rel, label in items[split]:
            st = (root / rel).stat()
            line = f"{split}\t{classes[label]}\t{rel}\t{st.st_size}\n"
            listing.update(line.encode())
            fp.update(f"{line}{st.st_mtime_ns}\n".encode())
    fp.update(json.dumps(skipped).encode())
    return listing.hexdigest(), fp.hexdigest()


def scan(root: str | Path, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
         strict: bool = False, imbalance_ratio: float = 3.0, source: str | None = None) -> DataSplit:
    """Scan ``root`` (see the module docstring). Raises EdgeTLError for layouts that can't be used."""
    root = _data_root(root)
    skipped: list[dict[str, str]] = []
    per_split, mode = _layout(root, val_fraction, test_fraction, seed, skipped)
    classes = sorted(per_split["train"])
    _check_classes(root, classes, per_split, skipped, strict)
    items = {s: [(rel, classes.index(c)) for c in classes for rel in per_split.get(s, {}).get(c, [])] for s in SPLITS}
    for split in ("val", "test"):
        if not items[split]:
            raise EdgeTLError(f"the {split} split of {root} is empty", f"add images to {split}/ or remove that folder")
    counts = {s: {c: len(per_split.get(s, {}).get(c, [])) for c in classes} for s in SPLITS}
    notes = _notes(counts, skipped, imbalance_ratio) + _leaks(root, items)
    for note in notes:
        warnings.warn(note, DataWarning, stacklevel=2)
    file_list_sha256, fingerprint = _fingerprints(root, items, classes, skipped)
    summary = DataSummary(source=source or str(root), split_mode=mode, counts=counts,
                          file_list_sha256=file_list_sha256, skipped=skipped, warnings=notes, split_seed=seed)
    return DataSplit(str(root), classes, items, summary, fingerprint, notes)
