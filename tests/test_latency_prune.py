"""Pruning to a latency target (issue 13 item 3): the latency table format, `edge-tl bench --layer-profile` through
a stand-in trtexec that enforces the real --exportProfile format, table-driven channel selection (deterministic),
the ONNX Runtime CPU path for behaviour only (it measures and records; no numbers asserted: CPU speed varies),
and the one-line refusals. Nothing here times anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="pruning is part of the workstation stack (torch)")
torchvision = pytest.importorskip("torchvision", reason="pruning is part of the workstation stack")
pytest.importorskip("torch_pruning", reason="pruning needs torch-pruning")

from edge_tl.core.errors import EdgeTLError  # noqa: E402
from edge_tl.core.latency_table import LatencyTable, LayerTime, ModelIdentity, arch_fingerprint, load_table  # noqa: E402
from edge_tl.device.bench.layer_profile import parse_export_profile  # noqa: E402
from edge_tl.workstation.export import export_onnx  # noqa: E402
from edge_tl.workstation.latency import (  # noqa: E402
    latency_model,
    module_ms,
    ort_profile_table,
    prune_for_target,
    prune_to_latency,
    resolve_scope,
)
from edge_tl.workstation.prune import prune_to_macs  # noqa: E402
from edge_tl.workstation.spec import PruneTarget  # noqa: E402

DATA = Path(__file__).parent / "data"
SIZE = (32, 32)


def make() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(num_classes=5).eval()


@pytest.fixture(scope="module")
def model_onnx(tmp_path_factory):
    m = make()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(m, path, SIZE, check_against_torch=False)
    return m, path



def _profile(model_onnx, fake_trtexec, tmp_path, env_extra=None) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "table.json"
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", "from edge_tl.cli import main; main()", "bench", str(model_onnx[1]),
                           "--layer-profile", str(out), "--trtexec", str(fake_trtexec), "--precision", "fp16"],
                          capture_output=True, text=True, env=env, timeout=120)
    return proc, out


def test_recorded_export_profile_parses():
    count, layers, stat = parse_export_profile((DATA / "trtexec" / "profile_trt_cbr.json").read_text())
    assert (count, stat) == (41400, "median")
    assert [(x.name, x.ms) for x in layers] == [("/conv1/Conv + /act1/Relu", 0.027872)]
    with pytest.raises(EdgeTLError, match="not a trtexec profile"):
        parse_export_profile('{"name": "x"}')


def test_every_exported_conv_maps_to_its_module(model_onnx):
    import onnx

    m, path = model_onnx
    modules = dict(m.named_modules())
    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "Gemm")]
    resolved = [resolve_scope(n.name, modules)[0] for n in convs]
    assert resolved == [n for n, x in m.named_modules() if isinstance(x, (torch.nn.Conv2d, torch.nn.Linear))]


def test_layer_profile_cli_writes_a_valid_table_that_drives_pruning(model_onnx, fake_trtexec, tmp_path):
    m, path = model_onnx
    proc, out = _profile(model_onnx, fake_trtexec, tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = load_table(out)
    assert table.backend == "tensorrt" and table.tensorrt == "8.5.2" and table.precision == "fp16"
    assert table.model.arch_sha256 == arch_fingerprint(path) and table.model.input_shape == [1, 3, 32, 32]
    assert "--separateProfileRun" in table.command and any(a.startswith("--exportProfile=") for a in table.command)
    ms, fixed = module_ms(table, m)
    n_compute = sum(isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)) for x in m.modules())
    assert len(ms) == n_compute and fixed > 0  # every conv has a time; pooling/adds/flatten are the fixed rest
    assert abs(sum(ms.values()) + fixed - table.total_ms()) < 1e-9

    target = PruneTarget(latency_ms=0.6 * table.total_ms(), backend="table", table=str(out))
    got, refused = prune_for_target(m, SIZE, target, tensorrt="8.5.2", out=tmp_path)
    assert set(got) == {"per-ms", "uniform"} and not refused  # ranking = "auto": both candidates
    for ranking, res in got.items():
        assert res.ranking == ranking and res.summary()["ranking"] == ranking
        assert 0.9 * target.latency_ms <= res.latency_ms <= target.latency_ms  # the table's prediction, within 10%
        assert res.unpruned_ms == pytest.approx(table.total_ms())
        for name, mod in res.model.named_modules():
            if isinstance(mod, torch.nn.Conv2d) and name != "features.0.0":
                assert mod.out_channels % 8 == 0, name
        assert res.model.classifier[1].out_features == 5
    assert load_table(tmp_path / "latency_table.json") == table  # the table used is recorded

    # a table from another TensorRT than the build's target, and one from another architecture: one line each
    with pytest.raises(EdgeTLError, match="TensorRT 8.5.2; this build targets TensorRT 10.3") as e:
        prune_for_target(m, SIZE, target, tensorrt="10.3", out=tmp_path / "x")
    assert "layer-profile" in e.value.fix
    other = torchvision.models.mobilenet_v2(num_classes=7)
    with pytest.raises(EdgeTLError, match="another model") as e:
        prune_for_target(other, SIZE, target, tensorrt="8.5.2", out=tmp_path / "y")
    assert "prune.enabled = false" in e.value.fix
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _synthetic_table(m, path, hot: str, factor: float) -> LatencyTable:
    """Every Conv/Gemm 1 us per 1000 weights; ``hot`` ``factor`` times slower per MAC (a layer the device runs
    badly): a deterministic input for the selection."""
    import onnx

    proto = onnx.load(str(path))
    sizes = {i.name: int(torch.tensor(i.dims).prod()) if i.dims else 1 for i in proto.graph.initializer}
    layers = []
    modules = dict(m.named_modules())
    for n in proto.graph.node:
        w = sum(sizes.get(x, 0) for x in n.input)
        ms = 1e-6 * w + 0.001
        if resolve_scope(n.name, modules)[0] == hot:
            ms *= factor
        layers.append(LayerTime(name=n.name, ms=ms))
    return LatencyTable(model=ModelIdentity(arch_sha256=arch_fingerprint(path), input_shape=[1, 3, 32, 32]),
                        backend="tensorrt", tensorrt="10.3.0", device="test table", precision="fp16",
                        iterations=1, layers=layers)


def test_latency_target_prunes_the_slow_layer_harder_than_macs_target(model_onnx):
    m, path = model_onnx
    hot = "features.17.conv.0.0"  # the last block's 1x1 expansion
    table = _synthetic_table(m, path, hot, 20.0)
    ex = torch.zeros(1, 3, *SIZE)
    lat = latency_model(table, m, ex)
    by_lat = prune_to_latency(m, ex, 0.7 * table.total_ms(), lat)
    by_macs = prune_to_macs(m, ex, 1 - by_lat.macs_after / by_lat.macs_before, max_trials=3)
    kept = {name: dict(x.named_modules())[hot].out_channels for name, x in (("lat", by_lat.model),
                                                                             ("macs", by_macs.model))}
    assert kept["lat"] < kept["macs"]  # importance per unit of latency removes the slow layer's channels first
    assert lat.predict(by_lat.model, ex) <= 0.7 * table.total_ms() < lat.predict(by_macs.model, ex)
    assert by_lat.latency_ms >= 0.9 * 0.7 * table.total_ms()


def test_uniform_ranking_takes_the_same_share_of_every_layer(model_onnx):
    """ranking = "uniform": the latency search sets one share for every layer (a MACs target's structure), so the
    slow layer keeps the share every other layer keeps, where per-ms strips it; both meet the table's target."""
    m, path = model_onnx
    hot = "features.17.conv.0.0"
    table = _synthetic_table(m, path, hot, 20.0)
    ex = torch.zeros(1, 3, *SIZE)
    lat = latency_model(table, m, ex)
    goal = 0.7 * table.total_ms()
    uni = prune_to_latency(m, ex, goal, lat, ranking="uniform")
    per_ms = prune_to_latency(m, ex, goal, lat, ranking="per-ms")
    assert lat.predict(uni.model, ex) <= goal and lat.predict(per_ms.model, ex) <= goal
    before = {n: c.out_channels for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d) and c.groups == 1}

    def kept(res):
        mods = dict(res.model.named_modules())
        return {n: mods[n].out_channels / before[n] for n in before if before[n] >= 64}

    shares = kept(uni)
    # one share for all (rounding to multiples of 8 moves each layer by < 8 channels)
    assert max(shares.values()) - min(shares.values()) <= 8 / 64 + 1e-9
    assert kept(per_ms)[hot] < shares[hot]  # per-ms takes the slow layer's channels first
    with pytest.raises(EdgeTLError, match="unknown latency ranking"):
        prune_to_latency(m, ex, goal, lat, ranking="per-mac")


