"""A held-out set of bad inputs and tampered bundles, run against every command (issue 11's target).

Every case runs the real CLI entry point (``edge_tl.cli.main``, in-process for speed; a few through the
installed ``edge-tl`` script) with the temp folder pointed at a folder of the test's own, and asserts:

* no traceback and no exit 70 (internal error) or 130 (an ``EOFError`` mistaken for Ctrl-C);
* no tampered artifact accepted: every command refuses a bundle whose files don't match the manifest, and a
  manifest whose paths leave the bundle, before it classifies, benchmarks or gates anything;
* nothing left in the temp folder (nor in the bundle cache after a refused archive);
* one ``error:`` line that names the problem.

The bundle is tests/bundle_factory.py's tiny one; nothing here trains.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import tiny_onnx
from PIL import Image

from edge_tl.cli import main
from edge_tl.core.fsutil import make_tarball

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))
# ONNX Runtime 1.32's telemetry (the 1DS SDK linked into onnxruntime_pybind11_state) writes one session file,
# $TMPDIR/.ses (first-launch time and an id), when the module is imported; it is reused, not one per run, and it
# is not edge-tl's. Everything else in the temp folder counts as left behind.
ORT_SESSION_FILE = ".ses"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ORT_SESSION_FILE)


# -- running a command ---------------------------------------------------------------------------------------
class Run:
    def __init__(self, argv: list[str], code: int, out: str, err: str, leftovers: list[str]):
        self.argv, self.code, self.out, self.err, self.leftovers = argv, code, out, err, leftovers

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    def __repr__(self) -> str:
        return f"edge-tl {' '.join(self.argv)} -> {self.code}\n--- stdout\n{self.out[-1500:]}\n--- stderr\n" \
               f"{self.err[-3000:]}\n--- left in the temp folder: {self.leftovers}"


@pytest.fixture
def sandbox(tmp_path, monkeypatch, capfd):
    """Run the CLI in-process with TMPDIR and the bundle cache inside tmp_path; returns run(argv) -> Run."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    cache = tmp_path / "bundle-cache"
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("EDGE_TL_BUNDLE_CACHE", str(cache))
    monkeypatch.setenv("COLUMNS", "250")

    def run(argv: list[str]) -> Run:
        capfd.readouterr()
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capfd.readouterr()
        return Run([str(a) for a in argv], code, out, err, leftovers(tmp))

    run.tmp, run.cache = tmp, cache  # type: ignore[attr-defined]
    return run


def assert_clean(r: Run) -> None:
    assert "Traceback" not in r.out + r.err, r
    assert r.code not in (70, 130), r
    assert not r.leftovers, r


def assert_refused(r: Run, *codes: int, says: str | None = None) -> None:
    assert_clean(r)
    assert r.code in (codes or (2, 3)), r
    assert len(r.error_lines) == 1, r
    if says is not None:
        assert says in r.error_lines[0], r


# -- tampered bundles ----------------------------------------------------------------------------------------
def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root: Path, data: dict) -> None:
    """Write an edited manifest as a forger would: with the bundle id recomputed (schema 4 on, the id covers the
    manifest, so a plain edit is caught by it; these probes test the checks behind it)."""
    from edge_tl.core.signing import manifest_digest

    if isinstance(data, dict) and data.get("schema_version", 0) >= 4:
        data["bundle_id"] = manifest_digest(data)[:16]
    (root / "manifest.json").write_text(json.dumps(data, indent=2))


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def t_model_byte_flipped(b: Path) -> None:
    _flip_byte(b / "model.onnx")


def t_model_swapped_for_3_classes(b: Path) -> None:
    tiny_onnx(b / "model.onnx", size=16, num_classes=3, seed=5)


def t_int8_swapped(b: Path) -> None:
    shutil.copyfile(b / "model.onnx", b / "model.int8.onnx")


def t_labels_rewritten(b: Path) -> None:
    (b / "labels.txt").write_text("9\n8\n7\n6\n")


def t_golden_outputs_edited(b: Path) -> None:
    out = np.load(b / "golden" / "outputs.npy")
    np.save(b / "golden" / "outputs.npy", out * 0)


