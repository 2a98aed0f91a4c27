"""edge_tl.device.power.parse_tegrastats on every recorded tegrastats line (tests/data/tegrastats, sources there)."""

from __future__ import annotations

import datetime as dt

import pytest

from edge_tl.device.power import parse_tegrastats, total_power

DATA = "tegrastats"


def line(fixtures_dir, name: str) -> str:
    return (fixtures_dir / DATA / name).read_text().strip()


def test_agx_orin_jp6_idle_sums_rails_without_input_rail_and_drops_nc(fixtures_dir):
    s = parse_tegrastats(line(fixtures_dir, "agx_orin_64gb_jp6_idle.txt"))
    assert s.timestamp == dt.datetime(2025, 4, 11, 10, 36, 27)
    assert s.rails_mw == {"VDD_GPU_SOC": 2340, "VDD_CPU_CV": 390, "VIN_SYS_5V0": 4025, "VDDQ_VDD2_1V8AO": 301}
    assert s.rails_avg_mw == s.rails_mw
    assert "NC" not in s.rails_mw and s.rails_max_mw == {}
    assert s.total_mw == 2340 + 390 + 4025 + 301 == 7056
    assert s.total_source == "sum of rails"
    # -256C zones are switched off and dropped
    assert s.temps_c == {"CPU": 44.562, "Tboard": 32.0, "SOC2": 40.093, "Tdiode": 33.0, "SOC0": 41.093,
                         "tj": 44.343, "SOC1": 41.25}
    assert s.cpu_load_pct == [0] * 12
    assert (s.gpu_load_pct, s.emc_load_pct, s.ram_used_mb, s.ram_total_mb) == (0, 0, 4321, 62801)


def test_orin_nano_jp6_total_is_vdd_in(fixtures_dir):
    s = parse_tegrastats(line(fixtures_dir, "orin_nano_jp6.txt"))
    assert s.timestamp == dt.datetime(2025, 6, 18, 11, 25, 24)
    assert s.rails_mw == {"VDD_IN": 4824, "VDD_CPU_GPU_CV": 518, "VDD_SOC": 1475}
    assert s.rails_avg_mw == {"VDD_IN": 4824, "VDD_CPU_GPU_CV": 518, "VDD_SOC": 1475}
    assert (s.total_mw, s.total_source) == (4824.0, "VDD_IN")
    assert s.gpu_load_pct == 0 and s.emc_load_pct is None  # GR3D without frequency, no EMC_FREQ
    assert s.cpu_load_pct == [1, 2, 0, 2, 2, 1]
    assert s.temps_c["tj"] == 50.25


def test_nano_jp4_unitless_rails_total_is_pom_5v_in(fixtures_dir):
    s = parse_tegrastats(line(fixtures_dir, "nano_jp4.txt"))
    assert s.timestamp is None  # JetPack 4 prints no clock
    assert s.rails_mw == {"POM_5V_IN": 4122, "POM_5V_GPU": 109, "POM_5V_CPU": 1167}
    assert s.rails_avg_mw == {"POM_5V_IN": 3107, "POM_5V_GPU": 85, "POM_5V_CPU": 748}
    assert (s.total_mw, s.total_source) == (4122.0, "POM_5V_IN")
    # "RAM 1501/3956MB" and "IRAM 0/252kB" look like current/average pairs but are not rails
    assert "RAM" not in s.rails_mw and "IRAM" not in s.rails_mw
    assert s.ram_used_mb == 1501 and s.gpu_load_pct == 28
    assert s.temps_c == {"PLL": 39.0, "CPU": 44.0, "PMIC": 100.0, "GPU": 41.5, "AO": 47.5, "thermal": 42.5}


def test_agx_orin_jp7_three_values(fixtures_dir):
    s = parse_tegrastats(line(fixtures_dir, "agx_orin_jp7_2.txt"))
    assert s.timestamp == dt.datetime(2026, 7, 25, 9, 8, 28)
    assert s.rails_mw == {"VDD_GPU_SOC": 5139, "VDD_CPU_CV": 3268, "VIN_SYS_5V0": 5500}
    assert s.rails_avg_mw == s.rails_mw
    assert s.rails_max_mw == {"VDD_GPU_SOC": 5139, "VDD_CPU_CV": 3268, "VIN_SYS_5V0": 5500}
    assert (s.total_mw, s.total_source) == (13907.0, "sum of rails")
    assert s.temps_c == {"cpu": 52.968, "soc2": 48.406, "soc0": 49.531, "gpu": 47.625}
    assert s.gpu_load_pct == 12 and s.emc_load_pct == 3
    assert s.cpu_load_pct == [23, 10, 4, 14, 30, 18, 10, 10, 33, 7, 5, 27]


def test_line_without_rails_gives_empty_rails_not_an_error(fixtures_dir):
    # tegrastats run without root: the Orin Nano line with its rails cut off
    full = line(fixtures_dir, "orin_nano_jp6.txt")
    s = parse_tegrastats(full[: full.index(" VDD_IN")])
    assert s.rails_mw == {} and s.rails_avg_mw == {}
    assert s.total_mw is None and s.total_source is None
    assert s.timestamp == dt.datetime(2025, 6, 18, 11, 25, 24)
    empty = parse_tegrastats("")
    assert (empty.rails_mw, empty.total_mw, empty.timestamp, empty.temps_c) == ({}, None, None, {})


def test_dict_style_access_and_public_export(fixtures_dir):
    import edge_tl.device.power

    assert edge_tl.device.power.parse_tegrastats is parse_tegrastats
    s = parse_tegrastats(line(fixtures_dir, "orin_nano_jp6.txt"))
    assert s["rails_mw"]["VDD_SOC"] == 1475
    assert s["total_mw"] == 4824.0


@pytest.mark.parametrize(("rails", "expected"), [
    ({"VDD_IN": 5000.0, "VDD_SOC": 1000.0}, (5000.0, "VDD_IN")),
    ({"POM_5V_IN": 4000.0, "POM_5V_GPU": 100.0}, (4000.0, "POM_5V_IN")),
    ({"GPU": 1000.0, "CPU": 500.0, "SOC": 250.0}, (1750.0, "sum of rails")),  # AGX Xavier: no input rail
    ({}, (0.0, "sum of rails")),
])
def test_total_power_rule(rails, expected):
    assert total_power(rails) == expected