def test_auto_keeps_the_ranking_that_reaches_a_target_the_other_cannot(model_onnx, tmp_path):
    """The uniform share goes down to 10% of every layer; per-ms stops at 75% of a layer. A target between the
    two smallest networks: per-ms is refused and recorded, uniform is kept. Below both: the refusal names the lower
    of the two reachable latencies."""
    from edge_tl.core.latency_table import write_table
    from edge_tl.workstation.latency import TargetUnreachable

    m, path = model_onnx
    table = _synthetic_table(m, path, "", 1.0)
    write_table(table, tmp_path / "t.json")
    ex = torch.zeros(1, 3, *SIZE)
    lat = latency_model(table, m, ex)
    smallest = {}
    for ranking in ("per-ms", "uniform"):
        with pytest.raises(TargetUnreachable) as e:
            prune_to_latency(m, ex, 0.01 * table.total_ms(), lat, ranking=ranking)
        smallest[ranking] = e.value.smallest_ms
    assert smallest["uniform"] < smallest["per-ms"]
    tbl = str(tmp_path / "t.json")
    mid = PruneTarget(latency_ms=(smallest["uniform"] + smallest["per-ms"]) / 2, backend="table", table=tbl)
    got, refused = prune_for_target(m, SIZE, mid, tensorrt="10.3", out=tmp_path / "mid")
    assert set(got) == {"uniform"} and set(refused) == {"per-ms"} and "smallest allowed network" in refused["per-ms"]
    low = PruneTarget(latency_ms=0.5 * smallest["uniform"], backend="table", table=tbl)
    with pytest.raises(EdgeTLError, match="uniform ranking") as e:
        prune_for_target(m, SIZE, low, tensorrt="10.3", out=tmp_path / "low")
    assert f"{smallest['uniform']:.4g}" in e.value.fix
    assert not (tmp_path / "low").exists()
    only = PruneTarget(latency_ms=mid.latency_ms, backend="table", table=tbl, ranking="per-ms")
    with pytest.raises(EdgeTLError, match="per-ms ranking"):  # asked for per-ms: no other ranking stands in
        prune_for_target(m, SIZE, only, tensorrt="10.3", out=tmp_path / "only")


