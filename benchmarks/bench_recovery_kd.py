"""How the recovery after pruning is taught at 224 px on a hundred photos (issue 23 item 3 / targets). Writes the
``recovery-kd`` section of benchmarks/RESULTS.md.

From the fine-tuned run folders of the photo benchmark (ImageNet Lite0, benchmarks/bench_photos.py): the build's
own pruning (L1, 40% of the MACs) and BatchNorm re-estimation, then one recovery per variant from the same pruned
network (BatchNorm trained, lr 1e-3 unless said, cosine, the last epoch kept), distilled from the unpruned model:

- ``ce+kd``: 0.3 x cross-entropy + 0.7 x distillation on the augmented photos (the recipe until now);
- ``kd+mixup``: distillation only, on mixup blends of the augmented photos (Beyer et al. 2022, function matching);
- ``ce+kd+mixup``: the blend of both;
- ``ce+kd, backbone lr 1e-4 / 3e-4``: the recipe with the backbone at a lower rate than the head (the fine-tune
  trained it at 1e-4; 1e-3 on a hundred photos may wash out what ImageNet taught the kept channels).

Each is scored on the validation and test photos together (the pruning cost is paired against the fine-tuned
model on the same images) and pooled over the seeds.

    python benchmarks/bench_recovery_kd.py [--seeds 0 1 2 3] [--epochs 15] [--variants ...]   # ~3 min a recovery
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from rich.console import Console  # noqa: E402

from edge_tl.workstation.data import DataSplit  # noqa: E402
from edge_tl.workstation.pipeline.cache import StageCache  # noqa: E402
from edge_tl.workstation.pipeline.context import Context  # noqa: E402
from edge_tl.workstation.prune import prune_to_macs  # noqa: E402
from edge_tl.workstation.spec import load_spec  # noqa: E402
from edge_tl.workstation.stats import paired  # noqa: E402
from edge_tl.workstation.train import Phase, evaluate, fit, load_state, recalibrate_bn  # noqa: E402

#: name: (fit keyword arguments, (lr of the head, lr of the backbone))
VARIANTS = {"ce+kd": (dict(distill_weight=0.7, mixup=0.0), (1e-3, 1e-3)),
            "kd+mixup": (dict(distill_weight=1.0, mixup=1.0), (1e-3, 1e-3)),
            "ce+kd+mixup": (dict(distill_weight=0.7, mixup=1.0), (1e-3, 1e-3)),
            "ce+kd, backbone lr 1e-4": (dict(distill_weight=0.7, mixup=0.0), (1e-3, 1e-4)),
            "ce+kd, backbone lr 3e-4": (dict(distill_weight=0.7, mixup=0.0), (1e-3, 3e-4))}
ROOT = Path("/tmp/edge-tl-bench-photos")
CACHE = ROOT / "recovery-kd.json"


def _context(run: Path) -> Context:
    keys = json.loads((run / "run.json").read_text())["stage_keys"]
    spec = load_spec(run / "spec.resolved.toml")
    ctx = Context(spec, run, StageCache(run, writer=False), Console(quiet=True), Path(spec.data.root), "photos",
                  spec.model.weights, spec.model.weights)
    ctx.keys = keys
    ctx.split = DataSplit.from_json((ctx.folder("data") / "split.json").read_text())
    return ctx


def one_seed(seed: int, variants: list[str], epochs: int, done: dict) -> None:
    ctx = _context(ROOT / f"s{seed}-imagenet")
    spec = ctx.spec
    parent = load_state(spec.model.backbone, len(ctx.classes), ctx.folder("finetune") / "model.pt").eval()
    val, test = ctx.arrays("val"), ctx.arrays("test")
    held = (np.concatenate([val[0], test[0]]), np.concatenate([val[1], test[1]]))
    res = prune_to_macs(copy.deepcopy(parent), torch.zeros(1, 3, *ctx.size), target_macs_ratio=0.4, round_to=8,
                        importance="l1")
    pruned = res.model.eval()
    recalibrate_bn(pruned, ctx.train_dataset(), batch_size=32, seed=spec.seed, device="cpu")
    pruned = pruned.cpu().eval()
    y = held[1]
    done.setdefault(str(seed), {})["finetune"] = (evaluate(parent, *held)[2] == y).astype(int).tolist()
    for name in variants:
        key = f"{name}@{epochs}"
        if key in done[str(seed)]:
            continue
        net = copy.deepcopy(pruned)
        t0 = time.perf_counter()
        kwargs, (lr_head, lr_body) = VARIANTS[name]
        fit(net, spec.model.backbone, ctx.train_dataset(), val,
            [Phase("recovery", epochs, lr_head, lr_body, train_bn=True, early_stop=False)], batch_size=32,
            teacher=parent, distill_temperature=4.0, keep="last", device="cpu", seed=seed, label=key, **kwargs)
        net = net.cpu().eval()
        done[str(seed)][key] = (evaluate(net, *held)[2] == y).astype(int).tolist()
        done[str(seed)][key + ":s"] = round(time.perf_counter() - t0, 1)
        CACHE.write_text(json.dumps(done))
        print(f"seed {seed} {key}: {100 * np.mean(done[str(seed)][key]):.1f}% "
              f"(fine-tuned {100 * np.mean(done[str(seed)]['finetune']):.1f}%)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    a = ap.parse_args()
    done = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    for seed in a.seeds:
        one_seed(seed, a.variants, a.epochs, done)
    rows = []
    shown = [v for v in VARIANTS if any(f"{v}@{a.epochs}" in done.get(str(s), {}) for s in a.seeds)]
    for name in shown:  # every variant measured on any of these seeds (one left out on a seed says "not run")
        key = f"{name}@{a.epochs}"
        cells, ft, pr = [], [], []
        for seed in a.seeds:
            d = done[str(seed)]
            if key not in d:
                cells.append("not run")
                continue
            f, p = np.asarray(d["finetune"]), np.asarray(d[key])
            ft.append(f)
            pr.append(p)
            c = paired(f, p)
            cells.append(f"{100 * p.mean():.1f}% ({c.diff_points:+.1f} [{c.ci_points[0]:+.1f}, {c.ci_points[1]:+.1f}])")
        pooled = paired(np.concatenate(ft), np.concatenate(pr))
        secs = np.mean([done[str(s)][key + ":s"] for s in a.seeds if key in done[str(s)]])
        lo, hi = pooled.ci_points
        over = "" if len(pr) == len(a.seeds) else f" ({len(pr)} seed{'s' if len(pr) > 1 else ''})"
        both = [s for s in a.seeds if key in done[str(s)] and f"ce+kd@{a.epochs}" in done[str(s)]]
        vs = "-"
        if name != "ce+kd" and both:
            c = paired(np.concatenate([done[str(s)][key] for s in both]),
                       np.concatenate([done[str(s)][f"ce+kd@{a.epochs}"] for s in both]))
            vs = f"{c.diff_points:+.1f} [{c.ci_points[0]:+.1f}, {c.ci_points[1]:+.1f}]"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {100 * np.concatenate(pr).mean():.1f}% "
                    f"({pooled.diff_points:+.1f} [{lo:+.1f}, {hi:+.1f}]){over} | {vs} | {secs:.0f} |")
    n = len(done[str(a.seeds[0])]["finetune"])
    ftp = np.concatenate([np.asarray(done[str(s)]["finetune"]) for s in a.seeds]).mean()
    lines = ["## Recovery after pruning at 224 px: how the pruned photo model is taught (issue 23)", "",
             machine_line(torch.get_num_threads()), "",
             f"ImageNet Lite0 fine-tuned on the GCompris photos (seeds {', '.join(map(str, a.seeds))}), L1 pruning "
             f"to about 59% of the MACs, BatchNorm re-estimated, then {a.epochs} recovery epochs (BatchNorm trained, "
             f"lr 1e-3 unless the row says otherwise, cosine, last epoch kept) distilled from the unpruned model "
             f"at T = 4. Top-1 on the "
             f"validation and test photos together ({n} per seed); in brackets the pruning cost against the "
             f"fine-tuned model on the same photos (points, paired bootstrap 95% interval; positive = pruned is "
             f"worse). Fine-tuned pooled: {100 * ftp:.1f}%.", "",
             "| recovery | " + " | ".join(f"seed {s}" for s in a.seeds) + " | pooled | against ce+kd | seconds |",
             "|---|" + "---|" * (len(a.seeds) + 3), *rows, "",
             "Against ce+kd: the variant minus ce+kd on the same photos (points, paired 95% interval; positive = "
             "the variant recovers more). A variant is adopted only when that interval is above 0 on more than "
             "one seed."]
    write_section("recovery-kd", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
