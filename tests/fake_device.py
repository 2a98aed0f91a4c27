"""Emulated device pieces shared by the tests: sysfs trees built from the kernel's INA3221 ABI (hwmon driver
``ina3221``, JetPack 4's IIO driver ``ina3221x``) and a fake ``tegrastats`` on PATH replaying recorded lines."""

from __future__ import annotations

import stat
import sys
import textwrap
from pathlib import Path

HWMON = "sys/bus/i2c/drivers/ina3221/{chip}/hwmon/hwmon{n}"
IIO = "sys/bus/i2c/drivers/ina3221x/{chip}/iio:device{n}"


def hwmon_chip(root: Path, chip: str, n: int, channels: list[tuple[str, int, int]]) -> Path:
    """channels: (label, bus mV, mA) for K = 1..3, as the ina3221 hwmon driver exposes them."""
    d = root / HWMON.format(chip=chip, n=n)
    d.mkdir(parents=True)
    (d / "name").write_text("ina3221\n")
    for k, (label, mv, ma) in enumerate(channels, start=1):
        (d / f"in{k}_label").write_text(label + "\n")
        (d / f"in{k}_input").write_text(f"{mv}\n")
        (d / f"curr{k}_input").write_text(f"{ma}\n")
        (d / f"curr{k}_max").write_text("32760\n")
        (d / f"curr{k}_crit").write_text("32760\n")
    (d / "in7_label").write_text("sum of shunt voltages\n")  # skipped: no current
    (d / "in7_input").write_text("12\n")
    return d


def agx_orin(root: Path) -> Path:
    hwmon_chip(root, "1-0040", 1, [("VDD_GPU_SOC", 19200, 122), ("VDD_CPU_CV", 19200, 20),
                                   ("VIN_SYS_5V0", 5000, 805)])
    hwmon_chip(root, "1-0041", 2, [("NC", 0, 0), ("VDDQ_VDD2_1V8AO", 5000, 60), ("NC", 0, 0)])
    return root


def orin_nano(root: Path, vdd_in_ma: int = 965) -> Path:
    hwmon_chip(root, "1-0040", 3, [("VDD_IN", 5000, vdd_in_ma), ("VDD_CPU_GPU_CV", 5000, 104),
                                   ("VDD_SOC", 5000, 295)])
    return root


def jp4_iio(root: Path) -> Path:
    d = root / IIO.format(chip="6-0040", n=0)
    d.mkdir(parents=True)
    for k, (name, mv, ma, mw) in enumerate([("POM_5V_IN", 5096, 808, 4122), ("POM_5V_GPU", 5072, 21, 109),
                                            ("POM_5V_CPU", 5072, 230, 1167)]):
        (d / f"rail_name_{k}").write_text(name + "\n")
        (d / f"in_voltage{k}_input").write_text(f"{mv}\n")
        (d / f"in_current{k}_input").write_text(f"{ma}\n")
        (d / f"in_power{k}_input").write_text(f"{mw}\n")
    return root


def fake_tegrastats(bin_dir: Path, lines: list[str], *, die_after: int | None = None) -> Path:
    """An executable that prints ``lines`` round-robin every --interval ms, like tegrastats; it exits 1
    with a message on stderr after ``die_after`` lines when given."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "tegrastats"
    exe.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import sys, time
        args = sys.argv[1:]
        interval = int(args[args.index("--interval") + 1]) if "--interval" in args else 1000
        lines = {lines!r}
        die_after = {die_after!r}
        i = 0
        while die_after is None or i < die_after:
            print(lines[i % len(lines)], flush=True)
            i += 1
            time.sleep(interval / 1000)
        print("tegrastats: lost the power monitor", file=sys.stderr, flush=True)
        sys.exit(1)
    """))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe
