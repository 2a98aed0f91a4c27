"""Power and energy on Jetson (and discrete GPUs): parsers, samplers behind one interface, integration.

Public API::

    from edge_tl.device.power import parse_tegrastats, select_sampler, window_power

    sample = parse_tegrastats(line)        # .rails_mw, .rails_avg_mw, .total_mw, .timestamp, .temps_c ...
    sampler = select_sampler("auto")       # started; Ina3221Sampler, JtopSampler, TegrastatsSampler,
    ...                                    # NvmlSampler, or NoPower(reason)
    samples = sampler.stop()               # [PowerSample(t_ns, total_mw, rails_mw)]
    w = window_power(samples, t0_ns, t1_ns)  # mean/peak mW, energy mJ, per-rail means, sample count, rate

Imports here are light (no jtop, pynvml or subprocess work until a sampler starts).
"""

from __future__ import annotations

from edge_tl.device.power.base import INPUT_RAILS, NoPower, PowerSample, PowerSampler, PowerUnavailable, total_power
from edge_tl.device.power.energy import WindowPower, integrate_mj, measured_rate_hz, window_power
from edge_tl.device.power.ina3221 import Ina3221Sampler, find_channels
from edge_tl.device.power.select import AUTO_ORDER, KINDS, make_sampler, select_sampler
from edge_tl.device.power.services import JtopSampler, NvmlSampler
from edge_tl.device.power.tegrastats import TegrastatsSample, TegrastatsSampler, parse_tegrastats

__all__ = [
    "AUTO_ORDER", "INPUT_RAILS", "KINDS", "Ina3221Sampler", "JtopSampler", "NoPower", "NvmlSampler",
    "PowerSample", "PowerSampler", "PowerUnavailable", "TegrastatsSample", "TegrastatsSampler", "WindowPower",
    "find_channels", "integrate_mj", "make_sampler", "measured_rate_hz", "parse_tegrastats", "select_sampler",
    "total_power", "window_power",
]
