"""`edge-tl build --nproc N`: the build under the real torchrun with DistributedDataParallel over gloo, two CPU
processes, through the CLI as a user runs it (issue 15 item 2). The accuracy against the single-process seed
spread of the full demo is measured by ``benchmarks/bench_build.py --only ddp`` (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from edge_tl.core.bundle import Bundle

pytest.importorskip("torch", reason="the workstation extra (torch) is not installed")

from test_build_e2e import EDGE_TL, SMALL, edge_tl  # noqa: E402

#: DDP over gloo runs CPU processes: said, so that a machine where torch sees a GPU (train.device = "auto" picks
#: CUDA) runs these tests as written instead of refusing "--nproc 2 is more than the 1 CUDA GPU(s)" (issue 23)
CPU = ["--device", "cpu"]

WORKER = "edge_tl.workstation.pipeline.launch"


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return " ".join(proc.stderr.split("error:", 1)[1].split())


@pytest.fixture(scope="module")
def ddp_built(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("ddp") / "run"
    proc = edge_tl("build", "--out", str(run), "--nproc", "2", *CPU, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


@pytest.mark.slow
def test_two_gloo_processes_build_a_valid_bundle(ddp_built):
    run, proc = ddp_built
    assert "training with 2 processes (torchrun, DistributedDataParallel over gloo on CPU)" in proc.stderr
    assert "Traceback" not in proc.stderr and "bundle:" in proc.stdout
    b = Bundle.open(run / "bundle")
    b.verify()
    Bundle.open(run / "bundle.tar.gz").verify()
    m = b.manifest
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "done" and state["bundle_id"] == m.bundle_id
    assert m.build["training_processes"] == 2
    for stage in ("finetune", "prune"):  # both training loops ran in 2 processes, on CPU
        fit = json.loads(next(run.glob(f"stages/{stage}-*/fit.json")).read_text())
        assert fit["processes"] == 2 and fit["device"] == "cpu"
        assert fit["epochs_run"] == len(fit["history"]) > 0
    ft, pr, q = m.stages["finetune"], m.stages["prune"], m.stages["quantize"]
    assert ft.chance_check["passed"] and pr.chance_check["passed"]  # it learned (chance is 0.2)
    assert ft.top1 > 0.4 and q.top1 is not None and q.top1 > 0.4
    # one writer: no stage folder half-written, nothing else in the cache
    assert not list((run / "stages").glob(".*")) and sorted(p.name.split("-")[0] for p in (run / "stages").iterdir()) \
        == ["data", "export", "finetune", "prune", "qat", "quantize"]
    # a resumed / repeated build in 2 processes reuses what rank 0 cached
    again = edge_tl("build", "--out", str(run), "--nproc", "2", "--overwrite", *CPU, *SMALL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stages run: none" in again.stdout


def _rank_pid(rank: int, tmp: Path) -> int | None:
    """The pid of this test's own rank: its environment holds the test's TMPDIR (another build's ranks on the
    same machine, e.g. a benchmark, must never be touched)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if WORKER.encode() in cmd and f"RANK={rank}".encode() in env and f"TMPDIR={tmp}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_build_in_one_line(tmp_path):
    """Rank 1 killed in the middle of training (as the OOM killer would): the build exits non-zero with one
    line, the run is marked failed, no bundle and no half-written stage folder; the next run resumes."""
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    build = subprocess.Popen([*EDGE_TL, "build", "--out", str(run), "--nproc", "2", *CPU, *SMALL], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp)})
    deadline, pid = time.monotonic() + 240, None
    while time.monotonic() < deadline and build.poll() is None:
        pid = _rank_pid(1, tmp)
        if pid and list((run / "stages").glob("data-*")):  # the data stage is written: training starts
            time.sleep(1.5)
            break
        time.sleep(0.2)
    assert pid, "rank 1 never started"
    os.kill(pid, signal.SIGKILL)
    out, err = build.communicate(timeout=240)
    proc = subprocess.CompletedProcess(build.args, build.returncode, out, err)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc)
    assert line.startswith("training process rank 1 of 2 stopped with signal 9 (SIGKILL); see its log under "), line
    assert Path(line.split("see its log under ")[1].split(";")[0]).is_dir()  # kept: the rank said nothing else
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "failed"
    assert not (run / "bundle").exists() and not (run / "bundle.tar.gz").exists()
    assert not list((run / "stages").glob(".*")) and not list((run / "stages").glob("finetune-*"))


