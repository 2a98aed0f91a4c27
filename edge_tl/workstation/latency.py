"""Pruning to a latency target: channels ranked by importance per unit of MEASURED latency, not per MAC.

Two sources of per-layer latency, one table format (:mod:`edge_tl.core.latency_table`, docs/latency-table.md):

- ``ort-cpu``: the unpruned model exported to ONNX and profiled with ONNX Runtime on this CPU
  (:func:`ort_profile_table`: ``SessionOptions.enable_profiling``, one intra-op thread by default, the median
  of every node's kernel time over the profiled runs). The ratio search then measures each candidate's
  END-TO-END ONNX Runtime latency (:func:`ort_latency_ms`: the fastest of repeated medians of batch-1 runs)
  and keeps the least-pruned candidate that meets the target.
- ``table``: a TensorRT per-layer profile measured on the Jetson (``edge-tl bench --layer-profile``); the search
  uses the table's prediction (:func:`predict_ms`), deterministic.

How a runtime layer maps to a torch module (:func:`module_ms`): torch's ONNX exporter names nodes by the module
scope (``/features/features.1/conv/conv.0/conv.0.0/Conv`` is module ``features.1.conv.0.0``). A runtime layer
name is split at `` + `` (TensorRT's fused layers); each part that is a Conv/Gemm/MatMul (by its node name, or
by the op type ONNX Runtime reports) is resolved to its module, and a fused part that resolves to another
module (ONNX Runtime renames fused Conv+Clip after the Clip's output) to the last Conv2d/Linear at or before
it in module order. A layer's time is split evenly over the convolutions it holds; layers with none
(reformats, pooling, adds, Myelin ``ForeignNode``s whose members are not listed) are a fixed cost that
pruning does not change.

Latency model of a pruned network: fixed + sum over convolutions of ``ms x (MACs kept / MACs before)``
(per-layer, so layers that are slow per MAC on the device weigh more). Channel importance for ranking:
Torch-Pruning's importance of a channel divided by the latency its removal saves (``ms / channels`` summed over
the layers of its group).

That ranking is one of two (``prune.target.ranking``): ``uniform`` takes the same share of every layer, the share
set by the measured latency. With ``auto`` (the default) the prune stage recovers both and keeps the better on
the decision set: on the demo at 70% of the MACs, the per-ms ranking lost up to 4 points to the uniform share on
some seeds and won 5 on another (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.latency_table import LatencyTable, LayerTime, ModelIdentity, arch_fingerprint

log = logging.getLogger(__name__)

COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "MatMul", "QLinearConv", "ConvInteger", "MatMulInteger", "FusedGemm")
_ORT_SUFFIX = re.compile(r"(_output_\d+.*|_kernel_time|_token_\d+.*)$")


# -- names -> modules ---------------------------------------------------------------------------------------
def resolve_scope(node_name: str, modules: dict[str, nn.Module]) -> tuple[str | None, str]:
    """(module path, op segment) of an exported node name like ``/features/features.1/conv/conv.0/Conv``.

    Each scope segment is relative to one of the modules above it (Sequential children appear as
    ``features.1``, attributes as ``conv``): the longest existing ancestor + segment wins."""
    name = _ORT_SUFFIX.sub("", node_name.strip())
    segs = [s for s in name.split("/") if s]
    if not segs:
        return None, ""
    op = segs[-1]
    path: list[str] = []  # resolved module paths, outermost first
    for seg in segs[:-1]:
        found = None
        for parent in [*reversed(path), ""]:
            cand = f"{parent}.{seg}" if parent else seg
            if cand in modules:
                found = cand
                break
        if found is None:
            break
        path.append(found)
    return (path[-1] if path else None), op


def _is_compute(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Conv2d, nn.Linear))


def module_ms(table: LatencyTable, model: nn.Module) -> tuple[dict[str, float], float]:
    """(ms per Conv2d/Linear module name, fixed ms not attributed to any) of ``table`` on ``model``."""
    modules = dict(model.named_modules())
    order = list(modules)
    pos = {n: i for i, n in enumerate(order)}
    compute = [n for n in order if _is_compute(modules[n])]
    out: dict[str, float] = {}
    fixed = 0.0
    for layer in table.layers:
        convs: list[str] = []
        for part in layer.name.split(" + "):
            path, op = resolve_scope(part, modules)
            is_op = op.split("_")[0] in COMPUTE_OPS or (layer.op in COMPUTE_OPS
                                                       and len(layer.name.split(" + ")) == 1)
            if path is None or not is_op:
                continue
            if not _is_compute(modules[path]):  # a fused node named after its activation: the conv before it
                before = [c for c in compute if pos[c] <= pos[path]]
                if not before:
                    continue
                path = before[-1]
            if path not in convs:
                convs.append(path)
        if convs:
            for c in convs:
                out[c] = out.get(c, 0.0) + layer.ms / len(convs)
        else:
            fixed += layer.ms
    return out, fixed


def conv_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """MACs of every Conv2d / Linear for one input (forward hooks)."""
    macs: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            def conv_hook(m, _inp, out, name=name):
                k = m.kernel_size[0] * m.kernel_size[1]
                macs[name] = int(out.shape[2] * out.shape[3] * k * (m.in_channels // m.groups) * m.out_channels)
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            def lin_hook(m, _inp, _out, name=name):
                macs[name] = int(m.in_features * m.out_features)
            hooks.append(mod.register_forward_hook(lin_hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return macs


@dataclass
class LatencyModel:
    """Per-module milliseconds of the UNPRUNED model and the fixed rest; predicts a pruned copy's latency."""

    ms: dict[str, float]
    fixed_ms: float
    macs0: dict[str, int]
    table: LatencyTable | None = None

    def predict(self, model: nn.Module, example: torch.Tensor) -> float:
        macs = conv_macs(model, example)
        return self.fixed_ms + sum(ms * macs.get(n, 0) / max(self.macs0.get(n, 1), 1) for n, ms in self.ms.items())


