"""Scanning ImageFolder datasets (real PNG/JPEG files) and the demo's digits folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_tl.core.errors import EdgeTLError
from edge_tl.workstation import demo
from edge_tl.workstation.data import DataSplit, DataWarning, scan


def make_folder(root: Path, counts: dict[str, int], seed: int = 0, ext: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 14, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.{ext}")
    return root


def test_stratified_split_counts_and_determinism(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 20, "dog": 20, "owl": 20})
    a = scan(root, seed=3)
    assert a.classes == ["cat", "dog", "owl"]
    assert a.summary.split_mode == "stratified"
    assert a.summary.counts == {"train": {"cat": 14, "dog": 14, "owl": 14}, "val": {"cat": 3, "dog": 3, "owl": 3},
                                "test": {"cat": 3, "dog": 3, "owl": 3}}
    every = [rel for s in ("train", "val", "test") for rel, _ in a.items[s]]
    assert len(every) == len(set(every)) == 60
    b = scan(root, seed=3)
    assert a.items == b.items and a.summary.file_list_sha256 == b.summary.file_list_sha256
    c = scan(root, seed=4)
    assert c.items["test"] != a.items["test"]
    assert DataSplit.from_json(a.to_json()).items == a.items


def test_split_folders_are_used_as_given(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        make_folder(tmp_path / "ds" / split, {"a": n, "b": n}, seed=n)
    s = scan(tmp_path / "ds")
    assert s.summary.split_mode == "folders"
    assert s.summary.counts["test"] == {"a": 3, "b": 3}
    assert all(rel.startswith("test/") for rel, _ in s.items["test"])
    assert [lbl for _, lbl in s.items["val"]] == [0, 0, 1, 1]


def test_missing_val_split_is_drawn_from_train(tmp_path):
    make_folder(tmp_path / "ds" / "train", {"a": 10, "b": 10})
    make_folder(tmp_path / "ds" / "test", {"a": 2, "b": 2}, seed=1)  # other pictures than train's (seed 0)
    s = scan(tmp_path / "ds", val_fraction=0.2)
    assert s.summary.counts["val"] == {"a": 2, "b": 2} and s.summary.counts["train"] == {"a": 8, "b": 8}
    assert s.summary.counts["test"] == {"a": 2, "b": 2}


def test_unreadable_and_non_image_files_are_listed_and_skipped(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 6, "b": 6})
    (root / "a" / "notes.txt").write_text("hello")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("L", (1, 100_000)).save(root / "b" / "thin.png")  # issue 24: 3,200,000 px once resized to 32
    with pytest.warns(DataWarning, match="3 file\\(s\\) skipped"):
        s = scan(root)
    reasons = {x["file"]: x["reason"] for x in s.summary.skipped}
    assert reasons["a/notes.txt"].startswith("not an image file")
    assert reasons["b/broken.jpg"].startswith("unreadable")
    assert "aspect ratio of 100000:1" in reasons["b/thin.png"]
    assert sum(sum(c.values()) for c in s.summary.counts.values()) == 12
    with pytest.raises(EdgeTLError, match="3 file\\(s\\) .* are not usable images: a/notes.txt"):
        scan(root, strict=True)


def test_bad_layouts_fail_with_one_line(tmp_path):
    with pytest.raises(EdgeTLError, match="does not exist"):
        scan(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgeTLError, match="has no class folders"):
        scan(empty)
    root = make_folder(tmp_path / "one", {"a": 5})
    with pytest.raises(EdgeTLError, match="only one class"):
        scan(root)
    root = make_folder(tmp_path / "emptyclass", {"a": 5, "b": 5})
    (root / "c").mkdir()
    with pytest.raises(EdgeTLError, match="class 'c' has 0 usable image"):
        scan(root)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "x.png")
    with pytest.raises(EdgeTLError, match="holds files but no class folders"):
        scan(flat)


def test_imbalance_is_warned_and_recorded(tmp_path):
    root = make_folder(tmp_path / "ds", {"big": 40, "small": 6})
    with pytest.warns(DataWarning, match="class imbalance: 'big' has 28 training images, 'small' only 4"):
        s = scan(root)
    assert s.summary.model_dump()["warnings"][0].startswith("class imbalance")


def test_demo_target_task_shares_val_and_test_across_shots(tmp_path):
    five = scan(demo.target_task(tmp_path, shots=5))
    ten = scan(demo.target_task(tmp_path, shots=10))
    everything = scan(demo.target_task(tmp_path, shots=None))
    assert five.classes == ["5", "6", "7", "8", "9"]
    assert five.summary.split_mode == "folders"
    assert set(five.summary.counts["train"].values()) == {5}
    assert set(ten.summary.counts["train"].values()) == {10}
    assert min(everything.summary.counts["train"].values()) >= 70
    assert set(ten.summary.counts["test"].values()) == {demo.TEST_PER_CLASS}
    strip = lambda s, split: [rel.split("/", 1)[1] for rel, _ in s.items[split]]  # noqa: E731
    assert strip(five, "test") == strip(ten, "test") == strip(everything, "test")
    assert strip(five, "val") == strip(ten, "val")
    assert set(strip(five, "train")) <= set(strip(ten, "train")) <= set(strip(everything, "train"))
    assert not set(strip(everything, "train")) & set(strip(everything, "test"))


def test_demo_is_deterministic_byte_for_byte(tmp_path):
    a = scan(demo.target_task(tmp_path / "a", shots=10))
    b = scan(demo.target_task(tmp_path / "b", shots=10))
    assert a.summary.file_list_sha256 == b.summary.file_list_sha256
    first = Path(a.root) / a.items["train"][0][0]
    assert first.read_bytes() == (Path(b.root) / b.items["train"][0][0]).read_bytes()
    with Image.open(first) as img:
        assert img.size == (8, 8) and img.mode == "L"
    src = scan(demo.source_task(tmp_path))
    assert src.classes == ["0", "1", "2", "3", "4"]
    info = json.loads((Path(src.root) / "demo.json").read_text())
    assert info["counts"]["train"] + info["counts"]["val"] + info["counts"]["test"] == 901


def test_demo_shots_parse():
    assert demo.parse_shots("all") is None and demo.parse_shots("5") == 5 and demo.parse_shots(10) == 10
    with pytest.raises(EdgeTLError):
        demo.parse_shots("many")


def test_look_alike_and_invisible_class_names_are_refused(tmp_path):
    """Issue 24: bidi controls and zero-width characters make one name show as another."""
    from edge_tl.core.bundle import lookalike_classes, unsafe_class_name

    for name in ("cat\u200b", "\u202edog", "a\u2066b", "\ufeffcat", "x\u200d"):
        assert "invisible character" in unsafe_class_name(name), name
    for name in ("cat", "chat noir", "\u0645\u06cc\u200c\u0634\u0648\u062f", "\U0001f469\u200d\U0001f52c"):
        assert unsafe_class_name(name) is None, name  # a Persian ZWNJ and an emoji ZWJ sequence are words
    assert lookalike_classes(["Cat", "dog", "cat"]) == ("Cat", "cat")
    assert lookalike_classes(["\ufb01sh", "fish"]) == ("\ufb01sh", "fish")  # the 'fi' ligature
    assert lookalike_classes(["cat", "dog"]) is None
    root = make_folder(tmp_path / "bidi", {"cat": 5, "\u202etac": 5})
    with pytest.raises(EdgeTLError, match="can't be a class name: it holds the invisible character U\\+202E"):
        scan(root)
    root = make_folder(tmp_path / "twins", {"Cat": 5, "cat": 5, "dog": 5})
    with pytest.raises(EdgeTLError, match="class folders 'Cat' and 'cat' .* look alike"):
        scan(root)


def test_the_same_image_in_two_splits_is_warned_by_name(tmp_path):
    root = tmp_path / "ds"
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        make_folder(root / split, {"a": n, "b": n}, seed={"train": 0, "val": 1, "test": 2}[split])
    (root / "test" / "a" / "000.png").write_bytes((root / "train" / "a" / "000.png").read_bytes())
    with pytest.warns(DataWarning, match=r"1 image\(s\) are in more than one split .*train/a/000.png = test/a/000.png"):
        s = scan(root)
    assert any("more than one split" in w for w in s.summary.warnings)
