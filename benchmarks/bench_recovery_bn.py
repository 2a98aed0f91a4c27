"""Why prune.recovery_bn = "auto" trains BatchNorm above 64 px (issue 23 item 3). Writes the ``recovery-bn``
section of benchmarks/RESULTS.md.

From a fine-tuned run folder of the photo benchmark (ImageNet Lite0 at 224 px, benchmarks/bench_photos.py): the
build's own pruning (L1, 40% of the MACs) and BatchNorm re-estimation, then the recovery (distilled from the
unpruned model, lr 1e-3, the last epoch kept) with BatchNorm frozen and with BatchNorm trained, from the same
pruned network; top-1 on validation, test and the training images after each epoch budget.

    python benchmarks/bench_recovery_bn.py [RUN]     # default /tmp/edge-tl-bench-photos/s0-imagenet; ~10 min
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from rich.console import Console  # noqa: E402

from edge_tl.workstation.data import DataSplit  # noqa: E402
from edge_tl.workstation.pipeline.cache import StageCache  # noqa: E402
from edge_tl.workstation.pipeline.context import Context  # noqa: E402
from edge_tl.workstation.prune import prune_to_macs  # noqa: E402
from edge_tl.workstation.spec import load_spec  # noqa: E402
from edge_tl.workstation.train import Phase, evaluate, fit, load_state, recalibrate_bn  # noqa: E402

EPOCHS = (1, 6)


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/edge-tl-bench-photos/s0-imagenet")
    keys = json.loads((run / "run.json").read_text())["stage_keys"]
    spec = load_spec(run / "spec.resolved.toml")
    ctx = Context(spec, run, StageCache(run, writer=False), Console(quiet=True), Path(spec.data.root), "photos",
                  spec.model.weights, spec.model.weights)
    ctx.keys = keys
    ctx.split = DataSplit.from_json((ctx.folder("data") / "split.json").read_text())
    parent = load_state(spec.model.backbone, len(ctx.classes), ctx.folder("finetune") / "model.pt").eval()
    val, test, train = ctx.arrays("val"), ctx.arrays("test"), ctx.arrays("train")
    res = prune_to_macs(copy.deepcopy(parent), torch.zeros(1, 3, *ctx.size), target_macs_ratio=0.4, round_to=8,
                        importance="l1")
    pruned = res.model.eval()
    recalibrate_bn(pruned, ctx.train_dataset(), batch_size=32, seed=spec.seed, device="cpu")
    pruned = pruned.cpu().eval()
    rows = []
    for frozen in (True, False):
        for epochs in EPOCHS:
            net = copy.deepcopy(pruned)
            t0 = time.perf_counter()
            fit(net, spec.model.backbone, ctx.train_dataset(), val,
                [Phase("recovery", epochs, 1e-3, 1e-3, train_bn=not frozen, early_stop=False)], batch_size=32,
                teacher=parent, distill_weight=0.7, distill_temperature=4.0, keep="last", device="cpu", seed=0,
                label="recovery")
            net = net.cpu().eval()
            rows.append((("frozen" if frozen else "trained"), epochs, evaluate(net, *val)[0],
                         evaluate(net, *test)[0], evaluate(net, *train)[0], time.perf_counter() - t0))
    pv, pt, ptr = (evaluate(parent, *a)[0] for a in (val, test, train))
    rv, rt, rtr = (evaluate(pruned, *a)[0] for a in (val, test, train))
    n = (len(val[1]), len(test[1]), len(train[1]))
    lines = ["## Recovery after pruning at 224 px: BatchNorm frozen or trained (issue 23 item 3)", "",
             machine_line(torch.get_num_threads()), "",
             f"Run: {run.name} (ImageNet Lite0 fine-tuned on the GCompris photos, seed {spec.seed}); L1 pruning to "
             f"{100 * res.macs_after / res.macs_before:.0f}% of the MACs, BatchNorm re-estimated; recovery lr 1e-3 "
             f"distilled from the unpruned model. Top-1 on validation / test / training ({n[0]} / {n[1]} / {n[2]} "
             "images).", "",
             "| BatchNorm | epochs | validation | test | training | seconds |", "|---|---|---|---|---|---|",
             f"| (unpruned) | - | {100 * pv:.1f}% | {100 * pt:.1f}% | {100 * ptr:.1f}% | - |",
             f"| (pruned, before recovery) | 0 | {100 * rv:.1f}% | {100 * rt:.1f}% | {100 * rtr:.1f}% | - |"]
    lines += [f"| {bn} | {ep} | {100 * v:.1f}% | {100 * t:.1f}% | {100 * tr:.1f}% | {s:.0f} |"
              for bn, ep, v, t, tr, s in rows]
    lines += ["", f"Chance is {100 / len(ctx.classes):.0f}%. At 32 px the demo recovers with BatchNorm frozen "
              "(benchmarks/RESULTS.md, build sections), so auto keeps it frozen up to 64 px and trains it above."]
    write_section("recovery-bn", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