@pytest.mark.parametrize(("args", "message"), [
    (["--nproc", "1000"], "--nproc 1000 is more than the"),
    (["--nproc", "0"], "--nproc 0 is not a number of processes; pass --nproc 1 (one process) or more"),
    (["--nproc", "2", "--batch-size", "15"],
     "train.batch_size 15 does not split evenly over 2 processes; choose a batch size divisible by 2"),
])
def test_bad_nproc_is_one_line_and_touches_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    proc = edge_tl("build", "--out", str(out), *args, *CPU, timeout=120)
    assert proc.returncode == 2
    assert message in _one_error_line(proc)
    assert not out.exists()


def test_nproc_more_than_the_cpus_names_the_fix(tmp_path):
    from edge_tl.workstation.pipeline.launch import available_cpus

    n = available_cpus()
    proc = edge_tl("build", "--out", str(tmp_path / "run"), "--nproc", str(n + 1), "--device", "cpu", timeout=120)
    assert proc.returncode == 2
    assert _one_error_line(proc) == (f"--nproc {n + 1} is more than the {n} CPU core(s) available here; use --nproc "
                                     f"{n} or fewer (one training process per core)")


def test_nproc_with_a_measured_latency_target_is_refused(tmp_path):
    """Every process prunes its own copy: with an ort-cpu latency target each would time its own candidates and
    could keep another network, and DistributedDataParallel needs one. One line, nothing written."""
    spec = tmp_path / "spec.toml"
    spec.write_text('[prune]\ntarget = {latency_ms = 0.1, backend = "ort-cpu"}\n')
    out = tmp_path / "run"
    proc = edge_tl("build", str(spec), "--out", str(out), "--nproc", "2", "--device", "cpu", timeout=120)
    assert proc.returncode == 2
    assert _one_error_line(proc) == ("an ort-cpu latency target is measured by each training process, which could "
                                     "then prune different networks; build with --nproc 1, or use backend = 'table' "
                                     "(deterministic)")
    assert not out.exists()


def test_nproc_on_cuda_without_a_gpu_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the refusal is for machines without one")
    proc = edge_tl("build", "--out", str(tmp_path / "run"), "--nproc", "2", "--device", "cuda", timeout=120)
    assert proc.returncode == 2
    assert _one_error_line(proc).startswith("train.device is 'cuda' but no CUDA GPU is visible to torch")


def test_a_balanced_sampler_is_shared_out_over_the_ranks():
    """train.balance = "sampler" under torchrun: every rank draws the same weighted order from its own copy of
    the sampler (seeded alike) and keeps every N-th index, padded so that all ranks step the same number of times."""
    import numpy as np

    from edge_tl.workstation.train.balance import make_sampler
    from edge_tl.workstation.train.distributed import ShardedSampler

    labels = np.array([0] * 40 + [1] * 7 + [2] * 4)
    whole = list(make_sampler(labels, 3, seed=5))
    for n in (2, 3, 4):
        shards = [list(ShardedSampler(make_sampler(labels, 3, seed=5), n, r)) for r in range(n)]
        assert {len(s) for s in shards} == {-(-len(whole) // n)}
        padded = whole + whole[:n * len(shards[0]) - len(whole)]
        assert [i for step in zip(*shards, strict=True) for i in step] == padded


def test_a_killed_rank_is_blamed_not_rank_0_stopped_in_the_same_second(tmp_path):
    """torchrun can see rank 0 already gone when it polls (its SIGTERM turned into exit 130 by the worker) with the
    same one-second timestamp as the rank that was killed: the killed one is the cause (a CI run blamed rank 0)."""
    from types import SimpleNamespace

    from edge_tl.workstation.pipeline import launch

    run = tmp_path / "run"
    run.mkdir()
    failures = {0: SimpleNamespace(exitcode=130, timestamp=1000), 1: SimpleNamespace(exitcode=-9, timestamp=1000)}
    err = launch._failure(SimpleNamespace(failures=failures), tmp_path / "work", run, 2)
    assert err.problem == "training process rank 1 of 2 stopped with signal 9 (SIGKILL)"
    failures = {0: SimpleNamespace(exitcode=130, timestamp=1000), 1: SimpleNamespace(exitcode=-15, timestamp=999)}
    err = launch._failure(SimpleNamespace(failures=failures), tmp_path / "work", run, 2)
    assert err.problem == "training process rank 1 of 2 stopped with signal 15 (SIGTERM)"  # nothing died: the first