def latency_model(table: LatencyTable, model: nn.Module, example: torch.Tensor) -> LatencyModel:
    ms, fixed = module_ms(table, model)
    if not ms:
        raise EdgeTLError(f"no layer of the latency table maps to a convolution of this model "
                          f"({len(table.layers)} layers, e.g. '{table.layers[0].name}')",
                          "profile the ONNX model exported by edge-tl build (its node names carry the module names)")
    return LatencyModel(ms, fixed, conv_macs(model, example), table)


# -- ONNX Runtime measurements ------------------------------------------------------------------------------
def _export(model: nn.Module, path: Path, size: tuple[int, int]) -> Path:
    from edge_tl.workstation.export import export_onnx

    export_onnx(model, path, size, check_against_torch=False)
    return path


def ort_latency_ms(model: nn.Module, size: tuple[int, int], *, threads: int = 1, iters: int = 200,
                   warmup: int = 30, repeats: int = 5) -> float:
    """End-to-end batch-1 latency of ``model`` exported to ONNX, ONNX Runtime CPU (all graph optimisations),
    ``threads`` intra-op threads: the fastest of ``repeats`` medians of ``iters`` runs each (after ``warmup``).

    The fastest, not the median: on a shared machine other work only ever adds time, in bursts (a pareto run
    measured a model at 0.145 ms in one trial and 0.072 ms in the others), and the least disturbed repeat is
    the best estimate of what the model costs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _export(model, Path(tmp) / "m.onnx", size)
        return ort_file_latency_ms(path, size, threads=threads, iters=iters, warmup=warmup, repeats=repeats)


def ort_file_latency_ms(path: Path, size: tuple[int, int], *, threads: int = 1, iters: int = 200, warmup: int = 30,
                        repeats: int = 5) -> float:
    """:func:`ort_latency_ms`'s measurement of an ONNX file (what the ort-cpu latency target is checked with)."""
    from edge_tl.workstation.modelstats import onnx_latency_ms

    meds = [onnx_latency_ms(path, size, iters=iters, warmup=warmup if i == 0 else 5, threads=threads)
            for i in range(max(1, repeats))]
    return float(min(meds))


