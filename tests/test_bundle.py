"""The bundle format, safe extraction and preprocessing: the contract every device-side stage reads."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from edge_tl.core.bundle import FP32_MODEL, INT8_MODEL, MANIFEST, Bundle
from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.fsutil import atomic_dir, safe_extract, sha256_file
from edge_tl.core.preprocess import PreprocessConfig, Preprocessor


def test_bundle_opens_and_verifies(tiny_bundle_src):
    b = Bundle.open(tiny_bundle_src)
    b.verify()
    m = b.manifest
    assert m.schema_version == 4  # 3: uint8 golden crops, INT8 reference, tolerances; 4: the id covers the manifest
    assert m.bundle_id == b.digest[:16]
    assert len(m.bundle_id) == 16
    assert b.labels == m.classes == ["circle", "square", "triangle", "cross"]
    assert b.golden_inputs().shape == (6, 3, 16, 16)
    assert b.golden_outputs().shape == (6, 4) and b.golden_reference("int8").shape == (6, 4)
    assert b.golden_crops().shape == (6, 16, 16, 3) and b.golden_crops().dtype == np.uint8
    assert set(m.golden.margin_tolerance) == {"fp32", "fp16", "int8", "best"} and b.margin_tolerance("best") > 0
    for rel, art in m.artifacts.items():
        assert sha256_file(b.root / rel) == art.sha256
        assert (b.root / rel).stat().st_size == art.bytes
    assert {FP32_MODEL, INT8_MODEL, "labels.txt", "preprocess.json"} <= set(m.artifacts)
    assert MANIFEST not in m.artifacts


def test_tarball_round_trip(tiny_bundle_src, tmp_path):
    b = Bundle.open(tiny_bundle_src.with_name("tiny.tar.gz"), extract_to=tmp_path)
    b.verify()
    assert b.root == tmp_path / "tiny"
    assert b.manifest.bundle_id == Bundle.open(tiny_bundle_src).manifest.bundle_id


def test_tampered_artifact_fails_verification(tiny_bundle):
    with open(tiny_bundle / INT8_MODEL, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckFailed, match="model.int8.onnx does not match its sha256"):
        Bundle.open(tiny_bundle).verify()


def test_extra_and_missing_files_fail_verification(tiny_bundle):
    (tiny_bundle / "labels.txt").unlink()
    (tiny_bundle / "surprise.bin").write_bytes(b"x")
    with pytest.raises(CheckFailed) as err:
        Bundle.open(tiny_bundle).verify()
    assert "labels.txt is missing" in str(err.value)
    assert "surprise.bin is not in the manifest" in str(err.value)


def test_bad_manifest_is_one_line(tiny_bundle):
    data = json.loads((tiny_bundle / MANIFEST).read_text())
    del data["classes"]
    (tiny_bundle / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(EdgeTLError, match="'classes' Field required") as err:
        Bundle.open(tiny_bundle)
    assert "\n" not in str(err.value)
    data["schema_version"] = 99
    (tiny_bundle / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(EdgeTLError, match="schema_version 99"):
        Bundle.open(tiny_bundle)


def test_missing_bundle(tmp_path):
    with pytest.raises(EdgeTLError, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    with pytest.raises(EdgeTLError, match="no manifest.json"):
        Bundle.open(tmp_path)


def _tar_with(tmp_path, name, member: tarfile.TarInfo, data: bytes = b"") -> str:
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("b/manifest.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (tarfile.TarInfo("b/../../evil"), "escapes the bundle"),
        (tarfile.TarInfo("/etc/evil"), "absolute path"),
        (tarfile.TarInfo("b/link"), "is a link"),
        (tarfile.TarInfo("b/dev"), "device or special file"),
    ],
)
def test_safe_extract_refuses(tmp_path, member, message):
    if member.name.endswith("link"):
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    if member.name.endswith("dev"):
        member.type, member.devmajor, member.devminor = tarfile.CHRTYPE, 1, 3
    archive = _tar_with(tmp_path, "bad.tar.gz", member, b"" if member.type != tarfile.REGTYPE else b"pwn")
    dest = tmp_path / "out"
    with pytest.raises(EdgeTLError, match=message):
        safe_extract(archive, dest)
    assert not (tmp_path / "evil").exists()
    assert not dest.exists() or not any(dest.rglob("*"))


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (final / "done.txt").read_text() == "ok"
    with pytest.raises(EdgeTLError, match="already exists"), atomic_dir(final):
        pass


def test_preprocess_matches_torchvision_eval_transform():
    transforms = pytest.importorskip("torchvision.transforms", reason="torchvision is a workstation extra")
    cfg = PreprocessConfig(input_size=(40, 36), resize=44, interpolation="bilinear")
    rng = np.random.default_rng(3)
    for shape in [(50, 70, 3), (90, 45, 3), (44, 44, 3)]:
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
        ref = transforms.Compose([transforms.Resize(44), transforms.CenterCrop((40, 36)), transforms.ToTensor(),
                                  transforms.Normalize(cfg.mean, cfg.std)])(img).numpy()
        ours = Preprocessor(cfg)(img)
        assert ours.shape == (3, 40, 36)
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_preprocess_grayscale_bgr_and_round_trip(tmp_path):
    cfg = PreprocessConfig(input_size=(8, 8), resize=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    pre = Preprocessor(cfg)
    gray = Image.fromarray(np.full((8, 8), 255, dtype=np.uint8), mode="L")
    np.testing.assert_allclose(pre(gray), np.ones((3, 8, 8)), atol=1e-6)
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    x_rgb = pre(rgb)
    x_bgr_frame = pre.from_bgr(rgb[:, :, ::-1])  # the same red image as OpenCV would hand it over
    np.testing.assert_array_equal(x_rgb, x_bgr_frame)
    assert x_rgb[0].min() == 1.0 and x_rgb[1].max() == 0.0
    cfg.save(tmp_path / "p.json")
    assert PreprocessConfig.load(tmp_path / "p.json") == cfg
    (tmp_path / "bad.json").write_text('{"input_size": [8, 8], "resize": 8, "colour": "x"}')
    with pytest.raises(EdgeTLError, match="not a valid preprocess.json"):
        PreprocessConfig.load(tmp_path / "bad.json")


def test_preprocess_rejects_resize_smaller_than_crop():
    pre = Preprocessor(PreprocessConfig(input_size=(32, 32), resize=16))
    with pytest.raises(EdgeTLError, match="smaller than the crop"):
        pre(Image.new("RGB", (64, 64)))


def test_an_edited_class_list_is_refused_on_open(tiny_bundle):
    """Issue 24: reversing the manifest's classes (labels.txt untouched, every hash still matching) made infer call
    a red image "blue". labels.txt is hashed: the manifest's classes must equal it."""
    import json as _json

    from edge_tl.core.errors import CheckFailed
    from edge_tl.core.signing import manifest_digest

    data = _json.loads((tiny_bundle / MANIFEST).read_text())
    data["classes"] = data["classes"][::-1]
    (tiny_bundle / MANIFEST).write_text(_json.dumps(data))
    with pytest.raises(CheckFailed, match="does not match the manifest .the manifest was edited"):
        Bundle.open(tiny_bundle)  # schema 4: the bundle id covers the whole manifest
    data["bundle_id"] = manifest_digest(data)[:16]  # and a forger who recomputes the id still meets labels.txt
    (tiny_bundle / MANIFEST).write_text(_json.dumps(data))
    with pytest.raises(CheckFailed, match="classes do not match labels.txt"):
        Bundle.open(tiny_bundle)