def t_preprocess_edited(b: Path) -> None:
    cfg = json.loads((b / "preprocess.json").read_text())
    cfg["mean"] = [0.1, 0.1, 0.1]
    (b / "preprocess.json").write_text(json.dumps(cfg))


def t_artifact_missing(b: Path) -> None:
    (b / "model.int8.onnx").unlink()


def t_extra_file(b: Path) -> None:
    (b / "golden" / "extra.onnx").write_bytes(b"not in the manifest")


def t_golden_path_escapes(b: Path) -> None:
    m = _manifest(b)
    m["golden"]["outputs"] = "../../etc/hostname"
    _write_manifest(b, m)


def t_artifact_path_escapes(b: Path) -> None:
    m = _manifest(b)
    art = m["artifacts"].pop("labels.txt")
    m["artifacts"]["../labels.txt"] = art
    _write_manifest(b, m)


def t_absolute_artifact_path(b: Path) -> None:
    m = _manifest(b)
    m["artifacts"]["/etc/hostname"] = m["artifacts"].pop("labels.txt")
    _write_manifest(b, m)


def t_artifact_hash_edited_to_match(b: Path) -> None:
    """The swapped model's hash written into the manifest, the id left: caught by the bundle id. (A forger who
    also recomputes the id makes a new, unsigned bundle: only a signature tells it apart, tests/test_signing.py.)"""
    import hashlib

    tiny_onnx(b / "model.onnx", size=16, num_classes=4, seed=9)
    m = _manifest(b)
    data = (b / "model.onnx").read_bytes()
    m["artifacts"]["model.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (b / "manifest.json").write_text(json.dumps(m, indent=2))


def t_input_shape_edited(b: Path) -> None:
    m = _manifest(b)
    m["input"]["shape"] = ["batch", 3, 64, 64]
    _write_manifest(b, m)


def t_classes_edited(b: Path) -> None:
    m = _manifest(b)
    m["classes"] = ["a", "b", "c"]
    _write_manifest(b, m)


def t_class_with_newline(b: Path) -> None:
    m = _manifest(b)
    m["classes"][1] = "b\nc"
    _write_manifest(b, m)


def t_manifest_not_json(b: Path) -> None:
    (b / "manifest.json").write_text("{ not json")


def t_manifest_max_batch_zero(b: Path) -> None:
    m = _manifest(b)
    m["max_batch"] = 0
    _write_manifest(b, m)


def t_preprocess_nan(b: Path) -> None:
    """preprocess.json with NaN, its hash updated and the bundle_id recomputed: a consistent, hostile bundle."""
    from edge_tl.core.bundle import Artifact, bundle_id_of

    cfg = json.loads((b / "preprocess.json").read_text())
    cfg["std"] = [float("nan")] * 3
    (b / "preprocess.json").write_text(json.dumps(cfg))
    import hashlib

    m = _manifest(b)
    data = (b / "preprocess.json").read_bytes()
    m["artifacts"]["preprocess.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    m["bundle_id"] = bundle_id_of({k: Artifact(**v) for k, v in m["artifacts"].items()})
    _write_manifest(b, m)


def t_symlinked_folder(b: Path) -> None:
    """A folder inside the bundle that is a link to elsewhere: what it holds is outside the hashes (issue 24)."""
    elsewhere = b.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "notes.txt").write_text("not part of any bundle")
    (b / "golden" / "more").symlink_to(elsewhere, target_is_directory=True)


TAMPERED = [t_model_byte_flipped, t_model_swapped_for_3_classes, t_int8_swapped, t_labels_rewritten,
            t_golden_outputs_edited, t_preprocess_edited, t_artifact_missing, t_extra_file, t_golden_path_escapes,
            t_artifact_path_escapes, t_absolute_artifact_path, t_artifact_hash_edited_to_match, t_input_shape_edited,
            t_classes_edited, t_class_with_newline, t_manifest_not_json, t_manifest_max_batch_zero, t_preprocess_nan,
            t_symlinked_folder]


# -- broken archives -----------------------------------------------------------------------------------------
def a_truncated(src: Path, dest: Path) -> None:
    data = src.with_name("tiny.tar.gz").read_bytes()
    dest.write_bytes(data[: len(data) // 2])


def a_truncated_end(src: Path, dest: Path) -> None:
    data = src.with_name("tiny.tar.gz").read_bytes()
    dest.write_bytes(data[:-40])


def a_truncated_trailer(src: Path, dest: Path) -> None:
    """Only gzip's 8-byte trailer (CRC-32, length) cut: every tar member is whole, the stream is not."""
    data = src.with_name("tiny.tar.gz").read_bytes()
    dest.write_bytes(data[:-8])


def a_empty(src: Path, dest: Path) -> None:
    dest.write_bytes(b"")


def a_random_bytes(src: Path, dest: Path) -> None:
    dest.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _tar(dest: Path, entries: list[tuple[str, bytes | None, str]]) -> None:
    """entries: (name, data or None for a folder, kind: file|dir|sym|hard)."""
    with tarfile.open(dest, "w:gz") as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind in ("sym", "hard"):
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))


def a_file_then_folder(src: Path, dest: Path) -> None:
    _tar(dest, [("tiny/", None, "dir"), ("tiny/golden", b"x", "file"), ("tiny/golden/", None, "dir"),
                ("tiny/golden/a", b"y", "file")])


def a_duplicate_entry(src: Path, dest: Path) -> None:
    _tar(dest, [("tiny/manifest.json", b"{}", "file"), ("tiny/manifest.json", b"{}", "file")])


def a_dotdot(src: Path, dest: Path) -> None:
    _tar(dest, [("tiny/../../evil", b"x", "file")])


def a_absolute(src: Path, dest: Path) -> None:
    _tar(dest, [("/tmp/evil", b"x", "file")])


def a_symlink(src: Path, dest: Path) -> None:
    _tar(dest, [("tiny/", None, "dir"), ("tiny/model.onnx", None, "sym")])


def a_two_tops(src: Path, dest: Path) -> None:
    _tar(dest, [("a/manifest.json", b"{}", "file"), ("b/manifest.json", b"{}", "file")])


def a_tampered_inside(src: Path, dest: Path) -> None:
    work = dest.parent / "tampered-tiny"
    shutil.copytree(src, work)
    _flip_byte(work / "model.onnx")
    make_tarball(work, dest)
    shutil.rmtree(work)


def a_escaping_golden_inside(src: Path, dest: Path) -> None:
    work = dest.parent / "escaping-tiny"
    shutil.copytree(src, work)
    t_golden_path_escapes(work)
    make_tarball(work, dest)
    shutil.rmtree(work)


ARCHIVES = [a_truncated, a_truncated_end, a_truncated_trailer, a_empty, a_random_bytes, a_file_then_folder,
            a_duplicate_entry, a_dotdot, a_absolute, a_symlink, a_two_tops, a_tampered_inside, a_escaping_golden_inside]


# -- every command that opens a bundle -----------------------------------------------------------------------
def commands(bundle: Path, work: Path) -> dict[str, list]:
    img = work / "img.png"
    if not img.exists():
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 28, 3), dtype=np.uint8)).save(img)
    return {
        "infer": ["infer", img, "--bundle", bundle, "--backend", "ort-cpu"],
        "bench": ["bench", bundle, "--backend", "ort-cpu", "-n", "2", "--warmup", "0", "--power", "none",
                  "--idle-seconds", "0", "--no-plots", "--out", work / "bench", "--overwrite"],
        "engine check": ["engine", "check", bundle, "--backend", "ort-cpu", "--precision", "fp32", "--json",
                         work / "parity.json"],
        "engine build": ["engine", "build", bundle, "--no-build", "--cache-dir", work / "engines"],
        "engine sensitivity": ["engine", "sensitivity", bundle, "--top", "2"],
        "doctor": ["doctor", bundle],
        "serve": ["serve", bundle, "--port", "0", "--backend", "ort-cpu"],
    }


