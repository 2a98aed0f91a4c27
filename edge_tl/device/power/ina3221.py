"""The INA3221 power monitors, read straight from sysfs (after jetson_stats' ``jtop/core/power.py``).

Two kernel layouts, both under a ``root`` so tests can read a recorded or built tree:

- JetPack 5/6, hwmon driver ``ina3221``: ``sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon<N>/``
  with ``in<K>_label`` (rail), ``in<K>_input`` (bus voltage, mV), ``curr<K>_input`` (mA), K = 1..3;
  ``in7`` (sum of shunt voltages) has no current and is skipped.
- JetPack 4, IIO driver ``ina3221x``: ``sys/bus/i2c/drivers/ina3221x/<bus>-<addr>/iio:device<N>/`` with
  ``rail_name_<K>``, ``in_voltage<K>_input`` (mV), ``in_current<K>_input`` (mA), ``in_power<K>_input`` (mW).

Sensors are found once, in :meth:`Ina3221Sampler.open`; each sample then re-reads the already-open files
with ``os.pread`` at offset 0 (sysfs regenerates the value on every read from the start).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edge_tl.device.power.base import PowerSampler, PowerUnavailable, is_unused_rail

HWMON_GLOB = "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
IIO_GLOB = "sys/bus/i2c/drivers/ina3221x/*/iio:device*"


@dataclass
class Channel:
    """One monitored rail and the files that give its power."""

    rail: str
    chip: str  #: e.g. "1-0040"
    layout: str  #: "hwmon" or "iio"
    files: dict[str, Path] = field(default_factory=dict)  #: "volt" (mV), "curr" (mA), "power" (mW)


def _label(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def find_channels(root: str | Path = "/") -> list[Channel]:
    """Every connected INA3221 channel under ``root`` (both layouts), sorted by chip and channel."""
    root = Path(root)
    channels: list[Channel] = []
    for mon in sorted(root.glob(HWMON_GLOB)):
        chip = mon.parent.parent.name
        for k in range(1, 7):  # the ina3221 hwmon driver numbers channels 1..3 (in7 is the shunt sum)
            name = _label(mon / f"in{k}_label")
            volt, curr = mon / f"in{k}_input", mon / f"curr{k}_input"
            if name is None or is_unused_rail(name) or not curr.exists() or not volt.exists():
                continue
            channels.append(Channel(name, chip, "hwmon", {"volt": volt, "curr": curr}))
    for dev in sorted(root.glob(IIO_GLOB)):
        chip = dev.parent.name
        for k in range(0, 6):
            name = _label(dev / f"rail_name_{k}")
            if name is None or is_unused_rail(name):
                continue
            power = dev / f"in_power{k}_input"
            files = {"power": power} if power.exists() else {
                "volt": dev / f"in_voltage{k}_input", "curr": dev / f"in_current{k}_input"}
            if all(p.exists() for p in files.values()):
                channels.append(Channel(name, chip, "iio", files))
    seen: dict[str, int] = {}
    for ch in channels:  # the same rail name on two chips: keep both, tell them apart by chip
        seen[ch.rail] = seen.get(ch.rail, 0) + 1
    for ch in channels:
        if seen[ch.rail] > 1:
            ch.rail = f"{ch.rail}@{ch.chip}"
    return channels


def _read_int(fd: int) -> int | None:
    raw = os.pread(fd, 64, 0).split()
    try:
        return int(raw[0]) if raw else None
    except ValueError:
        return None


class Ina3221Sampler(PowerSampler):
    """Reads every INA3221 channel under ``root`` at ``rate_hz`` in a background thread."""

    kind = "ina3221"

    def __init__(self, root: str | Path = "/", rate_hz: float = 20.0):
        super().__init__(rate_hz)
        self.root = Path(root)
        self.channels: list[Channel] = []
        self._fds: list[tuple[str, dict[str, int]]] = []

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "rate_hz": self.rate_hz, "root": str(self.root),
                "channels": [{"rail": c.rail, "chip": c.chip, "layout": c.layout} for c in self.channels]}

    def open(self) -> None:
        self.channels = find_channels(self.root)
        if not self.channels:
            base = self.root / "sys/bus/i2c/drivers"
            raise PowerUnavailable(f"no INA3221 power monitor found under {base}/ina3221 or {base}/ina3221x",
                                   "this machine has no INA3221 sensor: choose --power tegrastats, jtop or nvml")
        try:
            for ch in self.channels:
                fds: dict[str, int] = {}
                self._fds.append((ch.rail, fds))
                for key, path in ch.files.items():
                    fds[key] = os.open(path, os.O_RDONLY)
                    os.pread(fds[key], 64, 0)  # some sensors only refuse on read
        except PermissionError as exc:
            self.close()
            raise PowerUnavailable(f"cannot read INA3221 sensor {exc.filename}: permission denied",
                                   "run as root (sudo) or make the sensor files readable with a udev rule") from exc
        except OSError as exc:
            self.close()
            raise PowerUnavailable(f"cannot read INA3221 sensor {exc.filename}: {exc.strerror}",
                                   "check the ina3221 driver is loaded, or choose another --power source") from exc

    def read(self) -> dict[str, float] | None:
        rails: dict[str, float] = {}
        for rail, fds in self._fds:
            if "power" in fds:
                mw = _read_int(fds["power"])
                if mw is None:
                    return None
                rails[rail] = float(mw)
            else:
                mv, ma = _read_int(fds["volt"]), _read_int(fds["curr"])
                if mv is None or ma is None:
                    return None
                rails[rail] = mv * ma / 1000.0
        return rails

    def close(self) -> None:
        for _, fds in self._fds:
            for fd in fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fds = []
