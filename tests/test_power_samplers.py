"""Power samplers on sysfs trees built from the kernel's INA3221 ABI, and on a fake `tegrastats` on PATH.

Trees: an AGX Orin (two chips; 1-0041 has NC channels), an Orin Nano (one chip, VDD_IN), a JetPack 4 IIO
board (ina3221x). The fake tegrastats replays recorded lines (tests/data/tegrastats) at --interval.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from fake_device import HWMON, agx_orin, fake_tegrastats, jp4_iio, orin_nano

from edge_tl.device.power import (
    Ina3221Sampler,
    NoPower,
    PowerSample,
    PowerUnavailable,
    TegrastatsSampler,
    find_channels,
    integrate_mj,
    select_sampler,
    window_power,
)


def test_agx_orin_two_chips_nc_and_shunt_sum_skipped(tmp_path):
    agx_orin(tmp_path)
    chans = find_channels(tmp_path)
    assert [(c.rail, c.chip, c.layout) for c in chans] == [
        ("VDD_GPU_SOC", "1-0040", "hwmon"), ("VDD_CPU_CV", "1-0040", "hwmon"), ("VIN_SYS_5V0", "1-0040", "hwmon"),
        ("VDDQ_VDD2_1V8AO", "1-0041", "hwmon")]
    s = Ina3221Sampler(tmp_path)
    s.open()
    try:
        rails = s.read()
    finally:
        s.close()
    assert rails == {"VDD_GPU_SOC": 19200 * 122 / 1000, "VDD_CPU_CV": 384.0, "VIN_SYS_5V0": 4025.0,
                     "VDDQ_VDD2_1V8AO": 300.0}
    s.add(rails)
    assert s.samples[0].total_mw == pytest.approx(2342.4 + 384 + 4025 + 300)
    assert s.total_source == "sum of rails"


def test_orin_nano_total_is_vdd_in(tmp_path):
    orin_nano(tmp_path)
    with Ina3221Sampler(tmp_path, rate_hz=50) as s:
        time.sleep(0.15)
    assert s.samples, "the sampler thread took no sample"
    first = s.samples[0]
    assert first.rails_mw == {"VDD_IN": 4825.0, "VDD_CPU_GPU_CV": 520.0, "VDD_SOC": 1475.0}
    assert first.total_mw == 4825.0 and s.total_source == "VDD_IN"
    assert s.describe()["channels"][0] == {"rail": "VDD_IN", "chip": "1-0040", "layout": "hwmon"}


def test_jetpack4_iio_layout_reads_power_files(tmp_path):
    jp4_iio(tmp_path)
    s = Ina3221Sampler(tmp_path)
    s.open()
    try:
        rails = s.read()
    finally:
        s.close()
    assert rails == {"POM_5V_IN": 4122.0, "POM_5V_GPU": 109.0, "POM_5V_CPU": 1167.0}  # the tegrastats line's values
    assert [c.layout for c in s.channels] == ["iio"] * 3


def test_sampler_thread_runs_at_the_rate_with_monotonic_timestamps(tmp_path):
    orin_nano(tmp_path)
    s = Ina3221Sampler(tmp_path, rate_hz=50).start()
    time.sleep(0.6)
    samples = s.stop()
    t = np.array([x.t_ns for x in samples])
    assert np.all(np.diff(t) > 0)
    # 50 Hz for 0.6 s is 30 samples; a loaded 2-core machine may lose a few slots but never adds any
    assert 15 <= len(samples) <= 33
    assert 10e6 <= np.median(np.diff(t)) <= 40e6  # ~20 ms apart


def test_energy_integration_on_a_tree_whose_power_changes(tmp_path):
    orin_nano(tmp_path, vdd_in_ma=1000)  # VDD_IN 5000 mW
    curr = tmp_path / HWMON.format(chip="1-0040", n=3) / "curr1_input"
    s = Ina3221Sampler(tmp_path, rate_hz=100).start()
    time.sleep(0.05)
    t0 = time.monotonic_ns()
    time.sleep(0.4)
    t_switch = time.monotonic_ns()
    curr.write_text("2000\n")  # VDD_IN 10000 mW from now on
    time.sleep(0.4)
    t1 = time.monotonic_ns()
    time.sleep(0.05)
    samples = s.stop()
    expected = 5000 * (t_switch - t0) / 1e9 + 10000 * (t1 - t_switch) / 1e9  # mW x s = mJ
    w = window_power(samples, t0, t1)
    # one sample period (10 ms) of uncertainty around the switch: 5 W x 10 ms = 50 mJ of ~6000 mJ
    assert w.energy_mj == pytest.approx(expected, rel=0.03)
    assert w.peak_mw == 10000.0
    assert w.mean_mw == pytest.approx(expected / ((t1 - t0) / 1e9), rel=0.03)
    assert w.rails_mean_mw["VDD_SOC"] == pytest.approx(1475.0)
    assert w.sample_count >= 40 and w.coverage == 1.0


def test_trapezoid_integration_exact_on_known_samples():
    # a ramp 1000 -> 3000 mW over 2 s, sampled every 0.5 s: the trapezoid is exact on a line
    samples = [PowerSample(int(i * 0.5e9), 1000 + 1000 * i * 0.5, {"A": 100.0}) for i in range(5)]
    assert integrate_mj(samples, 0, int(2e9)) == pytest.approx(4000.0)  # mean 2000 mW x 2 s
    # a window inside the trace is interpolated at its edges: 0.25 s .. 1.25 s -> mean 1750 mW
    assert integrate_mj(samples, int(0.25e9), int(1.25e9)) == pytest.approx(1750.0)
    assert integrate_mj(samples, 0, int(2e9), rail="A") == pytest.approx(200.0)
    w = window_power(samples, int(0.25e9), int(1.25e9))
    assert (w.sample_count, w.peak_mw, w.coverage) == (2, 2250.0, 1.0)
    assert w.rate_hz == pytest.approx(2.0)
    half = window_power(samples, int(1.5e9), int(2.5e9))  # half the window lies after the last sample
    assert half.coverage == pytest.approx(0.5)


def test_no_sensor_gives_a_clear_reason(tmp_path):
    with pytest.raises(PowerUnavailable, match="no INA3221 power monitor found"):
        Ina3221Sampler(tmp_path).start()


def _open_as_nobody(root: Path) -> str:
    """Start a sampler in a child process that dropped root (root reads any file), return its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        msg = "no error"
        try:
            os.setgid(65534)
            os.setuid(65534)
            Ina3221Sampler(root).start().stop()
        except PowerUnavailable as exc:
            msg = str(exc)
        except BaseException as exc:  # report anything else to the parent
            msg = f"unexpected {type(exc).__name__}: {exc}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def test_permission_denied_gives_a_clear_reason():
    root = Path(tempfile.mkdtemp(prefix="edge-tl-ina-"))
    try:
        orin_nano(root)
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        denied = root / HWMON.format(chip="1-0040", n=3) / "curr2_input"
        denied.chmod(0)
        if os.geteuid() == 0:
            message = _open_as_nobody(root)
        else:
            with pytest.raises(PowerUnavailable) as info:
                Ina3221Sampler(root).start()
            message = str(info.value)
        assert "permission denied" in message
        assert str(denied) in message
        assert "run as root" in message
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- a fake tegrastats on PATH ---------------------------------------------------------------------------