def test_latency_target_below_the_smallest_network_is_refused(model_onnx):
    m, path = model_onnx
    table = _synthetic_table(m, path, "", 1.0)
    ex = torch.zeros(1, 3, *SIZE)
    with pytest.raises(EdgeTLError, match="below the .* ms that the smallest allowed network reaches") as e:
        prune_to_latency(m, ex, 0.01 * table.total_ms(), latency_model(table, m, ex))
    assert "raise prune.target.latency_ms to at least" in e.value.fix
    with pytest.raises(EdgeTLError, match="already runs in"):
        prune_to_latency(m, ex, 2 * table.total_ms(), latency_model(table, m, ex))


def test_ort_cpu_backend_measures_and_records(tmp_path):
    """Behaviour only: ONNX Runtime profiles every node of the export on this CPU, the table says how; a target
    no CPU can reach is refused after measuring, and nothing is written."""
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                               torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 4)).eval()
    table = ort_profile_table(tiny, (16, 16), iters=5, warmup=2)
    assert table.backend == "ort-cpu" and table.threads == 1 and table.statistic == "median" and table.iterations == 5
    assert all(x.ms >= 0 for x in table.layers)
    ms, _ = module_ms(table, tiny)
    assert set(ms) == {"0", "3", "7"}  # both convs (fused with their activations) and the classifier
    LatencyTable.model_validate(json.loads(table.model_dump_json()))  # round-trips through the format
    target = PruneTarget(latency_ms=1e-6, backend="ort-cpu")
    with pytest.raises(EdgeTLError, match="smallest allowed network"):
        prune_for_target(tiny, (16, 16), target, tensorrt=None, out=tmp_path / "stage")
    assert not (tmp_path / "stage").exists()


