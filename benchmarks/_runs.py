"""Reading a finished build's run folder (the benchmarks' one way to find a stage's files and its test answers)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from edge_tl.workstation.data import DataSplit

if TYPE_CHECKING:
    from edge_tl.workstation.pipeline.context import Context


def stage_dir(run_dir: Path, name: str) -> Path:
    """The folder of stage ``name`` that the run's ``run.json`` names (a run folder may hold older keys too)."""
    return run_dir / "stages" / f"{name}-{json.loads((run_dir / 'run.json').read_text())['stage_keys'][name]}"


def run_context(run_dir: Path) -> Context:
    """The build context of a finished run, read-only (its spec, data, split and stage folders), to score its
    stages' models again on the run's own decision set, test split or calibration images."""
    from rich.console import Console

    from edge_tl.workstation.pipeline.cache import StageCache
    from edge_tl.workstation.pipeline.context import Context, resolve_data, resolve_weights
    from edge_tl.workstation.spec import load_spec

    spec = load_spec(run_dir / "spec.resolved.toml", {}, {})
    data_root, data_label = resolve_data(spec, run_dir)
    ctx = Context(spec, run_dir, StageCache(run_dir, writer=False), Console(quiet=True), data_root, data_label,
                  *resolve_weights(spec))
    ctx.keys = json.loads((run_dir / "run.json").read_text())["stage_keys"]
    ctx.split = run_split(run_dir)
    return ctx


def run_split(run_dir: Path) -> DataSplit:
    """The train/val/test split the run's data stage drew."""
    return DataSplit.from_json((stage_dir(run_dir, "data") / "split.json").read_text())


def test_right(run_dir: Path, stage: str) -> np.ndarray:
    """Per test image of the run's split, whether stage ``stage``'s model answered it right."""
    return np.load(stage_dir(run_dir, stage) / "test_predictions.npy") == run_split(run_dir).labels("test")


def test_split(run_dir: Path) -> tuple[list[Image.Image], np.ndarray]:
    """The run's test pictures (RGB, in the split's order) and their labels."""
    split = run_split(run_dir)
    images = []
    for p in split.paths("test"):
        with Image.open(p) as img:
            images.append(img.convert("RGB"))
    return images, np.asarray(split.labels("test"))


def demo_run(run_dir: Path) -> Path:
    """A shipped build of the bundled demo (``edge-tl build --seed N``) at ``run_dir``, a folder named ``demo-sN``:
    built there first when the folder does not exist (about 2 minutes on 2 cores): bench_ood, bench_drift and
    bench_calib_method score it, and a fresh machine (``make bench``) has no demo run yet. A folder that exists is
    never built over, and one whose build ran with another seed than its name says is refused (a table row named
    demo-s1 must be seed 1's build)."""
    from edge_tl.workstation.spec import load_spec

    m = re.fullmatch(r"demo-s(\d+)", run_dir.name)
    if (run_dir / "bundle" / "manifest.json").is_file():
        seed = load_spec(run_dir / "spec.resolved.toml", {}, {}).seed
        if m and seed != int(m.group(1)):
            raise SystemExit(f"{run_dir} was built with seed {seed}, not the {m.group(1)} its name says: remove it "
                             "to build it again, or pass the folder of that seed's build")
        return run_dir
    if run_dir.exists():
        raise SystemExit(f"{run_dir} holds no shipped bundle: pass --demo with a finished demo build, or remove the "
                         "folder to build the demo there")
    if not m:
        raise SystemExit(f"{run_dir}: no demo build there, and only a folder named demo-sN (N the seed) is built: "
                         "pass --demo with a finished demo build or such a folder")
    seed = int(m.group(1))
    print(f"no demo build at {run_dir}: building it (edge-tl build --seed {seed})", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-c", "from edge_tl.cli import main; main()", "build", "--out", str(run_dir), "--seed",
           str(seed)]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"the demo build at {run_dir} did not ship; pass --demo with a finished demo build")
    return run_dir
