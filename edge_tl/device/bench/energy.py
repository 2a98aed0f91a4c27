"""Power and energy for a bench run: the idle baseline and, per batch size, the measured windows."""

from __future__ import annotations

from collections.abc import Sequence

from edge_tl.device.bench.schema import PowerInfo, PowerWindow
from edge_tl.device.power import PowerSample, PowerSampler, measured_rate_hz, window_power

MIN_SAMPLES = 5  # fewer samples than this in a window: the energy figure is flagged as weak


def build_power(sampler: PowerSampler, record, cfg, warnings: list[str]) -> PowerInfo:
    """The run-level power block: source, why unavailable/lost, rate, sample count, idle baseline."""
    notes = list(getattr(sampler, "selection_notes", []))
    if not sampler.available:
        return PowerInfo(available=False, source="none", reason=getattr(sampler, "reason", None), notes=notes)
    samples: Sequence[PowerSample] = record.samples
    info = PowerInfo(available=True, source=sampler.kind, requested_rate_hz=sampler.rate_hz,
                     measured_rate_hz=measured_rate_hz(samples), sample_count=len(samples),
                     total_is=sampler.total_source, notes=notes, details=sampler.describe())
    if sampler.lost:
        info.available, info.lost_mid_run, info.reason = False, True, sampler.lost
        warnings.append(f"power unavailable: {sampler.lost}; latency results are complete")
        return info
    if not samples:
        info.available, info.reason = False, f"{sampler.kind} produced no power samples"
        warnings.append(f"power unavailable: {info.reason}")
        return info
    if record.idle_window:
        w = window_power(samples, *record.idle_window)
        if w is not None:
            info.idle_mw, info.idle_seconds, info.idle_sample_count = w.mean_mw, w.duration_s, w.sample_count
            if w.sample_count < MIN_SAMPLES:
                warnings.append(f"idle baseline rests on {w.sample_count} power sample(s): raise --idle-seconds")
    return info


def batch_power(samples: Sequence[PowerSample], windows: Sequence[tuple[int, int]], *, images: int, batch: int,
                idle_mw: float | None, warnings: list[str]) -> PowerWindow | None:
    """Power over all measured windows of one batch size (repeats summed), and energy per inference."""
    parts = [window_power(samples, a, b) for a, b in windows]
    if not parts or any(p is None for p in parts) or images <= 0:
        return None
    duration = sum(p.duration_s for p in parts)
    energy = sum(p.energy_mj for p in parts)
    mean = energy / duration
    count = sum(p.sample_count for p in parts)
    rates = [p.rate_hz for p in parts if p.rate_hz]
    rails = {name: sum(p.rails_mean_mw.get(name, 0.0) * p.duration_s for p in parts) / duration
             for name in sorted({k for p in parts for k in p.rails_mean_mw})}
    coverage = min(p.coverage for p in parts)
    if count < MIN_SAMPLES:
        warnings.append(f"batch {batch}: only {count} power sample(s) in the measured window: run longer "
                        "(--duration) or sample faster (--rate) for a trustworthy energy figure")
    if coverage < 0.95:
        warnings.append(f"batch {batch}: the power trace covers {coverage:.0%} of the measured window")
    above = None if idle_mw is None else mean - idle_mw
    return PowerWindow(sample_count=count, rate_hz=sum(rates) / len(rates) if rates else None, duration_s=duration,
                       coverage=coverage, mean_mw=mean, peak_mw=max(p.peak_mw for p in parts), above_idle_mw=above,
                       rails_mean_mw=rails, energy_mj=energy, energy_per_inference_mj=energy / images,
                       energy_per_inference_above_idle_mj=None if above is None else above * duration / images,
                       energy_per_batch_mj=energy / images * batch)
