"""Device state recorded with every bench result, from :class:`edge_tl.device.facts.DeviceFacts` (every file
read under one ``root``, every tool looked up on PATH; tests point both at recorded output)."""

from __future__ import annotations

import platform
import socket

from edge_tl.device.bench.schema import DeviceState
from edge_tl.device.facts import DeviceFacts


def collect_device_state(facts: DeviceFacts) -> DeviceState:
    """What the device is and how it is set up now (module, L4T/JetPack, power mode, clocks, versions)."""
    l4t = facts.board.l4t()
    state = DeviceState(hostname=socket.gethostname(), platform=f"{platform.system()} {platform.release()}",
                        machine=platform.machine(), cpu=facts.board.cpu_name(), jetson_model=facts.board.model(),
                        l4t=l4t, jetpack=facts.board.jetpack(l4t), versions=facts.versions.software(),
                        temps_start_c=facts.temperatures.read())
    mode = facts.nvpmodel.query()
    if mode is not None:
        state.nvpmodel, state.nvpmodel_id = mode.name, mode.id
    state.clocks_locked, state.clocks_detail = facts.clocks.show()
    return state
