"""Facts about the device, one service per subsystem, all under one ``root`` (as jetson-stats' ``jtop/core``).

``DeviceFacts(root)`` gathers them: ``board`` (module, L4T, JetPack, CPU), ``nvpmodel`` (power mode),
``clocks`` (jetson_clocks state and locking), ``temperatures`` (thermal zones), ``versions`` (CUDA, TensorRT,
packages) and ``power`` (power samplers). Files are read under ``root`` and tools are looked up on PATH, so
tests point ``root`` at a recorded tree and put executables that replay recorded output on PATH.
"""

from __future__ import annotations

from pathlib import Path

from edge_tl.device.facts.board import Board
from edge_tl.device.facts.clocks import Clocks
from edge_tl.device.facts.nvpmodel import NvpModel, PowerMode, parse_nvpmodel
from edge_tl.device.facts.power import Power
from edge_tl.device.facts.temperatures import Temperatures
from edge_tl.device.facts.versions import Versions

__all__ = ["Board", "Clocks", "DeviceFacts", "NvpModel", "Power", "PowerMode", "Temperatures", "Versions",
           "parse_nvpmodel"]


class DeviceFacts:
    """One machine's facts under ``root`` ('/' on the device)."""

    def __init__(self, root: str | Path = "/", *, nvpmodel: str = "nvpmodel", jetson_clocks: str = "jetson_clocks"):
        self.root = Path(root)
        self.board = Board(self.root)
        self.nvpmodel = NvpModel(nvpmodel)
        self.clocks = Clocks(jetson_clocks)
        self.temperatures = Temperatures(self.root)
        self.versions = Versions(self.root)
        self.power = Power(self.root)
