"""`edge-tl build --nproc 2` (torchrun, DDP over gloo on CPU) on the bundled demo against the single process;
writes the ``build-ddp`` section of benchmarks/RESULTS.md (issue 15 item 2).

- accuracy: the demo at seeds 0-4 with 2 processes (the shipped demo spec, scratch comparison off, as in section
  (d)), against the single-process seed spread recorded in section (d) of RESULTS.md;
- wall time: the whole build and its training (fine-tune + recovery) for ``--nproc 2`` and ``--nproc 1`` at the
  first seed, one after the other on the same machine.

    python benchmarks/bench_ddp.py                    # seeds 0-4 (~15-25 min on 2 busy cores)
    python benchmarks/bench_ddp.py --seeds 0 1        # fewer seeds
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, machine_line, write_section  # noqa: E402
from rich.console import Console  # noqa: E402

from edge_tl.workstation.pipeline.launch import available_cpus, run_build_distributed  # noqa: E402
from edge_tl.workstation.pipeline.run import run_build  # noqa: E402
from edge_tl.workstation.spec import load_spec  # noqa: E402
from edge_tl.workstation.stats import wilson  # noqa: E402

SETTINGS = {"report.compare_scratch": False, "report.latency_iters": 5}  # as section (d)


def recorded_single() -> dict[int, dict[str, float]]:
    """Section (d)'s single-process rows: seed -> fine-tuned / pruned / INT8 (Q/DQ in float) top-1 in %."""
    text = RESULTS.read_text()
    block = text.split("<!-- begin:build-seeds -->", 1)[1].split("<!-- end:build-seeds -->", 1)[0]
    out = {}
    for line in block.splitlines():
        cell = r" \| ([\d.]+)% \([^)]*\)"
        m = re.match(r"\| (\d+)" + cell * 4, line)
        if m:
            out[int(m[1])] = {"finetune": float(m[2]), "prune": float(m[3]), "quantize": float(m[5])}
    return out


def recorded_hash() -> str | None:
    """Section (d)'s sha256 (16 hex digits) of the single-process seed-0 fine-tuned model.pt."""
    m = re.search(r"\| finetune model\.pt \| `([0-9a-f]{16})`", RESULTS.read_text())
    return m[1] if m else None


def build(work: Path, name: str, seed: int, nproc: int, console: Console) -> dict:
    done = work / f"{name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    spec = load_spec(None, {**SETTINGS, "seed": seed})
    start = time.perf_counter()
    if nproc > 1:
        res = run_build_distributed(spec, work / name, nproc, overwrite=True, console=console)
    else:
        res = run_build(spec, work / name, overwrite=True, console=console)
    wall = time.perf_counter() - start
    st = res.stages
    fits = [json.loads(next(res.run_dir.glob(f"stages/{s}-*/fit.json")).read_text()) for s in ("finetune", "prune")]
    import hashlib

    sha = hashlib.sha256(next(res.run_dir.glob("stages/finetune-*/model.pt")).read_bytes()).hexdigest()[:16]
    rec = {"seed": seed, "nproc": nproc, "wall_s": wall, "finetune_sha": sha,
           "train_s": sum(f["seconds"] for f in fits),
           "epochs": [f["epochs_run"] for f in fits], "processes": [f["processes"] for f in fits],
           "test_images": res.stats["test_images"],
           **{k: 100 * st[k]["top1"] for k in ("finetune", "prune", "quantize")}}
    done.write_text(json.dumps(rec, indent=1))
    return rec


def _cell(acc: float, n: int) -> str:
    lo, hi = wilson(round(acc * n / 100), n)
    return f"{acc:.2f}% ({100 * lo:.1f}–{100 * hi:.1f})"


