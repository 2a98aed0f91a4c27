"""edge-tl bench on the real ONNX Runtime CPU backend with the tiny bundle; device state from a fake root and
fake `nvpmodel` / `jetson_clocks` executables on PATH; power from built INA3221 trees and a fake tegrastats."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fake_device import fake_tegrastats, orin_nano

from edge_tl.core.bundle import Bundle
from edge_tl.core.errors import EdgeTLError
from edge_tl.device.bench import BenchConfig, BenchResult, compare_rows, make_feed, run_bench, write_outputs
from edge_tl.device.bench.device import collect_device_state
from edge_tl.device.engine.trtexec import parse_trtexec
from edge_tl.device.facts import DeviceFacts, parse_nvpmodel
from edge_tl.device.facts.clocks import locked_clocks, parse_clocks
from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner

EDGE_TL = str(Path(sys.executable).with_name("edge-tl"))
DATA = Path(__file__).parent / "data"


def executable(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def fake_tools(bin_dir: Path, log: Path) -> Path:
    """nvpmodel (15W mode) and a stateful jetson_clocks that logs every call and replays recorded output."""
    unlocked = (DATA / "jetson_clocks" / "orin_show_unlocked.txt").read_text()
    executable(bin_dir / "nvpmodel", """
        import sys
        print("NV Power Mode: 15W")
        print("0")
    """)
    executable(bin_dir / "jetson_clocks", f"""
        import re, sys
        from pathlib import Path
        state, log = Path({str(log) + ".state"!r}), Path({str(log)!r})
        unlocked = {unlocked!r}
        args = sys.argv[1:]
        with log.open("a") as f:
            f.write(" ".join(["jetson_clocks", *args]) + "\\n")
        current = state.read_text() if state.exists() else "unlocked"
        if args[:1] == ["--show"]:
            print(unlocked if current == "unlocked" else re.sub(r"MinFreq=\\d+ MaxFreq=(\\d+)",
                  r"MinFreq=\\1 MaxFreq=\\1", unlocked))
        elif args[:1] == ["--store"]:
            Path(args[1]).write_text(current)
        elif args[:1] == ["--restore"]:
            state.write_text(Path(args[1]).read_text())
        else:
            state.write_text("locked")
    """)
    return bin_dir


def fake_root(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, "
        "DATE: Fri Sep 13 04:36:44 UTC 2024\n")
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit\x00")
    for i, (name, milli) in enumerate([("cpu-thermal", 50031), ("gpu-thermal", 49031), ("cv0-thermal", -256000)]):
        zone = root / f"sys/devices/virtual/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(name + "\n")
        (zone / "temp").write_text(f"{milli}\n")
    (root / "usr/local/cuda").mkdir(parents=True)
    (root / "usr/local/cuda/version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}))
    return root


@pytest.fixture
def tools(tmp_path, monkeypatch):
    log = tmp_path / "jetson_clocks.log"
    fake_tools(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return log


def test_run_bench_ort_cpu_stats_csv_and_schema(tiny_bundle, tmp_path):
    cfg = BenchConfig(tiny_bundle, backend="ort-cpu", batches=[1, 3], iterations=40, warmup=5, repeat=2,
                      power="none", root=tmp_path / "no-root", threads=1)
    result, record = run_bench(cfg)
    assert [r.batch for r in result.results] == [1, 3]
    for r in result.results:
        s = r.latency_ms
        assert s.count == r.iterations == 80 and r.repeats == 2 and r.warmup_iterations == 5
        assert 0 < s.min <= s.median <= s.p90 <= s.p95 <= s.p99 <= s.max
        assert s.min <= s.mean <= s.max and s.std >= 0
        assert r.throughput_ips == pytest.approx(r.batch * 80 / r.wall_s)
        assert len(r.repeat_medians_ms) == 2
        lo, hi = min(r.repeat_medians_ms), max(r.repeat_medians_ms)
        assert r.median_spread_pct == pytest.approx((hi - lo) / lo * 100)
        assert r.power is None
    assert result.backend == "ort-cpu" and result.model.precision == "int8"
    assert result.model.bundle_id == Bundle.open(tiny_bundle).manifest.bundle_id
    assert result.power.available is False and "--power none" in result.power.reason
    assert result.settings["data"] == "golden" and result.runner["backend"] == "ort-cpu"

    path = write_outputs(result, record, tmp_path / "out")
    loaded = BenchResult.model_validate_json(path.read_text())  # the JSON validates against the schema
    assert loaded == BenchResult.load(path) and loaded.schema_version == 1
    assert loaded.results[0].latency_ms.median == result.results[0].latency_ms.median
    rows = list(csv.DictReader((tmp_path / "out" / "latencies.csv").open()))
    assert len(rows) == 160 and set(rows[0]) == {"repeat", "batch", "iteration", "start_s", "latency_ms"}
    b1 = sorted(float(r["latency_ms"]) for r in rows if r["batch"] == "1")
    assert b1[0] == pytest.approx(result.results[0].latency_ms.min, abs=1e-5)
    assert loaded.files["latencies_csv"] == "latencies.csv" and "power_csv" not in loaded.files
    assert (tmp_path / "out" / "latency_hist.png").read_bytes()[:4] == b"\x89PNG"


def test_feeds_golden_tiled_random_shaped_and_bare_model_needs_random(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    golden = bundle.golden_inputs()  # 6 images
    with OnnxRuntimeRunner.from_path(bundle.model_path("fp32")) as runner:
        feed = make_feed(runner, bundle, 8, "golden", 0)["input"]
        assert feed.shape == (8, 3, 16, 16) and np.array_equal(feed[6:], golden[:2])
        rnd = make_feed(runner, bundle, 2, "random", 0)["input"]
        assert rnd.shape == (2, 3, 16, 16) and rnd.dtype == np.float32
        assert np.array_equal(rnd, make_feed(runner, None, 2, "random", 0)["input"])  # same seed, same data
        with pytest.raises(EdgeTLError, match="--data golden needs a bundle"):
            make_feed(runner, None, 1, "golden", 0)


def test_from_external_and_compare_ratios(tiny_bundle, tmp_path):
    # trtexec 8.x summary (tests/data/trtexec/trt8x_end_to_end.txt): Throughput 28.9757 qps, Latency line
    trt = BenchResult.from_external("trtexec", {"min": 34.6697, "max": 36.1511, "mean": 35.0057, "median": 34.916,
                                                "p99": 36.1511}, 28.9757, batch=1, label="trtexec")
    row = trt.results[0]
    assert (row.latency_ms.median, row.latency_ms.p90, row.throughput_ips) == (34.916, None, 28.9757)
    assert trt.power.available is False and trt.source == "trtexec"
    b8 = BenchResult.from_external("trtexec", {"median": 100.0}, 20.0, batch=8)
    assert b8.results[0].throughput_ips == 160.0  # qps x batch = images/s
    with pytest.raises(EdgeTLError, match="unknown latency statistic"):
        BenchResult.from_external("x", {"p50": 1.0})
    faster = BenchResult.from_external("other", {"median": 17.458, "p99": 18.0}, 57.9514, label="other")
    rows = {r["metric"]: r for r in compare_rows([trt, faster])}
    assert rows["median ms"]["ratios"] == [1.0, pytest.approx(0.5)]
    assert rows["img/s"]["ratios"] == [1.0, pytest.approx(2.0)]
    assert "mJ/inference" not in rows  # no power in either


def test_from_external_takes_parse_trtexec_output():
    p = parse_trtexec((DATA / "trtexec" / "trt85_orin_dla.txt").read_text())
    r = BenchResult.from_external("trtexec", p["latency_ms"], p["throughput_qps"])
    assert r.results[0].latency_ms.p95 == 2241.41 and r.results[0].throughput_ips == pytest.approx(0.406047)


def test_device_state_from_fake_root_and_tools(tmp_path, tools):
    state = collect_device_state(DeviceFacts(fake_root(tmp_path / "root")))
    assert state.jetson_model == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit"
    assert (state.l4t, state.jetpack) == ("R36.4.0", "6.1/6.2")
    assert (state.nvpmodel, state.nvpmodel_id) == ("15W", 0)
    assert state.clocks_locked is False and "cpu0" in state.clocks_detail
    assert state.temps_start_c == {"cpu-thermal": 50.031, "gpu-thermal": 49.031}  # -256 C zone is off
    assert state.versions["cuda"] == "12.6.68" and state.versions["onnxruntime"]
    assert parse_nvpmodel("NV Power Mode: MAXN\n0\n") == ("MAXN", 0)
    assert parse_clocks("GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000")[0] is True
    assert parse_clocks("nothing here")[0] is None


def test_unlocked_clocks_warn_and_lock_clocks_restores(tiny_bundle, tmp_path, tools):
    root = fake_root(tmp_path / "root")
    cfg = BenchConfig(tiny_bundle, backend="ort-cpu", iterations=5, warmup=1, power="none", root=root)
    result, _ = run_bench(cfg)
    assert any("clocks are not locked" in w for w in result.warnings)
    cfg.lock_clocks = True
    result, _ = run_bench(cfg)
    assert not any("clocks are not locked" in w for w in result.warnings)
    assert result.device.lock_clocks is True and result.device.clocks_restored is True
    calls = [line.split()[:2] for line in tools.read_text().splitlines()]
    assert calls[-3:] == [["jetson_clocks", "--store"], ["jetson_clocks"], ["jetson_clocks", "--restore"]]
    assert Path(str(tools) + ".state").read_text() == "unlocked"  # the previous state is back


def test_locked_clocks_restore_after_keyboard_interrupt(tools):
    with pytest.raises(KeyboardInterrupt):
        with locked_clocks():
            assert Path(str(tools) + ".state").read_text() == "locked"
            raise KeyboardInterrupt
    assert Path(str(tools) + ".state").read_text() == "unlocked"
    assert tools.read_text().splitlines()[-1].startswith("jetson_clocks --restore")


def test_cli_ctrl_c_mid_run_restores_clocks_and_writes_results(tiny_bundle, tmp_path, tools):
    out = tmp_path / "out"
    proc = subprocess.Popen([EDGE_TL, "bench", str(tiny_bundle), "--backend", "ort-cpu", "--lock-clocks",
                             "--duration", "60", "--power", "none", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            # a shell without job control starts background jobs with SIGINT ignored, and Python
                            # then installs no KeyboardInterrupt handler: give the child the terminal's default
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "jetson_clocks\n" not in (tools.read_text() if tools.exists() else ""):
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the 60 s measurement
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert tools.read_text().splitlines()[-1].startswith("jetson_clocks --restore")
    assert Path(str(tools) + ".state").read_text() == "unlocked"
    result = BenchResult.load(out / "bench.json")
    assert result.interrupted is True and result.device.clocks_restored is True
    assert any("interrupted" in w for w in result.warnings)


def test_ina3221_power_idle_baseline_and_energy_per_inference(tiny_bundle, tmp_path):
    root = orin_nano(tmp_path / "sys-root")  # a constant 4825 mW on VDD_IN
    cfg = BenchConfig(tiny_bundle, backend="ort-cpu", batches=[2], duration_s=0.5, warmup=2, power="ina3221",
                      root=root, rate_hz=50, idle_seconds=0.3)
    result, record = run_bench(cfg)
    pw, row = result.power, result.results[0]
    assert pw.available and pw.source == "ina3221" and pw.total_is == "VDD_IN"
    assert pw.idle_mw == pytest.approx(4825.0) and pw.idle_sample_count >= 5
    assert pw.sample_count == len(record.samples) >= 20
    p = row.power
    assert p.mean_mw == pytest.approx(4825.0) and p.peak_mw == 4825.0 and p.above_idle_mw == pytest.approx(0, abs=1e-6)
    images = 2 * row.iterations
    assert p.energy_mj == pytest.approx(4825.0 * p.duration_s)
    assert p.energy_per_inference_mj == pytest.approx(p.energy_mj / images)
    assert p.energy_per_batch_mj == pytest.approx(2 * p.energy_per_inference_mj)
    assert p.energy_per_inference_above_idle_mj == pytest.approx(0, abs=1e-9)
    assert p.rails_mean_mw == {"VDD_CPU_GPU_CV": pytest.approx(520.0), "VDD_IN": pytest.approx(4825.0),
                               "VDD_SOC": pytest.approx(1475.0)}
    assert p.sample_count >= 10 and p.coverage == pytest.approx(1.0)
    write_outputs(result, record, tmp_path / "out")
    trace = list(csv.DictReader((tmp_path / "out" / "power.csv").open()))
    assert {r["phase"] for r in trace} >= {"idle", "batch 2"} and trace[0]["VDD_IN"] == "4825.0"
    assert (tmp_path / "out" / "power.png").is_file()


def test_tegrastats_dying_mid_run_still_writes_latency(tiny_bundle, tmp_path, monkeypatch, fixtures_dir):
    line = (fixtures_dir / "tegrastats" / "orin_nano_jp6.txt").read_text().strip()
    fake_tegrastats(tmp_path / "bin", [line], die_after=4)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cfg = BenchConfig(tiny_bundle, backend="ort-cpu", duration_s=0.5, warmup=2, power="tegrastats", interval_ms=20,
                      idle_seconds=0.05, root=tmp_path)
    result, record = run_bench(cfg)
    assert result.power.available is False and result.power.lost_mid_run is True
    assert result.power.reason.startswith("tegrastats exited with code 1 mid-run")
    assert result.results[0].iterations > 0 and result.results[0].power is None
    assert any("power unavailable" in w for w in result.warnings)
    saved = BenchResult.load(write_outputs(result, record, tmp_path / "out"))
    assert saved.power.reason == result.power.reason and saved.results[0].latency_ms.median > 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EDGE_TL, *args], capture_output=True, text=True, timeout=120)


def test_cli_end_to_end_and_compare(tiny_bundle, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--backend", "ort-cpu", "-b", "1,2", "-n", "20", "--warmup", "2", "--power", "none"]
    proc = run_cli("bench", str(tiny_bundle), *common, "--out", str(a), "--label", "int8")
    assert proc.returncode == 0, proc.stderr
    assert "median ms" in proc.stdout and f"results: {a / 'bench.json'}" in proc.stdout.replace("\n", "")
    tarball = tiny_bundle.with_name("tiny.tar.gz")
    src = tarball if tarball.exists() else tiny_bundle
    proc = run_cli("bench", str(src), *common, "--precision", "fp32", "--out", str(b), "--label", "fp32",
                   "--no-plots")
    assert proc.returncode == 0, proc.stderr
    ra, rb = BenchResult.load(a / "bench.json"), BenchResult.load(b / "bench.json")
    assert [r.iterations for r in ra.results] == [20, 20] and rb.model.precision == "fp32"
    assert "latency_png" in ra.files and "latency_png" not in rb.files
    before = (a / "bench.json").read_bytes()
    proc = run_cli("bench", str(tiny_bundle), *common, "--out", str(a))  # issue 24: never silently replaced
    assert proc.returncode == 2 and "already holds a bench result" in proc.stderr and "--overwrite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and (a / "bench.json").read_bytes() == before
    proc = run_cli("bench", "compare", str(a), str(b / "bench.json"))
    assert proc.returncode == 0, proc.stderr
    ratio = rb.results[0].latency_ms.median / ra.results[0].latency_ms.median
    assert "int8" in proc.stdout and "fp32" in proc.stdout and f"(x{ratio:.2f})" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["bench", "/no/such/bundle"], "model /no/such/bundle does not exist"),
    (["bench", "{bundle}", "--backend", "tensorrt"], "Python package 'tensorrt' is not installed"),
    (["bench", "{bundle}", "--backend", "ort-cuda"], "lacks CUDAExecutionProvider"),
    (["bench", "{bundle}", "--power", "ina3221", "--power-root", "{tmp}"], "no INA3221 power monitor found"),
    (["bench", "{bundle}", "--iterations", "5", "--duration", "1"], "either --iterations or --duration"),
    (["bench", "{bundle}", "--batch", "1,x"], "not a comma-separated list"),
    (["bench", "{bundle}", "--backend", "ort-cpu", "--precision", "fp16"], "fp16 is TensorRT-only"),
    (["bench", "compare", "{tmp}/missing.json", "{tmp}/other.json"], "does not exist"),
])
def test_cli_errors_are_one_line(tiny_bundle_src, tmp_path, args, message):
    proc = run_cli(*[a.format(bundle=tiny_bundle_src, tmp=tmp_path) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:")


def test_tensorrt_runner_errors_without_tensorrt(tmp_path):
    from edge_tl.device.runtime.tensorrt import TensorRTRunner, make_tensorrt_runner

    if __import__("edge_tl.core.importer", fromlist=["has_module"]).has_module("tensorrt"):
        pytest.skip("TensorRT is installed here")
    with pytest.raises(EdgeTLError, match="model .* does not exist"):
        make_tensorrt_runner(tmp_path / "x.engine", "fp16")
    (tmp_path / "m.engine").write_bytes(b"not an engine")
    with pytest.raises(EdgeTLError, match="tensorrt' is not installed"):
        make_tensorrt_runner(tmp_path / "m.engine", "fp16")
    with pytest.raises(EdgeTLError, match="tensorrt' is not installed"):
        TensorRTRunner(tmp_path / "m.engine").activate()


@pytest.mark.tensorrt
def test_tensorrt_runner_matches_golden_outputs(tiny_bundle):
    pytest.importorskip("tensorrt", reason="needs TensorRT's Python bindings and an NVIDIA GPU")
    from edge_tl.device.runners import create_runner

    bundle = Bundle.open(tiny_bundle)
    from edge_tl.device.engine.cache import EngineCache

    engines = EngineCache(tiny_bundle / "engines")
    with create_runner(bundle, backend="tensorrt", precision="fp32", engines=engines) as r:
        out = r.infer(bundle.golden_inputs())["logits"]
        assert r.describe()["cuda_api"] in ("pycuda", "cuda-python")
    np.testing.assert_allclose(out, bundle.golden_outputs(), rtol=1e-2, atol=1e-3)
    result, _ = run_bench(BenchConfig(tiny_bundle, backend="tensorrt", precision="fp16", batches=[1, 8],
                                      iterations=20, power="none"))
    assert [r.batch for r in result.results] == [1, 8] and result.results[0].latency_ms.median > 0


def test_the_device_line_names_the_gpu_a_desktop_runner_ran_on():
    """Issue 23: `edge-tl bench` on CUDA printed the host CPU as the device while the torch runner ran on the GPU
    (the JSON's runner block said cuda / NVIDIA H200)."""
    import io

    from rich.console import Console

    from edge_tl.device.bench.report import print_result
    from edge_tl.device.bench.schema import DeviceState

    def line(runner: dict) -> str:
        buf = io.StringIO()
        result = BenchResult(backend="torch", runner=runner, created="2026-12-05T00:00:00Z",
                             device=DeviceState(cpu="Intel(R) Xeon(R) Processor"))
        print_result(result, Console(file=buf, width=200))
        return next(x for x in buf.getvalue().splitlines() if x.startswith("device:"))

    gpu = line({"backend": "torch", "device": "cuda:0", "gpu": "NVIDIA H200"})
    assert gpu.startswith("device: NVIDIA H200 (host CPU: Intel(R) Xeon(R) Processor)")
    assert line({"backend": "ort-cuda", "providers": ["CUDAExecutionProvider"]}).startswith("device: an NVIDIA GPU")
    assert line({"backend": "ort-cpu", "providers": ["CPUExecutionProvider"]}).startswith(
        "device: Intel(R) Xeon(R) Processor")