def device_install(run, bundle: Path, work: Path) -> Run:
    """The device half of `edge-tl deploy` (what runs over SSH), on a copy of the upload."""
    upload = work / "upload.tar.gz"
    if bundle.is_dir():
        make_tarball(bundle, upload)
    else:
        shutil.copyfile(bundle, upload)
    return run(["deploy", "device", "install", "--root", work / "root", "--upload", upload, "--backend", "ort-cpu",
                "--no-restart"])


def deploy_prepare(bundle: Path):
    """The workstation half of `edge-tl deploy push` checks the bundle before connecting anything."""
    from edge_tl.workstation.ship.client import prepare

    with prepare(bundle):
        pass


@pytest.mark.parametrize("as_tarball", [False, True], ids=["dir", "tar.gz"])
@pytest.mark.parametrize("tamper", TAMPERED, ids=lambda f: f.__name__[2:])
def test_tampered_bundle_is_refused_by_every_command(tamper, as_tarball, tiny_bundle_src, tmp_path, sandbox):
    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle_src, bundle)
    tamper(bundle)
    if as_tarball:
        tarball = tmp_path / "tiny.tar.gz"
        make_tarball(bundle, tarball)
        shutil.rmtree(bundle)
        bundle = tarball
    work = tmp_path / "work"
    work.mkdir()
    for name, argv in commands(bundle, work).items():
        r = sandbox(argv)
        assert_refused(r)
        if name == "infer":
            assert r.out.strip() == "", r  # not one picture classified
        if name == "engine check":  # deploy reads this report: it must say why it failed
            report = json.loads((work / "parity.json").read_text())
            assert report["passed"] is False and report["error"]
    assert not (work / "bench" / "bench.json").exists()
    r = device_install(sandbox, bundle, work)
    assert_refused(r)
    assert not (work / "root" / "active").exists()
    from edge_tl.core.errors import EdgeTLError

    with pytest.raises(EdgeTLError):
        deploy_prepare(bundle)
    assert not leftovers(sandbox.tmp)
    assert not sandbox.cache.exists() or not [p for p in sandbox.cache.iterdir()], "a refused archive stays cached"