def text(recs: list[dict], single_runs: list[dict], single: dict[int, dict[str, float]], seeds: list[int],
         nproc: int) -> str:
    n = recs[0]["test_images"] if recs else 400
    rows = []
    for r in recs:
        s = single.get(r["seed"], {})
        rows.append(f"| {r['seed']} | {_cell(r['finetune'], n)} | {_cell(r['quantize'], n)} | "
                    + (f"{s['finetune']:.2f}% | {s['quantize']:.2f}% | {r['finetune'] - s['finetune']:+.2f} | "
                       f"{r['quantize'] - s['quantize']:+.2f} |" if s else "- | - | - | - |"))
    lines = [f"## Distributed training: `edge-tl build --nproc {nproc}` against one process "
             "(`benchmarks/bench_ddp.py`, issue 15 item 2)", "", machine_line(), "",
             "The shipped demo spec (scratch comparison off, as in section (d)) built with "
             f"`--nproc {nproc}`: torchrun, "
             f"DistributedDataParallel over gloo, {nproc} CPU processes with 1 thread each, the global batch kept "
             f"(16 = {nproc} x {16 // nproc}), seeds {seeds}. Single-process numbers: section (d) of this file (same "
             f"spec and seeds). Top-1 on the {n} test images with its 95% Wilson interval.", ""]
    if len(recs) < len(seeds):
        lines += [f"**Partial: seeds {[r['seed'] for r in recs]} of {seeds} done.**", ""]
    lines += ["| seed | fine-tuned, 2 processes | INT8 (Q/DQ in float), 2 processes | fine-tuned, 1 process | INT8, "
              "1 process | fine-tuned difference | INT8 difference |", "|---|---|---|---|---|---|---|", *rows, ""]
    paired = [(r, single[r["seed"]]) for r in recs if r["seed"] in single]
    for key, label in (("finetune", "fine-tuned"), ("quantize", "INT8")):
        d = [r[key] for r in recs]
        s = [single[k][key] for k in sorted(single) if k in seeds]
        if d and s:
            inside = sum(min(s) <= v <= max(s) for v in d)
            lines.append(f"- {label}: {nproc} processes mean {sum(d) / len(d):.2f}% (worst seed {min(d):.2f}%, best "
                         f"{max(d):.2f}%); 1 process mean {sum(s) / len(s):.2f}% (worst {min(s):.2f}%, best "
                         f"{max(s):.2f}%). {inside} of {len(d)} seeds inside the single-process seed range "
                         f"[{min(s):.2f}, {max(s):.2f}]; per-seed difference mean "
                         f"{sum(a[key] - b[key] for a, b in paired) / max(len(paired), 1):+.2f} points.")
    lines.append("")
    both = {r["nproc"]: r for r in single_runs}
    if len(both) == 2:
        one, many = both[1], both[nproc]
        ref = single.get(one["seed"], {})
        lines += [f"Wall time at seed {one['seed']}, the two builds run one after the other in fresh run folders "
                  f"(**{available_cpus()} CPU cores shared with other jobs on this machine: the times move with their "
                  "load, read them as one observation, not a speed-up figure**):", "",
                  "| build | whole build (s) | training: fine-tune + recovery (s) | epochs run | fine-tuned | INT8 |",
                  "|---|---|---|---|---|---|",
                  *(f"| `--nproc {r['nproc']}` | {r['wall_s']:.0f} | {r['train_s']:.0f} | "
                    f"{' + '.join(map(str, r['epochs']))} | {r['finetune']:.2f}% | {r['quantize']:.2f}% |"
                    for r in (one, many)), "",
                  f"The single-process seed-{one['seed']} rebuild here scored {one['finetune']:.2f}% / "
                  f"{one['quantize']:.2f}% (section (d) recorded {ref.get('finetune', float('nan')):.2f}% / "
                  f"{ref.get('quantize', float('nan')):.2f}%). One process uses torch's default "
                  f"intra-op threads (one per core); each of the {nproc} processes gets "
                  f"{max(1, available_cpus() // nproc)} (OMP_NUM_THREADS, set by edge-tl build --nproc). "
                  "Export, quantization, latency and the report run in rank 0 alone in both."]
        if one["seed"] == 0 and recorded_hash():
            same = one["finetune_sha"] == recorded_hash()
            lines += ["", "Single process unchanged by this work: the seed-0 fine-tuned `model.pt` rebuilt here has "
                      f"sha256 "
                      f"`{one['finetune_sha']}`, section (d) recorded `{recorded_hash()}`: "
                      + ("identical." if same else "**different**.")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--work", type=Path, help="keep run folders here (a rerun resumes from it)")
    ap.add_argument("--quick", action="store_true", help="smoke run: the first seed only")
    args = ap.parse_args()
    if args.quick:
        args.seeds = args.seeds[:1]
    console = Console(stderr=True)
    single = recorded_single()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    work.mkdir(parents=True, exist_ok=True)
    recs: list[dict] = []
    timing = [build(work, f"single-seed-{args.seeds[0]}", args.seeds[0], 1, console)]
    for seed in args.seeds:
        recs.append(build(work, f"ddp-seed-{seed}", seed, args.nproc, console))
        if seed == args.seeds[0]:
            timing.append(recs[-1])
        write_section("build-ddp", text(recs, timing, single, args.seeds, args.nproc))
    print(f"wrote the build-ddp section of {RESULTS}")


if __name__ == "__main__":
    main()
