"""The engine cache without a GPU: keys, sidecars, mismatch -> rebuild (or refuse), with a counting build
function and recorded device facts (an Orin Nano on JetPack 6, an AGX Orin on JetPack 5)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from edge_tl.core import importer
from edge_tl.core.errors import EdgeTLError
from edge_tl.device.engine.cache import (
    EngineKey,
    device_mismatch,
    engine_filename,
    load_or_build,
    read_sidecar,
    sidecar_path,
)
from edge_tl.device.engine.spec import BatchProfile, BuildSpec, DeviceInfo

NANO_JP6 = DeviceInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", dla_cores=0,
                      fast_fp16=True, fast_int8=True)
AGX_JP5 = DeviceInfo(tensorrt_version="8.5.2", gpu_name="Orin", compute_capability="8.7", dla_cores=2,
                     fast_fp16=True, fast_int8=True)


class CountingBuilder:
    """A build function that writes a recognisable engine and counts its calls."""

    def __init__(self):
        self.specs: list[BuildSpec] = []

    def __call__(self, spec: BuildSpec, out: Path, final: Path) -> dict:
        self.specs.append(spec)
        out.write_bytes(f"engine #{len(self.specs)} {spec.precision} {spec.profile.label()}".encode())
        return {"via": "test"}

    @property
    def count(self) -> int:
        return len(self.specs)


def key(**changes) -> EngineKey:
    base = EngineKey(onnx_sha256="a" * 64, tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                     precision="int8", dla_core=None, batch_profile="1-2-8")
    return replace(base, **changes)


def test_key_digest_is_stable_and_covers_every_field():
    assert key().digest() == key().digest() and len(key().digest()) == 16
    variants = [key(onnx_sha256="b" * 64), key(tensorrt_version="8.5.2"), key(gpu_name="Xavier"),
                key(compute_capability="7.2"), key(precision="fp16"), key(dla_core=0), key(batch_profile="1-8-32"),
                key(workspace_mb=512), key(keep_layers=("conv1",)), key(keep_precision="fp16")]
    digests = {v.digest() for v in variants} | {key().digest()}
    assert len(digests) == len(variants) + 1
    assert EngineKey.from_dict(json.loads(json.dumps(key(keep_layers=("a",)).to_dict()))) == key(keep_layers=("a",))
    assert key().differences(key(tensorrt_version="8.5.2")) == ["TensorRT 8.5.2 (engine) != 10.3.0 (here)"]
    assert engine_filename("model-int8", key(dla_core=1)) == f"model-int8-int8-dla1-{key(dla_core=1).digest()}.engine"


def test_profile_defaults_and_validation():
    assert BatchProfile.for_max_batch(32) == BatchProfile(1, 8, 32)
    assert BatchProfile.for_max_batch(2).label() == "1-1-2"
    assert BatchProfile(1, 4, 8).shapes((3, 16, 16)) == ((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))
    with pytest.raises(EdgeTLError, match="min <= opt <= max"):
        BatchProfile.for_max_batch(8, opt=16)


def test_build_once_then_cached_with_sidecar(tiny_bundle_src, tmp_path):
    build = CountingBuilder()
    onnx = tiny_bundle_src / "model.int8.onnx"
    first = load_or_build(onnx, "int8", tmp_path, max_batch=8, device=NANO_JP6, build_fn=build)
    again = load_or_build(onnx, "int8", tmp_path, max_batch=8, device=NANO_JP6, build_fn=build)
    assert first == again and build.count == 1
    assert first.parent == tmp_path and first.name.startswith("model-int8-int8-") and first.suffix == ".engine"
    side = read_sidecar(first)
    assert side["key"]["tensorrt_version"] == "10.3.0" and side["key"]["batch_profile"] == "1-2-8"
    assert side["key"]["onnx_sha256"] == json.loads((tiny_bundle_src / "manifest.json").read_text())[
        "artifacts"]["model.int8.onnx"]["sha256"]
    assert side["flags"] == ["int8"] and side["via"] == "test"
    assert side["device"]["gpu_name"] == "Orin" and len(side["engine_sha256"]) == 64
    assert build.specs[0].timing_cache == tmp_path / "timing-trt10.3.0-cc8.7.cache"
    assert not list(tmp_path.glob(".*partial*"))
    # another precision or profile is another engine
    load_or_build(onnx, "best", tmp_path, max_batch=8, device=NANO_JP6, build_fn=build)
    load_or_build(onnx, "int8", tmp_path, max_batch=16, device=NANO_JP6, build_fn=build)
    assert build.count == 3 and len(list(tmp_path.glob("*.engine"))) == 3


def test_other_tensorrt_rebuilds_with_a_clear_message_or_refuses(tiny_bundle_src, tmp_path):
    build, said = CountingBuilder(), []
    onnx = tiny_bundle_src / "model.onnx"
    load_or_build(onnx, "fp16", tmp_path, max_batch=8, device=AGX_JP5, build_fn=build)
    with pytest.raises(EdgeTLError, match=r"TensorRT 8\.5\.2 \(engine\) != 10\.3\.0 \(here\)") as exc:
        load_or_build(onnx, "fp16", tmp_path, max_batch=8, device=NANO_JP6, build_fn=build, no_build=True)
    assert exc.value.exit_code == 2 and "without --no-build" in str(exc.value)
    assert build.count == 1
    new = load_or_build(onnx, "fp16", tmp_path, max_batch=8, device=NANO_JP6, build_fn=build, notify=said.append)
    assert build.count == 2 and len(said) == 1
    assert "rebuilding the engine" in said[0] and "TensorRT 8.5.2 (engine) != 10.3.0 (here)" in said[0]
    assert read_sidecar(new)["key"]["tensorrt_version"] == "10.3.0"


def test_explicit_engine_file_of_another_device_is_rebuilt(tiny_bundle_src, tmp_path):
    build, said = CountingBuilder(), []
    onnx = tiny_bundle_src / "model.int8.onnx"
    path = tmp_path / "deployed.engine"
    load_or_build(onnx, "int8", engine_path=path, device=AGX_JP5, build_fn=build)
    # copied to an Orin Nano: same file name, other TensorRT and no DLA
    with pytest.raises(EdgeTLError, match="built for another setup: TensorRT 8.5.2"):
        load_or_build(onnx, "int8", engine_path=path, device=NANO_JP6, build_fn=build, no_build=True)
    load_or_build(onnx, "int8", engine_path=path, device=NANO_JP6, build_fn=build, notify=said.append)
    assert build.count == 2 and path.read_bytes().startswith(b"engine #2")
    assert read_sidecar(path)["key"]["tensorrt_version"] == "10.3.0"
    assert said and "deployed.engine was built for another setup" in said[0]


def test_corrupt_or_unexplained_engines_are_rebuilt(tiny_bundle_src, tmp_path):
    build, said = CountingBuilder(), []
    onnx = tiny_bundle_src / "model.int8.onnx"
    path = load_or_build(onnx, "int8", tmp_path, max_batch=8, device=NANO_JP6, build_fn=build)
    path.write_bytes(b"truncated")
    load_or_build(onnx, "int8", tmp_path, max_batch=8, device=NANO_JP6, build_fn=build, notify=said.append)
    assert build.count == 2 and "does not match the sha256" in said[-1]
    sidecar_path(path).unlink()
    load_or_build(onnx, "int8", tmp_path, max_batch=8, device=NANO_JP6, build_fn=build, notify=said.append)
    assert build.count == 3 and "no readable sidecar" in said[-1]


def test_refusals_before_building(tiny_bundle_src, tmp_path):
    build = CountingBuilder()
    with pytest.raises(EdgeTLError, match="no DLA cores") as exc:
        load_or_build(tiny_bundle_src / "model.onnx", "fp16", tmp_path, dla_core=0, device=NANO_JP6,
                      build_fn=build)
    assert "drop --dla" in str(exc.value)
    with pytest.raises(EdgeTLError, match="DLA does not run explicitly quantized") as exc:  # issue 22, D2
        load_or_build(tiny_bundle_src / "model.int8.onnx", "int8", tmp_path, dla_core=1, device=AGX_JP5,
                      build_fn=build)
    assert "--precision fp16 with --dla" in exc.value.fix
    with pytest.raises(EdgeTLError, match="has 2 DLA core"):
        load_or_build(tiny_bundle_src / "model.onnx", "fp16", tmp_path, dla_core=2, device=AGX_JP5,
                      build_fn=build)
    no_fp16 = replace(NANO_JP6, gpu_name="Old GPU", fast_fp16=False)
    with pytest.raises(EdgeTLError, match="no fast FP16"):
        load_or_build(tiny_bundle_src / "model.onnx", "fp16", tmp_path, device=no_fp16, build_fn=build)
    with pytest.raises(EdgeTLError, match="needs a Q/DQ model"):
        load_or_build(tiny_bundle_src / "model.onnx", "int8", tmp_path, device=NANO_JP6, build_fn=build)
    dla = load_or_build(tiny_bundle_src / "model.onnx", "fp16", tmp_path, dla_core=1, device=AGX_JP5,
                        build_fn=build)
    assert build.count == 1 and "-dla1-" in dla.name and build.specs[0].flags() == ["fp16", "dla"]


def test_failed_build_leaves_no_engine(tiny_bundle_src, tmp_path):
    def broken(spec, out, final):
        out.write_bytes(b"half")
        raise EdgeTLError("TensorRT could not build an engine", "see the log")

    with pytest.raises(EdgeTLError, match="could not build"):
        load_or_build(tiny_bundle_src / "model.onnx", "fp32", tmp_path, device=NANO_JP6, build_fn=broken)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.skipif(importer.has_module("tensorrt"), reason="TensorRT is installed")
def test_cli_build_without_tensorrt_is_one_line_exit_2(tiny_bundle_src, tmp_path, capsys):
    from edge_tl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["engine", "build", str(tiny_bundle_src), "--precision", "int8", "--cache-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "tensorrt" in err and "python3-libnvinfer" in err


def test_device_mismatch_by_sidecar(tiny_bundle_src, tmp_path):
    path = load_or_build(tiny_bundle_src / "model.int8.onnx", "int8", tmp_path, device=AGX_JP5,
                         build_fn=CountingBuilder())
    assert device_mismatch(path, AGX_JP5) is None
    assert device_mismatch(path, NANO_JP6) == (f"{path.name} was built for another device: "
                                               "TensorRT 8.5.2 (engine) != 10.3.0 (here)")
    assert device_mismatch(tmp_path / "no-sidecar.engine", NANO_JP6) is None


def test_the_module_is_part_of_the_key(tiny_bundle_src, tmp_path):
    """Issue 22, D9: every Orin reports compute capability 8.7, so by GPU name and cc an AGX Orin engine passed as an
    Orin Nano's. The module (/proc/device-tree/model) is in the key and in device_mismatch."""
    agx = replace(NANO_JP6, module="NVIDIA Jetson AGX Orin Developer Kit")
    nano = replace(NANO_JP6, module="NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super")
    builder = CountingBuilder()
    path = load_or_build(tiny_bundle_src / "model.int8.onnx", "int8", tmp_path, device=agx, build_fn=builder)
    assert device_mismatch(path, agx) is None
    assert device_mismatch(path, nano) == (f"{path.name} was built for another device: module NVIDIA Jetson AGX Orin "
                                           f"Developer Kit (engine) != {nano.module} (here)")
    again = load_or_build(tiny_bundle_src / "model.int8.onnx", "int8", tmp_path, device=nano, build_fn=builder)
    assert builder.count == 2 and again != path  # the Nano builds its own engine
    assert key(module="a").digest() != key(module="b").digest() != key().digest()