@pytest.fixture
def nano_line(fixtures_dir) -> str:
    return (fixtures_dir / "tegrastats" / "orin_nano_jp6.txt").read_text().strip()


def test_tegrastats_sampler_parses_lines_as_they_come(tmp_path, monkeypatch, nano_line):
    fake_tegrastats(tmp_path / "bin", [nano_line])
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    s = TegrastatsSampler(interval_ms=20).start()
    time.sleep(0.3)
    samples = s.stop()
    assert s.lost is None
    assert len(samples) >= 5
    assert samples[0].rails_mw == {"VDD_IN": 4824.0, "VDD_CPU_GPU_CV": 518.0, "VDD_SOC": 1475.0}
    assert {x.total_mw for x in samples} == {4824.0}
    assert s.proc.poll() is not None  # stop() ended the process


def test_tegrastats_dying_mid_run_is_reported(tmp_path, monkeypatch, nano_line):
    fake_tegrastats(tmp_path / "bin", [nano_line], die_after=3)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    s = TegrastatsSampler(interval_ms=20).start()
    time.sleep(0.5)
    samples = s.stop()
    assert len(samples) == 3
    assert s.lost == "tegrastats exited with code 1 mid-run (tegrastats: lost the power monitor)"


def test_tegrastats_without_rails_or_missing_is_refused(tmp_path, monkeypatch, nano_line):
    no_rails = nano_line[: nano_line.index(" VDD_IN")]
    fake_tegrastats(tmp_path / "bin", [no_rails])
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(PowerUnavailable, match="prints no power rails"):
        TegrastatsSampler(interval_ms=20).start()
    with pytest.raises(PowerUnavailable, match="'no-such-tegrastats' was not found on PATH"):
        TegrastatsSampler(interval_ms=20, executable="no-such-tegrastats").start()