def test_spec_targets():
    from edge_tl.workstation.spec import load_spec, to_toml

    s = load_spec(None, {"prune.target": {"latency_ms": 0.2, "backend": "ort-cpu"}})
    assert s.prune.latency_target.latency_ms == 0.2
    assert "target = {latency_ms = 0.2, backend = \"ort-cpu\", threads = 1, ranking = \"auto\"}" in to_toml(s)
    assert load_spec(None, {"prune.target": {"macs": 0.6}}).prune.macs_ratio == 0.6
    assert s.prune.latency_target.ranking == "auto"
    for bad, msg in [({"macs": 0.5, "latency_ms": 1.0}, "exactly one"), ({"latency_ms": 1.0, "backend": "table"},
                     "needs table"), ({"latency_ms": 1.0, "table": "t.json"}, "only read with backend"),
                     ({"macs": 0.5, "ranking": "per-ms"}, "ranking applies to a latency_ms target"),
                     ({"latency_ms": 1.0, "ranking": "fastest"}, "ranking")]:
        with pytest.raises(EdgeTLError, match=msg):
            load_spec(None, {"prune.target": bad})


def test_missing_or_malformed_table_fails_before_any_stage(tmp_path):
    from rich.console import Console

    from edge_tl.workstation.pipeline.run import run_build
    from edge_tl.workstation.spec import load_spec

    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"format": "edge-tl-latency-table/1", "layers": []}))
    for table, msg in [(tmp_path / "missing.json", "does not exist"), (bad, "latency table .*t.json: model")]:
        spec = load_spec(None, {"prune.target": {"latency_ms": 1.0, "backend": "table", "table": str(table)}})
        with pytest.raises(EdgeTLError, match=msg):
            run_build(spec, tmp_path / "run", console=Console(quiet=True))
        assert not list((tmp_path / "run").glob("stages/*"))


def test_report_checks_the_latency_target_instead_of_the_macs_share():
    from edge_tl.workstation.pipeline.report import target_checks

    stages = {"finetune": {"top1": 0.9, "macs": 100}, "export": {"top1": 0.9}, "quantize": {"top1": 0.9},
              "prune": {"enabled": True, "top1": 0.9, "macs": 80, "target": "latency", "backend": "ort-cpu",
                        "target_ms": 0.2, "latency_ms": 0.19, "macs_removed": 0.2}}
    checks = {w: (m, v) for w, m, v in target_checks(stages, {"finetune": 1.0, "quantize": 0.1}, None)}
    assert checks["pruned model meets the latency target (0.2 ms, ort-cpu)"] == \
        ("0.19 ms (measured; 20.0% of the MACs removed)", "met")
    assert not any("50% of the MACs" in w for w in checks)
    stages["prune"]["latency_ms"] = 0.25
    assert dict((w, v) for w, _, v in target_checks(stages, {"finetune": 1.0, "quantize": 0.1}, None))[
        "pruned model meets the latency target (0.2 ms, ort-cpu)"] == "missed"


def test_layer_profile_without_trtexec_names_a_fix_that_exists(model_onnx, tmp_path):
    """Issue 24: the error suggested --via api, which bench does not have (only trtexec writes this profile)."""
    proc = subprocess.run([sys.executable, "-c", "from edge_tl.cli import main; main()", "bench", str(model_onnx[1]),
                           "--layer-profile", str(tmp_path / "t.json")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": str(tmp_path), "EDGE_TL_TRTEXEC": ""})
    assert proc.returncode == 2 and "trtexec was not found" in proc.stderr, proc.stderr
    assert "--via" not in proc.stderr and "--trtexec" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "t.json").exists()