@pytest.mark.parametrize("broken", ARCHIVES, ids=lambda f: f.__name__[2:])
def test_broken_archive_is_one_line_exit_2_or_3(broken, tiny_bundle_src, tmp_path, sandbox):
    archive = tmp_path / "bundle.tar.gz"
    broken(tiny_bundle_src, archive)
    work = tmp_path / "work"
    work.mkdir()
    for argv in commands(archive, work).values():
        assert_refused(sandbox(argv))
    assert_refused(device_install(sandbox, archive, work))
    assert not sandbox.cache.exists() or not list(sandbox.cache.iterdir())


def test_truncated_archive_is_not_reported_as_interrupted(tiny_bundle_src, tmp_path):
    """Through the installed script: exit 2 and one line, not click's 'Aborted!'/exit 130."""
    archive = tmp_path / "cut.tar.gz"
    a_truncated(tiny_bundle_src, archive)
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "EDGE_TL_BUNDLE_CACHE": str(tmp_path / "cache")}
    for argv in (["infer", "x.png", "--bundle", str(archive)], ["engine", "check", str(archive)],
                 ["doctor", str(archive)], ["serve", str(archive)]):
        proc = subprocess.run([EDGE_TL, *argv], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error:") and "truncated or corrupt" in lines[0], lines
        assert not leftovers(tmp)


# -- good bundles in every shape are accepted, and leave nothing in the temp folder ----------------------------
def test_good_bundles_run_and_leave_nothing_behind(tiny_bundle_src, tmp_path, sandbox):
    flat = tmp_path / "flat.tgz"  # tar -C bundle -czf flat.tgz .
    subprocess.run(["tar", "-C", str(tiny_bundle_src), "-czf", str(flat), "."], check=True)
    work = tmp_path / "work"
    work.mkdir()
    for bundle in (tiny_bundle_src, tiny_bundle_src.with_name("tiny.tar.gz"), flat):
        cmds = commands(bundle, work)
        for name in ("infer", "bench", "engine check"):
            r = sandbox(cmds[name])
            assert r.code == 0 and "Traceback" not in r.err, r
            assert not r.leftovers, r
        record = json.loads(sandbox(cmds["infer"]).out.splitlines()[0])
        assert record["model_version"] == json.loads((tiny_bundle_src / "manifest.json").read_text())["bundle_id"]
    # each archive was unpacked once, into the cache (keyed by its sha256), not into the temp folder
    assert len(list(sandbox.cache.iterdir())) == 2


# -- bad options and inputs -------------------------------------------------------------------------------------
BAD_OPTIONS = [
    (["infer", "nothing[/x]", "--bundle", "{b}"], 2, "nothing[/x]"),
    (["infer", "{img}", "--bundle", "{b}", "--out", "{work}"], 2, "is a folder"),
    (["infer", "{img}", "--bundle", "[bold]{b}"], 2, "[bold]"),
    (["bench", "{b}", "--out", "{img}", "--power", "none"], 2, "is a file"),
    (["bench", "{b}", "--duration", "nan", "--power", "none"], 2, "--duration"),
    (["bench", "{b}", "--batch", "64", "--power", "none", "--backend", "ort-cpu"], 2, "max_batch 8"),
    (["bench", "{b}", "--rate", "inf", "--power", "none"], 2, "--rate"),
    (["engine", "check", "{b}", "--min-cosine", "2", "--backend", "ort-cpu"], 2, "--min-cosine"),
    (["engine", "check", "{b}", "--max-top1-drop", "-1", "--backend", "ort-cpu"], 2, "--max-top1-drop"),
    (["engine", "check", "{b}", "--max-rel-diff", "nan", "--backend", "ort-cpu"], 2, "--max-rel-diff"),
    (["engine", "check", "{b}", "--json", "{work}", "--backend", "ort-cpu"], 2, "is a folder"),
    (["engine", "build", "{b}", "--out", "{work}", "--no-build"], 2, "is a folder"),
    (["engine", "sensitivity", "{b}", "--json", "{work}"], 2, "is a folder"),
    (["serve", "{b}", "--port", "99999"], 2, "--port"),
    (["serve", "{b}", "--max-delay-ms", "nan"], 2, "--max-delay-ms"),
    (["deploy", "status", "--to", "user@[zz]:22"], 2, "user@[zz]:22"),
    (["deploy", "status", "--to", "user@[/x]"], 2, "user@[/x]"),
    (["engine", "check", "{b}", "--precision", "fp16", "--backend", "ort-cpu"], 2, "TensorRT-only"),
    (["engine", "sensitivity", "{b}", "--top", "0"], 2, "--top"),
    (["infer", "{img}", "--bundle", "{b}", "--precision", "best", "--backend", "ort-cpu"], 2, "TensorRT-only"),
    (["infer", "{img}", "--bundle", "{b}", "--max-fps", "nan", "--backend", "ort-cpu"], 2, "--max-fps"),
    (["build", "--lr-head", "inf", "--data", "{work}"], 2, "finite"),
    (["build", "--prune-ratio", "nan", "--data", "{work}"], 2, "finite"),
]


@pytest.mark.parametrize("argv,code,says", BAD_OPTIONS, ids=[" ".join(a[:3]) + f" {a[-2]}" for a, _, _ in BAD_OPTIONS])
def test_bad_option_is_one_line(argv, code, says, tiny_bundle_src, tmp_path, sandbox):
    work = tmp_path / "work"
    work.mkdir()
    img = tmp_path / "img.png"
    Image.new("RGB", (20, 20)).save(img)
    args = [a.format(b=tiny_bundle_src, img=img, work=work) for a in argv]
    r = sandbox(args)
    assert_refused(r, code, says=says)
    if argv[0] == "bench":
        assert not list(work.iterdir())  # no half-written results


def test_edited_manifest_input_shape_is_refused_by_serve(tiny_bundle_src, tmp_path, sandbox):
    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle_src, bundle)
    t_input_shape_edited(bundle)
    r = sandbox(["serve", bundle, "--backend", "ort-cpu", "--port", "0"])
    assert_refused(r, 2, says="input shape")