def test_an_archive_that_would_unpack_too_large_writes_nothing(tmp_path, monkeypatch):
    """Issue 24: a sparse 2 GiB member wrote 2.15 GB before it was refused. The members' sizes are summed (a
    sparse member at its full size) and checked before anything is written."""
    import shutil
    import subprocess

    from edge_tl.core.fsutil import safe_extract

    if not shutil.which("tar"):
        pytest.skip("GNU tar makes the sparse member")
    src = tmp_path / "src" / "bundle"
    src.mkdir(parents=True)
    (src / "manifest.json").write_text("{}")
    with open(src / "model.onnx", "wb") as f:
        f.truncate(3 << 30)  # 3 GiB of holes: a few KB in the archive
    archive = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "--sparse", "-czf", str(archive), "-C", str(src.parent), "bundle"], check=True)
    assert archive.stat().st_size < 1 << 20
    dest = tmp_path / "out"
    with pytest.raises(EdgeTLError, match=r"would unpack to 3072 MiB, more than the 2048 MiB") as exc:
        safe_extract(archive, dest)
    assert "EDGE_TL_MAX_UNPACKED_BYTES" in exc.value.fix and not dest.exists()
    with pytest.raises(EdgeTLError, match="would unpack to 3072 MiB"):  # every command opens it the same way
        Bundle.open(archive)
    monkeypatch.setenv("EDGE_TL_MAX_UNPACKED_BYTES", "100")  # the limit is the user's to raise (or lower)
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("x" * 1000)
    tiny = tmp_path / "small.tar.gz"
    subprocess.run(["tar", "-czf", str(tiny), "-C", str(tmp_path), "small"], check=True)
    with pytest.raises(EdgeTLError, match="would unpack to 0 MiB, more than the 0 MiB"):
        safe_extract(tiny, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