def ort_profile_table(model: nn.Module, size: tuple[int, int], *, threads: int = 1, iters: int = 200,
                      warmup: int = 20, name: str | None = None) -> LatencyTable:
    """Per-node times of ``model`` (exported to ONNX) from ONNX Runtime's profiler on this CPU, as a table:
    each node's median kernel time over ``iters`` profiled batch-1 runs."""
    import onnxruntime as ort

    from edge_tl.core.fsutil import sha256_file
    from edge_tl.core.host import cpu_name

    h, w = size
    with tempfile.TemporaryDirectory() as tmp:
        path = _export(model, Path(tmp) / "m.onnx", size)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)}
        for _ in range(warmup):
            sess.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(iters):
            sess.run(None, feed)
        log.debug("profiled %d runs in %.2f s", iters, time.perf_counter() - t0)
        events = json.loads(Path(sess.end_profiling()).read_text())
        arch, onnx_sha = arch_fingerprint(path), sha256_file(path)
    runs: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        runs.setdefault(node, []).append(float(e["dur"]) / 1000.0)
        ops[node] = e.get("args", {}).get("op_name", "")
    # the first `warmup` runs of every node are the warm-up: keep the last `iters`
    layers = [LayerTime(name=n, ms=float(statistics.median(v[-iters:])), op=ops[n]) for n, v in runs.items()]
    return LatencyTable(model=ModelIdentity(arch_sha256=arch, onnx_sha256=onnx_sha, name=name,
                                            input_shape=[1, 3, h, w]),
                        backend="ort-cpu", onnxruntime=ort.__version__, device=cpu_name() or "unknown CPU",
                        precision="fp32", statistic="median", iterations=iters, threads=threads,
                        command=[f"onnxruntime {ort.__version__} profiling, CPUExecutionProvider, "
                                 f"intra_op_num_threads={threads}, ORT_ENABLE_ALL"],
                        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), layers=layers)


def onnx_arch_of(model: nn.Module, size: tuple[int, int]) -> str:
    """arch_fingerprint of ``model`` exported the way edge-tl build exports it."""
    with tempfile.TemporaryDirectory() as tmp:
        return arch_fingerprint(_export(model, Path(tmp) / "m.onnx", size))


# -- ranking and search -------------------------------------------------------------------------------------
class LatencyImportance:
    """Torch-Pruning importance divided by the latency a channel's removal saves (ms per channel, summed over
    the group's convolutions). Wraps any Torch-Pruning importance."""

    def __init__(self, base, model: nn.Module, ms: dict[str, float]):
        self.base = base
        self.names = {id(m): n for n, m in model.named_modules()}
        self.ms = ms
        self.floor = 1e-3 * (min((v for v in ms.values() if v > 0), default=1e-6))

    def cost(self, group) -> float:
        seen: set[int] = set()
        cost = 0.0
        for dep, _ in group:
            mod = dep.target.module
            if id(mod) in seen:
                continue
            name = self.names.get(id(mod))
            if name not in self.ms:
                continue
            seen.add(id(mod))
            fn = getattr(dep.handler, "__name__", str(dep.handler))
            if isinstance(mod, nn.Conv2d):
                ch = mod.out_channels if ("out" in fn or mod.groups > 1) else mod.in_channels
            else:
                ch = mod.out_features if "out" in fn else mod.in_features
            cost += self.ms[name] / max(ch, 1)
        return cost

    def __call__(self, group):
        imp = self.base(group)
        if imp is None:
            return None
        return imp / (self.cost(group) + self.floor)


RANKINGS = ("per-ms", "uniform")  # prune.target.ranking = "auto" prunes with both (pipeline.stages.run_prune)


class TargetUnreachable(EdgeTLError):
    """The latency target is below what the most pruned allowed network reaches with one ranking
    (``smallest_ms``): with ``ranking = "auto"`` the other ranking may still reach it."""

    def __init__(self, problem: str, fix: str, smallest_ms: float):
        super().__init__(problem, fix)
        self.smallest_ms = smallest_ms


@dataclass
class LatencyPruneResult:
    model: nn.Module
    target_ms: float
    latency_ms: float  # of the chosen candidate (measured for ort-cpu, predicted for table)
    unpruned_ms: float
    smallest_ms: float | None
    backend: str
    pruning_ratio: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    importance: str
    trials: list[tuple[float, float]] = field(default_factory=list)  # (channel ratio, ms)
    ranking: str = "per-ms"

    def summary(self) -> dict:
        return {"target": "latency", "ranking": self.ranking, "backend": self.backend, "target_ms": self.target_ms,
                "latency_ms": round(self.latency_ms, 5), "unpruned_ms": round(self.unpruned_ms, 5),
                "smallest_ms": None if self.smallest_ms is None else round(self.smallest_ms, 5),
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_removed": round(1 - self.macs_after / self.macs_before, 4) if self.macs_before else 0.0,
                "params_removed": round(1 - self.params_after / self.params_before, 4) if self.params_before else 0.0,
                "channel_ratio": round(self.pruning_ratio, 4), "importance": self.importance,
                "trials": [[r, round(ms, 5)] for r, ms in self.trials]}