# -- infer: every picture's failure is a record, the run goes on, the exit code says some failed ------------------
def _modes_folder(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 28, 3), dtype=np.uint8))
    files = {
        "rgb": (rgb, "rgb.png"),
        "i16": (Image.fromarray((rng.integers(0, 65535, (24, 28))).astype(np.uint16)), "gray16.png"),
        "cmyk": (rgb.convert("CMYK"), "cmyk.jpg"),
        "ycbcr": (rgb.convert("YCbCr"), "ycbcr.tif"),
        "lab": (rgb.convert("LAB"), "lab.tif"),
        "la": (rgb.convert("LA"), "la.png"),
        "rgba": (rgb.convert("RGBA"), "rgba.png"),
        "p_transparent": (rgb.convert("P"), "p.png"),
        "float": (Image.fromarray(rng.random((24, 28), dtype=np.float32)), "float.tif"),
        "int32": (Image.fromarray(rng.integers(0, 2**20, (24, 28)).astype(np.int32)), "int32.tif"),
    }
    out = {}
    for key, (img, name) in files.items():
        kw = {"transparency": 0} if key == "p_transparent" else {}
        img.save(folder / name, **kw)
        out[key] = folder / name
    return out


def test_infer_records_each_failure_and_goes_on(tiny_bundle_src, tmp_path, sandbox):
    folder = tmp_path / "pics"
    files = _modes_folder(folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    locked = folder / "locked"
    locked.mkdir()
    Image.new("RGB", (20, 20)).save(locked / "hidden.png")
    locked.chmod(0)
    try:
        r = sandbox(["infer", folder, "--bundle", tiny_bundle_src, "--backend", "ort-cpu"])
    finally:
        locked.chmod(0o755)
    assert_clean(r)
    assert r.code == 1, r  # some failed
    records = [json.loads(line) for line in r.out.splitlines()]
    by_source = {Path(rec["source"]).name: rec for rec in records}
    for key in ("rgb", "i16", "cmyk", "ycbcr", "lab", "la", "rgba", "p_transparent"):
        assert "top_k" in by_source[files[key].name], by_source[files[key].name]
    for key in ("float", "int32"):
        assert "not supported" in by_source[files[key].name]["error"]
    assert "error" in by_source["broken.png"]
    if os.geteuid() != 0:  # root reads a chmod-0 folder anyway
        assert "cannot list folder" in by_source["locked"]["error"]


def test_infer_glob_with_an_unreadable_video_goes_on(tiny_bundle_src, tmp_path, sandbox):
    pics = tmp_path / "mix"
    pics.mkdir()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(pics / "a.png")
    (pics / "b.mp4").write_bytes(b"not a video at all")
    Image.new("RGB", (20, 20), (10, 200, 10)).save(pics / "c.png")
    r = sandbox(["infer", str(pics / "*"), "--bundle", tiny_bundle_src, "--backend", "ort-cpu"])
    assert_clean(r)
    assert r.code == 1
    records = [json.loads(line) for line in r.out.splitlines()]
    assert [Path(rec["source"]).name for rec in records] == ["a.png", "b.mp4", "c.png"]
    assert "error" in records[1] and "top_k" in records[2]


# -- deploy to a port that does not speak SSH ------------------------------------------------------------------
@pytest.fixture
def not_ssh_server():
    """A real TCP server that answers like an HTTP server (a line that is not an SSH banner)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join(2)
    srv.close()


def test_deploy_to_a_port_without_ssh(not_ssh_server, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([EDGE_TL, "deploy", "status", "--to", f"me@127.0.0.1:{not_ssh_server}"],
                          capture_output=True, text=True, timeout=60, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines == [lines[0]] and f"no SSH server answered on 127.0.0.1:{not_ssh_server}" in lines[0], lines
    assert "Traceback" not in proc.stderr and "paramiko" not in proc.stderr


def test_silent_port_fails_within_the_connect_timeout():
    """A listener that never says a word (an SSH server sends its banner first)."""
    import time

    from edge_tl.core.errors import EdgeTLError
    from edge_tl.workstation.ship.transport import SSHSession, SSHTarget

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        session = SSHSession(SSHTarget.parse(f"me@127.0.0.1:{srv.getsockname()[1]}"), connect_timeout=1.0)
        start = time.monotonic()
        with pytest.raises(EdgeTLError, match="no SSH server answered"):
            session.connect()
        assert time.monotonic() - start < 5  # the 1 s connect timeout, not paramiko's own waits


# -- the run folder tells the truth ---------------------------------------------------------------------------------
def _finished_run(run: Path, tiny_bundle_src: Path) -> None:
    """What a finished build leaves (the tiny bundle stands in for its bundle)."""
    run.mkdir()
    shutil.copytree(tiny_bundle_src, run / "bundle")
    shutil.copyfile(tiny_bundle_src.with_name("tiny.tar.gz"), run / "bundle.tar.gz")
    (run / "report.md").write_text("# old report\n")
    (run / "run.json").write_text(json.dumps({"status": "done", "bundle_id": "old"}))


@pytest.mark.parametrize("bad", ["control-char-class", "cmyk-only-class"])
def test_failed_overwrite_leaves_no_stale_bundle(bad, tiny_bundle_src, tmp_path):
    data = tmp_path / "data"
    for cls in ("a", "b\rc" if bad == "control-char-class" else "b"):
        (data / cls).mkdir(parents=True)
        for i in range(4):
            img = Image.new("RGB", (20, 20), (i * 40, 10, 10))
            if bad == "cmyk-only-class" and cls == "b":
                img = Image.fromarray(np.full((20, 20), 0.5, dtype=np.float32))  # float: no defined range
                img.save(data / cls / f"{i}.tif")
            else:
                img.save(data / cls / f"{i}.png")
    run = tmp_path / "run"
    _finished_run(run, tiny_bundle_src)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.run([EDGE_TL, "build", "--data", str(data), "--out", str(run), "--overwrite", "--weights",
                           "none", "--backbone", "mobilenet_v3_small", "--input-size", "32"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("can't be a class name" if bad == "control-char-class" else "usable image") in proc.stderr
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "failed" and state["error"]
    assert "bundle_id" not in state or state["bundle_id"] is None
    for stale in ("bundle", "bundle.tar.gz", "report.md"):
        assert not (run / stale).exists(), f"{stale} of the previous build is still there"
    assert not leftovers(tmp)


# -- permissions follow the umask ----------------------------------------------------------------------------------
def test_bundle_files_follow_the_umask(tmp_path, monkeypatch):
    from bundle_factory import make_tiny_bundle

    from edge_tl.core.bundle import Bundle
    from edge_tl.core.fsutil import current_umask

    monkeypatch.setenv("EDGE_TL_BUNDLE_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        bundle = make_tiny_bundle(tmp_path / "b")
        opened = Bundle.open(bundle.with_name("b.tar.gz"))  # unpacked into the cache
        paths = [bundle, *bundle.rglob("*"), bundle.with_name("b.tar.gz"), opened.root, *opened.root.rglob("*")]
        for path in paths:
            want = 0o755 if path.is_dir() else 0o644
            assert path.stat().st_mode & 0o777 == want, f"{path}: {oct(path.stat().st_mode & 0o777)}"
    finally:
        os.umask(old)


# -- one image conversion for every stage; the scan accepts only what every stage can handle ------------------------
def test_to_rgb_converts_every_mode_or_refuses(tmp_path):
    from edge_tl.core.errors import EdgeTLError
    from edge_tl.core.preprocess import to_rgb

    files = _modes_folder(tmp_path / "modes")
    for key, path in files.items():
        with Image.open(path) as img:
            img.load()
            if key in ("float", "int32"):
                with pytest.raises(EdgeTLError, match="not supported"):
                    to_rgb(img)
                continue
            rgb = to_rgb(img)
            assert rgb.mode == "RGB" and rgb.size == img.size, key
            rgb.save(tmp_path / f"{key}-golden.png")  # what the bundle's golden images need
    # 16-bit grey: a uniform ramp over the full range averages half-scale, not white (issue: mean 0.997)
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as img:
        assert img.mode == "I;16"
        arr = np.asarray(to_rgb(img), dtype=np.float64) / 255
    assert abs(arr.mean() - 0.5) < 0.01 and (arr == 1.0).mean() < 0.01
    # transparency is composited over white, the same for every alpha mode
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(clear.convert("LA")).getpixel((0, 0)) == (255, 255, 255)


def test_scan_skips_what_a_later_stage_cannot_use(tmp_path):
    from edge_tl.workstation.data import scan

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    test_a = tmp_path / "test" / "a"
    Image.new("RGB", (20, 20)).convert("CMYK").save(test_a / "cmyk.jpg")
    Image.new("RGB", (20, 20)).convert("LAB").save(test_a / "lab.tif")
    Image.fromarray(np.zeros((20, 20), np.uint16)).save(test_a / "gray16.png")
    Image.fromarray(np.zeros((20, 20), np.float32)).save(test_a / "float.tif")
    Image.fromarray(np.zeros((20, 20), np.int32)).save(test_a / "int32.tif")
    with pytest.warns(UserWarning):
        split = scan(tmp_path)
    used = {Path(rel).name for rel, _ in split.items["test"]}
    assert {"cmyk.jpg", "lab.tif", "gray16.png"} <= used
    skipped = {Path(s["file"]).name: s["reason"] for s in split.summary.skipped}
    assert set(skipped) == {"float.tif", "int32.tif"} and all("not supported" in r for r in skipped.values())


@pytest.mark.parametrize("name", ["b\rc", "b\nc", "tab\there", "nel\x85x", "sep\u2028x"])
def test_scan_refuses_class_names_with_control_characters(name, tmp_path):
    from edge_tl.core.errors import EdgeTLError
    from edge_tl.workstation.data import scan

    for cls in ("a", name):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(tmp_path / cls / f"{i}.png")
    with pytest.raises(EdgeTLError, match="can't be a class name"):
        scan(tmp_path)


# -- a diverged training stage is never cached; an interrupted build says so ---------------------------------------
def test_non_finite_weights_or_loss_are_not_cached(tmp_path):
    torch = pytest.importorskip("torch")
    from edge_tl.core.errors import EdgeTLError
    from edge_tl.workstation.pipeline.run import _check_finite

    good = {"w": torch.ones(3), "b": torch.zeros(2), "steps": torch.tensor(3)}
    torch.save(good, tmp_path / "model.pt")
    _check_finite("finetune", tmp_path, {"top1": 0.5})
    bad = {**good, "w": torch.tensor([1.0, float("inf"), 0.0])}
    torch.save(bad, tmp_path / "model.pt")
    with pytest.raises(EdgeTLError, match="1 of 2 weight tensors"):
        _check_finite("finetune", tmp_path, {"top1": 0.5})
    torch.save(good, tmp_path / "model.pt")
    (tmp_path / "fit.json").write_text(json.dumps({"history": [{"train_loss": float("nan")}]}))
    with pytest.raises(EdgeTLError, match="loss became NaN"):
        _check_finite("prune", tmp_path, {"top1": 0.5})


def test_interrupted_build_says_interrupted(tmp_path, monkeypatch, tiny_bundle_src):
    pytest.importorskip("torch")
    from edge_tl.workstation.pipeline import run as run_code
    from edge_tl.workstation.pipeline.run import run_build
    from edge_tl.workstation.spec import load_spec

    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(data / cls / f"{i}.png")
    run = tmp_path / "run"
    _finished_run(run, tiny_bundle_src)

    def ctrl_c(ctx, out):
        raise KeyboardInterrupt

    monkeypatch.setitem(run_code.RUNNERS, "data", ctrl_c)
    spec = load_spec(None, {"data.root": str(data), "model.weights": "none"}, {})
    with pytest.raises(KeyboardInterrupt):
        run_build(spec, run, overwrite=True)
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "interrupted" and "resume" in state["error"]
    assert not (run / "bundle").exists() and not (run / "bundle.tar.gz").exists()
    assert (run / "spec.resolved.toml").is_file()


def test_serve_decodes_with_the_same_conversion():
    from edge_tl.device.serve.images import decode_image
    from edge_tl.device.serve.protocol import ProtocolError

    def encoded(img: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    ramp = Image.fromarray(np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16))
    rgb = decode_image(encoded(ramp, "PNG"), max_pixels=10_000)
    assert rgb.mode == "RGB" and abs(np.asarray(rgb).mean() / 255 - 0.5) < 0.01
    cmyk = decode_image(encoded(Image.new("RGB", (8, 8), (200, 10, 10)).convert("CMYK"), "JPEG"), 10_000)
    assert cmyk.mode == "RGB"
    with pytest.raises(ProtocolError) as exc:
        decode_image(encoded(Image.fromarray(np.zeros((8, 8), np.float32)), "TIFF"), 10_000)
    assert exc.value.status == 415 and "not supported" in exc.value.message