def test_select_sampler_auto_order_and_reasons(tmp_path, monkeypatch, nano_line):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no tegrastats anywhere
    none = select_sampler("auto", root=tmp_path)
    assert isinstance(none, NoPower) and not none.available
    assert "ina3221: no INA3221 power monitor" in none.reason
    assert "tegrastats: 'tegrastats' was not found on PATH" in none.reason
    # with a fake tegrastats, auto falls through INA3221 (absent) and jtop (not installed) to tegrastats
    fake_tegrastats(tmp_path / "bin", [nano_line])
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    s = select_sampler("auto", root=tmp_path, rate_hz=50)
    try:
        assert s.kind == "tegrastats" and s.interval_ms == 20
        assert [n.split(":")[0] for n in s.selection_notes] == ["ina3221", "jtop"]
    finally:
        s.stop()
    # an INA3221 tree wins over tegrastats
    orin_nano(tmp_path / "root")
    s = select_sampler("auto", root=tmp_path / "root")
    s.stop()
    assert s.kind == "ina3221" and s.selection_notes == []
    # an explicit source that cannot start is an error, never silently replaced
    with pytest.raises(PowerUnavailable, match="no INA3221"):
        select_sampler("ina3221", root=tmp_path)


def test_jtop_power_dict_to_rails():
    from edge_tl.device.power import JtopSampler

    # jetson-stats 4.x `jtop().power` on an Orin Nano: the input rail sits under "tot" with its name
    power = {"rail": {"VDD_CPU_GPU_CV": {"online": True, "type": "I2C", "volt": 5000, "curr": 104, "power": 520,
                                         "avg": 518, "warn": 32760, "crit": 32760},
                      "VDD_SOC": {"online": True, "type": "I2C", "volt": 5000, "curr": 295, "power": 1475,
                                  "avg": 1475}},
             "tot": {"volt": 5000, "curr": 965, "power": 4825, "avg": 4824, "name": "VDD_IN"}}
    assert JtopSampler.rails_from(power) == {"VDD_CPU_GPU_CV": 520.0, "VDD_SOC": 1475.0, "VDD_IN": 4825.0}
    # AGX Orin: no input rail, so jtop's "tot" is a sum without a name and is not a rail
    agx = {"rail": {"VDD_GPU_SOC": {"power": 2340}, "VDD_CPU_CV": {"power": 390}}, "tot": {"power": 2730, "avg": 2730}}
    assert JtopSampler.rails_from(agx) == {"VDD_GPU_SOC": 2340.0, "VDD_CPU_CV": 390.0}