def prune_to_latency(model: nn.Module, example: torch.Tensor, target_ms: float, lat: LatencyModel, *,
                     measure: Callable[[nn.Module], float] | None = None, backend: str = "table",
                     round_to: int = 8, importance: str = "lamp", max_layer_ratio: float = 0.75,
                     max_channel_ratio: float = 0.9, max_trials: int = 10, tolerance: float = 0.02,
                     noise: float = 0.02, taylor_batch=None, ranking: str = "per-ms") -> LatencyPruneResult:
    """Prune a copy of ``model`` until its latency is <= ``target_ms``, least pruning that does.

    Measured latencies (``measure``) are noisy: a candidate within ``noise`` above the target meets it (the
    fastest of 5 medians of 200 runs moves by about that much from one measurement to the next; without it the search
    rejected a candidate 0.03% over and kept one 6.5% under). Table predictions are exact: strictly <= target.

    ``measure(model) -> ms`` times a candidate (ort-cpu); without it ``lat.predict`` is used (table).
    ``ranking = "per-ms"``: channels are ranked ACROSS layers by :class:`LatencyImportance` (importance per ms); no
    layer loses more than ``max_layer_ratio`` of its channels (global ranking without a cap leaves 8-channel
    bottlenecks). ``ranking = "uniform"``: every layer loses the same share of its channels (ranked by importance
    within the layer, as a MACs target does), the share set by the latency search. A target below what the most
    pruned allowed network reaches (channel ratio ``max_channel_ratio``, multiples of ``round_to``) is refused
    (:class:`TargetUnreachable`), one above the unpruned latency too.
    """
    import torch_pruning as tp

    from edge_tl.workstation.prune import _ignored_names, _importance, _prune_copy

    if not target_ms > 0:
        raise EdgeTLError(f"latency target {target_ms} ms is not positive", "give prune.target.latency_ms > 0")
    if ranking not in RANKINGS:
        raise EdgeTLError(f"unknown latency ranking '{ranking}'", f"choose one of: {', '.join(RANKINGS)}")
    _importance(importance)
    ignored = _ignored_names(model, None)
    timing = measure or (lambda m: lat.predict(m, example))
    limit = target_ms * (1 + (noise if measure is not None else 0.0))  # what counts as meeting the target
    was = model.training
    trials: list[tuple[float, float]] = []

    def trial(ratio: float) -> tuple[nn.Module, float]:
        if ratio > 0 and ranking == "per-ms":
            m = _prune_copy(model.eval(), example, ratio, ignored, round_to, importance, True, taylor_batch,
                            wrap_importance=lambda imp, copy_: LatencyImportance(imp, copy_, lat.ms),
                            max_pruning_ratio=max_layer_ratio)
        elif ratio > 0:
            m = _prune_copy(model.eval(), example, ratio, ignored, round_to, importance, False, taylor_batch)
        else:
            m = copy.deepcopy(model)
        ms = float(timing(m.eval()))
        trials.append((round(ratio, 5), ms))
        return m, ms

    with torch.no_grad():
        macs0, params0 = (int(v) for v in tp.utils.count_ops_and_params(model.eval(), example))
    _, ms0 = trial(0.0)
    if ms0 <= limit:
        model.train(was)
        raise EdgeTLError(f"the unpruned model already runs in {ms0:.4g} ms ({backend}), within the latency target "
                          f"{target_ms:g} ms", "lower prune.target.latency_ms, or set prune.enabled = false")
    smallest, ms_min = trial(max_channel_ratio)
    if ms_min > limit:
        model.train(was)
        cap = f"at most {max_layer_ratio:.0%} of a layer" if ranking == "per-ms" else "the same share of every layer"
        raise TargetUnreachable(f"latency target {target_ms:g} ms is below the {ms_min:.4g} ms that the smallest "
                                f"allowed network reaches ({backend}, {ranking} ranking; channel ratio "
                                f"{max_channel_ratio}, {cap}, channels multiples of {round_to}, classifier kept)",
                                f"raise prune.target.latency_ms to at least {ms_min:.4g}", ms_min)
    lo, lo_ms, hi, best = 0.0, ms0, max_channel_ratio, (smallest, ms_min)
    for _ in range(max(0, max_trials - 2)):
        if hi - lo <= tolerance:
            break
        # interpolate the latency curve inside the bracket, kept away from its ends
        frac = (lo_ms - target_ms) / max(lo_ms - best[1], 1e-12)
        r = lo + min(0.8, max(0.2, frac)) * (hi - lo)
        m, ms = trial(r)
        if ms <= limit:
            hi, best = r, (m, ms)
            if (target_ms - ms) / target_ms <= tolerance:  # within 2% under (or up to ``noise`` over): done
                break
        else:
            lo, lo_ms = r, ms
    pruned, ms = best
    with torch.no_grad():
        macs1, params1 = (int(v) for v in tp.utils.count_ops_and_params(pruned.eval(), example))
    pruned.train(was)
    model.train(was)
    log.info("pruned to %.4g ms (%s, %s ranking, target %.4g): channel ratio %.3f in %d trials", ms, backend,
             ranking, target_ms, hi, len(trials))
    return LatencyPruneResult(pruned, float(target_ms), ms, ms0, ms_min, backend, hi, macs0, macs1, params0, params1,
                              importance, trials, ranking)


