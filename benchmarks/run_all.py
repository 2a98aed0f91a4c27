"""Run every benchmark in turn (`make bench`); each rewrites its own section of benchmarks/RESULTS.md.

    python benchmarks/run_all.py            # full runs (several hours on 2 cores; bench_photos alone about 45 min)
    python benchmarks/run_all.py --quick    # smoke runs (a few minutes)

They run one after another, never in parallel: on a 2-core machine a second job changes every latency.
Run them on a quiet machine; each section records the machine, thread count and date of its own run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("bench_build.py", "bench_backbones.py", "bench_harness.py", "bench_serve.py", "bench_verify.py",
           "bench_rank.py", "bench_imbalance.py", "bench_ddp.py", "bench_transfer.py", "bench_augment.py",
           "bench_calibration.py", "bench_serve_limits.py", "bench_pareto.py", "bench_recovery.py", "bench_gate.py",
           "bench_signing.py", "bench_drift.py", "bench_capture.py", "bench_continual.py", "bench_loop.py",
           # the real photos (apt-get download gcompris-qt-data); bench_ood and bench_calib_method read bench_photos'
           # runs
           "bench_photos.py", "bench_ood.py", "bench_calib_method.py", "bench_photo_modes.py", "bench_recovery_bn.py",
           "bench_recovery_kd.py", "bench_input_size.py", "bench_lpft.py", "bench_demo_224.py")
# not here: bench_ood_features.py and bench_int8_choice.py, experiments on finished runs (RUN ...): run them alone
#: the scripts with a smoke mode (``--quick``); ``run_all.py --quick`` leaves the others out and says so
QUICK = ("bench_build.py", "bench_backbones.py", "bench_harness.py", "bench_serve.py", "bench_verify.py",
         "bench_rank.py", "bench_imbalance.py", "bench_ddp.py", "bench_transfer.py", "bench_augment.py",
         "bench_calibration.py", "bench_serve_limits.py", "bench_pareto.py", "bench_recovery.py")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke runs")
    ap.add_argument("--only", nargs="+", choices=[s.removesuffix(".py") for s in SCRIPTS], help="run these only")
    args = ap.parse_args()
    failed = []
    for script in SCRIPTS:
        if args.only and script.removesuffix(".py") not in args.only:
            continue
        if args.quick and script not in QUICK:
            print(f"== {script}: no smoke mode, left out of --quick (run it alone: python benchmarks/{script})",
                  flush=True)
            continue
        cmd = [sys.executable, str(HERE / script), *(["--quick"] if args.quick else [])]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"== {script}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
