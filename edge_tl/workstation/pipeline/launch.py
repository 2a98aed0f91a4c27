"""`edge-tl build --nproc N`: the build under torchrun, N training processes on this machine (docs/distributed.md).

The launcher is torchrun itself (``torch.distributed.run``, called in-process so that a failed rank becomes one
line here instead of torchrun's traceback): ``torchrun --standalone --nproc-per-node N -m
edge_tl.workstation.pipeline.launch ...``. Each rank joins the process group (NCCL on GPUs, gloo on CPU,
:func:`edge_tl.workstation.train.distributed.setup`); rank 0 runs the whole build and is the only writer, the
others train along (:func:`edge_tl.workstation.pipeline.run.follow_build`). A rank that fails writes its one-line
error for this process to report; torchrun then stops the other ranks, and the build exits non-zero with the
stage cache and run folder as a failed single-process build leaves them (finished stages kept, nothing
half-written: every stage is written to a temporary folder and renamed when done).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_write_text
from edge_tl.core.interrupt import sigterm_as_interrupt
from edge_tl.workstation.pipeline.run import BuildResult
from edge_tl.workstation.spec import BuildSpec

WORKER = "edge_tl.workstation.pipeline.launch"


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def check_nproc(nproc: int, spec: BuildSpec) -> str:
    """Refuse a process count this machine (or the spec's batch) cannot take; returns 'cuda' or 'cpu'."""
    import torch

    if nproc < 1:
        raise EdgeTLError(f"--nproc {nproc} is not a number of processes", "pass --nproc 1 (one process) or more")
    t = spec.prune.latency_target
    if nproc > 1 and spec.prune.enabled and t is not None and t.backend == "ort-cpu":
        # every process prunes its own copy: measured latencies differ between them, and so could the networks
        raise EdgeTLError("an ort-cpu latency target is measured by each training process, which could then prune "
                          "different networks", "build with --nproc 1, or use backend = 'table' (deterministic)")
    device = spec.train.device
    if device == "cuda" and not torch.cuda.is_available():
        raise EdgeTLError("train.device is 'cuda' but no CUDA GPU is visible to torch", "use --device auto or cpu")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise EdgeTLError(f"--nproc {nproc} is more than the {gpus} CUDA GPU(s) torch sees (one process per GPU)",
                              f"use --nproc {gpus} or fewer, or --device cpu for CPU processes")
        kind = "cuda"
    else:
        cpus = available_cpus()
        if nproc > cpus:
            raise EdgeTLError(f"--nproc {nproc} is more than the {cpus} CPU core(s) available here",
                              f"use --nproc {cpus} or fewer (one training process per core)")
        kind = "cpu"
    from edge_tl.workstation.train.distributed import per_rank_batch_for

    per_rank_batch_for(spec.train.batch_size, nproc)
    return kind


def run_build_distributed(spec: BuildSpec, out: str | Path, nproc: int, *, overwrite: bool = False,
                          force: list[str] | None = None, console: Console | None = None) -> BuildResult:
    """Run (or resume) the build in ``out`` with ``nproc`` torchrun processes; the same result object as
    :func:`edge_tl.workstation.pipeline.run.run_build`, read from what rank 0 wrote."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    console = console or Console(stderr=True)
    kind = check_nproc(nproc, spec)
    run_dir = Path(out).expanduser().resolve()
    work = Path(tempfile.mkdtemp(prefix="edge-tl-torchrun-"))
    keep = False
    try:
        (work / "spec.json").write_text(spec.model_dump_json())
        (work / "errors").mkdir()
        argv = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
                "--log-dir", str(work / "logs"), "--redirects", ",".join(f"{r}:3" for r in range(1, nproc)),
                "-m", WORKER, "--spec", str(work / "spec.json"), "--out", str(run_dir), "--work", str(work)]
        argv += ["--overwrite"] if overwrite else []
        for stage in force or []:
            argv += ["--force", stage]
        console.print(f"[bold]→[/] training with {nproc} processes (torchrun, DistributedDataParallel over "
                      f"{'NCCL, one GPU each' if kind == 'cuda' else 'gloo on CPU'}); rank 0 writes the build")
        env = {"OMP_NUM_THREADS": str(max(1, available_cpus() // nproc))} if kind == "cpu" else {}
        with _quiet_torchrun(), _environ(env):
            try:
                torchrun.run(torchrun.parse_args(argv))
            except SignalException as exc:  # Ctrl-C or SIGTERM to this process: torchrun stopped the ranks
                raise KeyboardInterrupt from exc
            except ChildFailedError as exc:
                err = _failure(exc, work, run_dir, nproc)
                # no rank said why (its log is all there is), or a bug's traceback: kept for the user to read
                keep = any(w in (err.fix or "") for w in ("see its log", ".traceback.txt"))
                raise err from None
        return _read_result(work / "result.json")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _failure(exc: Any, work: Path, run_dir: Path, nproc: int) -> EdgeTLError:
    """One line for a failed torchrun: the failing rank's own error when it wrote one."""
    reports = {e["rank"]: e for e in (json.loads(f.read_text()) for f in (work / "errors").glob("rank-*.json"))}
    failures = dict(getattr(exc, "failures", None) or {})
    _mark_failed(run_dir)
    # the cause, in this order: a rank's own user error (EdgeTLError); a rank that died without a word (killed,
    # out of memory: any signal but torchrun's SIGTERM, or an exit without a report); a rank's internal error; a
    # rank that only lost its peers (the echo of another's failure at its next collective); torchrun's SIGTERMs
    import signal

    def order(e: dict) -> tuple:
        return (e.get("peer_lost", False), e["exit_code"] == 70, e["time"])

    # stopped by torchrun: its SIGTERM, or that SIGTERM as the worker turns it into an exit (main: 130)
    stopped_codes = {-signal.SIGTERM, 130, 128 + signal.SIGTERM}

    def stopped(r: int) -> bool:
        return failures[r].exitcode in stopped_codes

    reported = sorted(reports.values(), key=order)
    silent = sorted((r for r in failures if r not in reports), key=lambda r: (stopped(r), failures[r].timestamp, r))
    died = [r for r in silent if not stopped(r)]
    user = [e for e in reported if not e.get("peer_lost") and e["exit_code"] != 70]
    errors = user or ([] if died else reported)
    first = died[0] if died else (silent[0] if silent else min(failures, default=0))
    if errors:  # rank 0 runs the build: its errors read as a single process's; another rank's says which
        err = errors[0]
        problem = err["problem"] if err["rank"] == 0 else f"training process rank {err['rank']} of {nproc}: " \
            f"{err['problem']}"
        return EdgeTLError(problem, err.get("fix"), exit_code=err.get("exit_code", 2))
    fail = failures.get(first)
    how = f"exit code {fail.exitcode}" if fail is not None else "an unknown cause"
    if fail is not None and fail.exitcode < 0:
        try:
            how = f"signal {-fail.exitcode} ({signal.Signals(-fail.exitcode).name})"
        except ValueError:
            how = f"signal {-fail.exitcode}"
    return EdgeTLError(f"training process rank {first} of {nproc} stopped with {how}",
                       f"see its log under {work / 'logs'}; --nproc 1 trains in one process")


def _mark_failed(run_dir: Path) -> None:
    """After every rank stopped: a run that rank 0 left 'running' or marked 'interrupted' (torchrun stopped it
    with SIGTERM because another rank failed) is marked failed, and stage folders it was writing are removed;
    the next run resumes from the last stage."""
    import time

    from edge_tl.workstation.pipeline.cache import RunFolder, StageCache

    folder = RunFolder(run_dir)
    state = folder.state
    if state and state.get("status") in ("running", "interrupted"):
        folder.mark("failed", error="a training process failed (see the error printed by edge-tl build)",
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if (run_dir / "stages").is_dir():
        StageCache(run_dir)  # removes .<stage>.partial-* folders


def _read_result(path: Path) -> BuildResult:
    if not path.is_file():
        raise EdgeTLError("the torchrun processes ended without a build result", "run again; --nproc 1 trains in one "
                          "process")
    d = json.loads(path.read_text())
    for key in ("run_dir", "bundle_dir", "tarball", "report"):
        d[key] = Path(d[key])
    d["targets"] = [tuple(t) for t in d["targets"]]
    return BuildResult(**d)


class _quiet_torchrun:  # noqa: N801 - a context manager used like a function
    """torchrun's agent logs every start and, on a failed rank, a traceback: this process prints one line."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("torch.distributed.elastic")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


class _environ:  # noqa: N801
    def __init__(self, values: dict[str, str]):
        self.values = {k: v for k, v in values.items() if k not in os.environ}

    def __enter__(self) -> None:
        os.environ.update(self.values)

    def __exit__(self, *exc: object) -> None:
        for k in self.values:
            os.environ.pop(k, None)


# -- the worker: one per rank, started by torchrun ------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m {WORKER}", description="one rank of edge-tl build --nproc")
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--force", action="append", default=[])
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        from edge_tl.workstation.pipeline.run import follow_build, run_build
        from edge_tl.workstation.train import distributed

        spec = BuildSpec.model_validate_json(args.spec.read_text())
        distributed.setup(spec.train.device)
        if distributed.is_writer():
            with sigterm_as_interrupt():  # torchrun stops the ranks with SIGTERM: run.json says "interrupted"
                res = run_build(spec, args.out, overwrite=args.overwrite, force=args.force,
                                console=Console(stderr=True, highlight=False))
            data = {k: (str(v) if isinstance(v, Path) else v) for k, v in res.__dict__.items()}
            atomic_write_text(args.work / "result.json", json.dumps(data, default=float))
        else:
            follow_build(args.work)
        # every rank leaves together: a rank that tore its process group down while rank 0 still measured
        # latency died in gloo's threads ("terminate called without an active exception", SIGABRT; pytorch
        # PR 179291 describes the teardown race); rank 0 failing instead stops this wait (torchrun stops all)
        distributed.barrier()
        distributed.teardown()
        return 0
    except EdgeTLError as exc:
        _report(args.work, rank, exc.problem, exc.fix, exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: the traceback goes to a file, one line to the launcher
        import traceback

        # not to stderr: rank 0's stderr is the user's terminal (the other ranks' goes to their logs)
        (args.work / "errors").mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.work / "errors" / f"rank-{rank}.traceback.txt", traceback.format_exc())
        if _lost_peer(exc):
            _report(args.work, rank, f"lost contact with the other training processes ({' '.join(str(exc).split())})",
                    "see the other ranks' errors; --nproc 1 trains in one process", 70, peer_lost=True)
        else:
            _report(args.work, rank, f"internal error (a bug in edge-tl): {type(exc).__name__}: {exc}",
                    f"please report it with {args.work / 'errors' / f'rank-{rank}.traceback.txt'} (edge-tl build "
                    "--nproc 1 trains in one process)", 70)
        return 70


def _lost_peer(exc: BaseException) -> bool:
    """A collective that failed because another rank is gone (gloo: "Connection reset by peer", NCCL: a
    DistBackendError), rather than a failure of this rank's own."""
    import torch.distributed

    if isinstance(exc, getattr(torch.distributed, "DistError", ())):  # DistBackendError, DistNetworkError, ...
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(w in text for w in ("gloo", "Connection", "NCCL", "peer", "recv"))


def _report(work: Path, rank: int, problem: str, fix: str | None, exit_code: int, *, peer_lost: bool = False) -> None:
    import time

    atomic_write_text(work / "errors" / f"rank-{rank}.json", json.dumps(
        {"rank": rank, "problem": problem, "fix": fix, "exit_code": exit_code, "time": time.time(),
         "peer_lost": peer_lost}))


def _exit(code: int) -> None:
    """Leave without the interpreter's finalization, where gloo's worker threads can still hold tensors whose
    release needs the GIL being torn down (SIGABRT, pytorch PR 179291): everything this rank writes is written
    atomically before, so only the streams need flushing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
