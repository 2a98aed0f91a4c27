"""`edge-tl doctor` on recorded device trees (an Orin Nano on JetPack 6, an AGX Orin on JetPack 5), with
stand-in nvpmodel/systemctl on PATH and the TensorRT builder's facts passed in as recorded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from bundle_factory import rewrite_manifest

from edge_tl.cli import main
from edge_tl.core.bundle import Bundle
from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.device.doctor import evaluate, gather_facts, load_facts, raise_on_blockers, report_json
from edge_tl.device.engine.spec import DeviceInfo
from edge_tl.device.facts import parse_nvpmodel

FAKE_BIN = Path(__file__).parent / "data" / "fake_bin"
NANO_RELEASE = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024\n"  # noqa: E501
AGX_RELEASE = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n"  # noqa: E501
NANO_TRT = DeviceInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", dla_cores=0,
                      fast_fp16=True, fast_int8=True)
AGX_TRT = DeviceInfo(tensorrt_version="8.5.2", gpu_name="Orin", compute_capability="8.7", dla_cores=2,
                     fast_fp16=True, fast_int8=True)


def fake_root(tmp_path: Path, release: str, model: str, cuda: str) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text(release)
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    (root / "usr/local/cuda").mkdir(parents=True)
    (root / "usr/local/cuda/version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": cuda}}))
    return root


@pytest.fixture
def fake_path(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    shutil.copytree(FAKE_BIN, bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_parse_nvpmodel():
    assert parse_nvpmodel("NV Power Mode: MAXN\n0\n").label == "MAXN (mode 0)"
    assert parse_nvpmodel("NVPM WARN: fan mode is not set!\nNV Power Mode: 15W\n0").label == "15W (mode 0)"
    assert parse_nvpmodel("NV Power Mode: MODE_30W_ALL").label == "MODE_30W_ALL"
    assert parse_nvpmodel("") is None and parse_nvpmodel("no such thing") is None


def test_orin_nano_jp6_facts_and_rows(tmp_path, fake_path, tiny_bundle_src):
    root = fake_root(tmp_path, NANO_RELEASE, "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
                     "12.6.68")
    facts = gather_facts(root, device=NANO_TRT)
    assert facts.l4t == "R36.4.0" and facts.jetpack == "6.1/6.2" and facts.cuda == "12.6.68"
    assert facts.jetson_model.startswith("NVIDIA Jetson Orin Nano")
    assert facts.nvpmodel == "15W (mode 0)" and facts.jtop_service == "active"
    assert facts.packages["tensorrt"] == "10.3.0" and facts.packages["onnx"]
    rows = {r.item: r for r in evaluate(facts, Bundle.open(tiny_bundle_src))}
    assert rows["GPU"].value == "Orin (compute capability 8.7)" and rows["DLA cores"].value == "0"
    assert rows["JetPack / L4T"].value == "JetPack 6.1/6.2 (L4T R36.4.0)"
    assert rows["opset"].status == "ok" and rows["opset"].value == "17 <= 20 (TensorRT 10.3.0)"
    assert rows["bundle"].status == "ok" and rows["backend"].value.startswith("auto -> ")
    assert rows["precision"].value == "int8 (fast FP16: True, fast INT8: True)"
    assert rows["signing keys"].status == "ok" and rows["signature"].value.startswith("signed by trusted key")
    raise_on_blockers(list(rows.values()))  # nothing blocks


def test_a_machine_that_trusts_no_key_is_told_why_every_bundle_is_refused(tmp_path, fake_path, tiny_bundle_src,
                                                                          monkeypatch):
    """Issue 24: without a trusted key deploy and serve refuse every bundle; doctor says so and how to fix it. A
    file in the trust folder that is no key is a blocker row, not a crash."""
    root = fake_root(tmp_path, NANO_RELEASE, "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
                     "12.6.68")
    monkeypatch.setenv("EDGE_TL_TRUSTED_KEYS", str(tmp_path / "trust"))
    rows = {r.item: r for r in evaluate(gather_facts(root, device=NANO_TRT), Bundle.open(tiny_bundle_src))}
    assert rows["signing keys"].status == "warn" and "none trusted" in rows["signing keys"].value
    assert "keys trust" in rows["signing keys"].fix and "--trust-key" in rows["signing keys"].fix
    assert rows["signature"].status == "blocker" and "trusts no key" in rows["signature"].value
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "laptop.pub").write_text("ssh-ed25519 AAAA me@laptop\n")
    rows = {r.item: r for r in evaluate(gather_facts(root, device=NANO_TRT))}
    assert rows["signing keys"].status == "blocker" and "laptop.pub" in rows["signing keys"].value


def test_agx_orin_jp5_blocks_a_newer_opset(tmp_path, fake_path, tiny_bundle, monkeypatch):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["target"]["opset"] = 19  # a JetPack 6 export: beyond TensorRT 8.5's parser
    rewrite_manifest(tiny_bundle, manifest)  # another build's manifest (the id recomputed), not a tampered one
    monkeypatch.setenv("FAKE_NVPMODEL", "NV Power Mode: MAXN\\n0")
    root = fake_root(tmp_path, AGX_RELEASE, "Jetson AGX Orin", "11.4.315")
    facts = gather_facts(root, device=AGX_TRT)
    assert facts.jetpack == "5.1.2" and facts.nvpmodel == "MAXN (mode 0)"
    rows = evaluate(facts, Bundle.open(tiny_bundle))
    byname = {r.item: r for r in rows}
    assert byname["opset"].status == "blocker" and byname["opset"].value == "19 > 17 (TensorRT 8.5.2)"
    assert "--target jetpack5" in byname["opset"].fix
    assert byname["target"].status == "warn" and byname["DLA cores"].value == "2"
    with pytest.raises(CheckFailed, match=r"opset: 19 > 17") as exc:
        raise_on_blockers(rows)
    assert exc.value.exit_code == 3


def test_no_fast_int8_and_no_backend_block(tmp_path, fake_path, tiny_bundle_src):
    facts = gather_facts(tmp_path, device=DeviceInfo(tensorrt_version="10.3.0", gpu_name="GTX 1050",
                                                     compute_capability="6.0", fast_fp16=False, fast_int8=False))
    facts.backends = []
    rows = {r.item: r for r in evaluate(facts, Bundle.open(tiny_bundle_src))}
    assert rows["precision"].status == "blocker" and "--precision fp16" in rows["precision"].fix
    assert rows["backends"].status == "blocker" and rows["backend"].status == "blocker"
    assert rows["JetPack / L4T"].value == "not a Jetson"


def test_cli_json_then_facts_roundtrip(tmp_path, fake_path, tiny_bundle, capsys):
    root = fake_root(tmp_path, AGX_RELEASE, "Jetson AGX Orin", "11.4.315")
    facts = gather_facts(root, device=AGX_TRT)
    recorded = tmp_path / "agx.json"
    recorded.write_text(json.dumps(report_json(facts, evaluate(facts))))
    assert load_facts(recorded).device["dla_cores"] == 2
    with pytest.raises(SystemExit) as exc:
        main(["doctor", str(tiny_bundle), "--facts", str(recorded), "--json"])
    assert exc.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["blockers"] == 0 and data["device"]["tensorrt_version"] == "8.5.2"
    assert {c["item"]: c["status"] for c in data["checks"]}["opset"] == "ok"
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["target"]["opset"] = 19
    rewrite_manifest(tiny_bundle, manifest)  # another build's manifest (the id recomputed), not a tampered one
    with pytest.raises(SystemExit) as exc:
        main(["doctor", str(tiny_bundle), "--facts", str(recorded)])
    assert exc.value.code == 3
    captured = capsys.readouterr()
    assert "edge-tl doctor" in captured.out and "opset: 19 > 17" in captured.err


def test_facts_that_are_not_a_facts_file_are_one_line(tmp_path):
    """Issue 24: a JSON list was an internal error, /dev/zero read until memory ran out."""
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    for path, needle in ((listed, "holds a JSON list, not an object"), (Path("/dev/zero"), "not a regular file"),
                         (tmp_path, "not a regular file")):
        with pytest.raises(EdgeTLError, match=needle) as exc:
            load_facts(path)
        assert "edge-tl doctor --json" in exc.value.fix


def test_cli_doctor_on_this_machine(tmp_path, fake_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "--root", str(tmp_path), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert exc.value.code == (3 if data["blockers"] else 0)
    assert data["facts"]["jetson_model"] is None and data["facts"]["nvpmodel"] == "15W (mode 0)"
    assert "ort-cpu" in data["facts"]["backends"]


# Recorded on an AGX Orin with JetPack 5.1.2 (L4T R35.4.1): edge-tl in a Python 3.10 venv, TensorRT 8.5.2 known
# from trtexec's banner only (the bindings are for the system Python 3.8), trtexec at JetPack's path.
AGX_JP5_FACTS = {
    "python": "3.10.14", "machine": "aarch64", "l4t": "R35.4.1", "jetpack": "5.1.2", "jetson_model": "Jetson AGX Orin",
    "packages": {"torch": None, "onnx": "1.16.1", "onnxruntime": "1.16.3", "tensorrt": "8.5.2", "pycuda": None,
                 "cuda-python": None, "jetson-stats": "4.2.12"},
    "ort_providers": ["CPUExecutionProvider"], "trtexec": "/usr/src/tensorrt/bin/trtexec", "cuda": "11.4.315",
    "device": {"tensorrt_version": "8.5.2", "gpu_name": "Orin", "compute_capability": "8.7", "source": "trtexec"},
    "backends": ["ort-cpu"], "nvpmodel": "MAXN (mode 0)", "jtop_service": "active",
}


def test_jetpack5_says_which_commands_work(tmp_path, capsys):
    recorded = tmp_path / "agx-jp5.json"
    recorded.write_text(json.dumps({"facts": AGX_JP5_FACTS}))
    facts = load_facts(recorded)
    rows = {r.item: r for r in evaluate(facts)}
    jp5 = rows["JetPack 5"]
    assert jp5.status == "warn" and "/usr/src/tensorrt/bin/trtexec" in jp5.value
    assert "not importable from Python 3.10.14" in jp5.value and "system Python 3.8" in jp5.value
    assert "engine build --via trtexec" in jp5.value and "--backend tensorrt" in jp5.value.split("Does not work")[1]
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "--facts", str(recorded)])
    assert exc.value.code == 0  # a warning, not a blocker: the trtexec/ORT path works
    assert "JetPack 5" in capsys.readouterr().out


def test_jetpack6_has_no_jetpack5_row(tmp_path, fake_path):
    root = fake_root(tmp_path, NANO_RELEASE, "NVIDIA Jetson Orin Nano Developer Kit", "12.6.68")
    assert "JetPack 5" not in {r.item for r in evaluate(gather_facts(root, device=NANO_TRT))}