@dataclass
class LatencySource:
    """Where a latency target's numbers come from, set up once per prune stage: the table (loaded and checked,
    or profiled here), the latency model over it, and ``measure`` (ort-cpu: end-to-end ONNX Runtime timing of a
    candidate; None for a table, whose predictions are used)."""

    table: LatencyTable
    lat: LatencyModel
    measure: Callable[[nn.Module], float] | None


def latency_source(model: nn.Module, size: tuple[int, int], target, *, tensorrt: str | None) -> LatencySource:
    """table: the table is validated against this model's architecture and the target's TensorRT; ort-cpu: the
    unpruned model is profiled on this CPU."""
    from edge_tl.core.latency_table import load_table

    if target.backend == "table":
        table = load_table(target.table)
        table.check_for(onnx_arch_of(model, size), tensorrt, str(target.table))
        measure = None
    else:
        table = ort_profile_table(model, size, threads=target.threads)

        def measure(m: nn.Module) -> float:
            return ort_latency_ms(m, size, threads=target.threads)
    return LatencySource(table, latency_model(table, model, torch.zeros(1, 3, *size)), measure)


def prune_for_target(model: nn.Module, size: tuple[int, int], target, *, out: Path, tensorrt: str | None = None,
                     round_to: int = 8, importance: str = "lamp", taylor_batch=None,
                     source: LatencySource | None = None) -> tuple[dict[str, LatencyPruneResult], dict[str, str]]:
    """The prune stage's latency path for a spec's ``prune.target`` (:class:`edge_tl.workstation.spec.PruneTarget`):
    ``({ranking: result}, {ranking: why it was refused})``, one entry per ranking of ``target.ranking`` (auto:
    both of :data:`RANKINGS`). A ranking that cannot reach the target is left out when another can; when none
    can, the refusal naming the lowest reachable latency is raised.

    ``source`` (:func:`latency_source`, set up here with ``tensorrt`` when not given) is shared by every
    ranking, and by every criterion when the caller passes the same one. The table used is written to
    ``out/latency_table.json``."""
    from edge_tl.core.latency_table import write_table

    source = source or latency_source(model, size, target, tensorrt=tensorrt)
    example = torch.zeros(1, 3, *size)
    done: dict[str, LatencyPruneResult] = {}
    refused: dict[str, TargetUnreachable] = {}
    for ranking in RANKINGS if target.ranking == "auto" else (target.ranking,):
        try:
            done[ranking] = prune_to_latency(model, example, float(target.latency_ms), source.lat,
                                             measure=source.measure, backend=target.backend, round_to=round_to,
                                             importance=importance, taylor_batch=taylor_batch, ranking=ranking)
        except TargetUnreachable as exc:
            refused[ranking] = exc
    if not done:
        raise min(refused.values(), key=lambda e: e.smallest_ms)
    write_table(source.table, out / "latency_table.json")
    return done, {k: str(e) for k, e in refused.items()}
