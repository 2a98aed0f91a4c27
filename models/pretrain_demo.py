"""Pretrain the demo's backbone on the source task (digits 0-4) and write models/demo_source.pt + .json.

    python models/pretrain_demo.py            # about 2-3 minutes on 2 CPU cores
    python models/pretrain_demo.py --backbone squeezenet1_1 --out /tmp/squeezenet1_1.pt   # another backbone

Other backbones are pretrained the same way (benchmarks/bench_rank.py makes one per backbone to compare the
ranking with fine-tuning over four pretrained backbones); only the mobilenet_v2 checkpoint is stored.

The checkpoint is a plain state_dict of torchvision's mobilenet_v2 with a 5-class head (float tensors stored
as float16 to keep it small; loading casts them back), loadable with ``torch.load(..., weights_only=True)``.
``edge-tl build`` (the demo) loads it with ``weights = "demo"`` and replaces the head for digits 5-9. The
preprocessing and the seed are the demo spec's (edge_tl.workstation.spec.DEMO_SETTINGS), so source and target match.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from edge_tl.core.fsutil import atomic_write_text, sha256_file
from edge_tl.workstation import demo
from edge_tl.workstation.data import scan
from edge_tl.workstation.spec import BuildSpec
from edge_tl.workstation.train import build, evaluate, fit, scratch_phases
from edge_tl.workstation.train.datasets import TrainDataset, eval_arrays

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--backbone", default=None, help="torchvision backbone (default: the demo spec's, mobilenet_v2)")
    ap.add_argument("--out", type=Path, default=HERE / demo.DEMO_CHECKPOINT)
    args = ap.parse_args()

    spec = BuildSpec.demo()
    backbone = args.backbone or spec.model.backbone
    pre = spec.model.preprocess()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        root = demo.source_task(td, seed=args.seed)
        split = scan(root, seed=args.seed)
        train = TrainDataset(split.paths("train"), split.labels("train"), pre, augment="light", hflip=False)
        val = eval_arrays(split.paths("val"), split.labels("val"), pre)
        test = eval_arrays(split.paths("test"), split.labels("test"), pre)
        model = build(backbone, len(split.classes), spec.model.dropout, seed=args.seed)
        res = fit(model, backbone, train, val, scratch_phases(args.epochs, args.lr), batch_size=32,
                  patience=8, seed=args.seed, label="pretrain digits 0-4",
                  label_smoothing=args.label_smoothing)
        model.cpu()
        test_top1, _, _ = evaluate(model, *test)
    info = write_checkpoint(model, args.out, {
        "what": f"torchvision {backbone}, 5-class head, trained from scratch on sklearn digits 0-4",
        "command": "python models/pretrain_demo.py" + (f" --backbone {backbone}" if args.backbone else ""),
        "classes": split.classes, "counts": split.summary.counts, "seed": args.seed, "epochs": args.epochs,
        "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "lr": args.lr, "optimizer": "AdamW",
        "label_smoothing": args.label_smoothing,
        "preprocess": pre.model_dump(mode="json"), "val_top1": round(res.best_val_top1, 4),
        "test_top1": round(test_top1, 4), "seconds": round(time.perf_counter() - start, 1)})
    print(json.dumps({k: info[k] for k in ("val_top1", "test_top1", "seconds", "bytes")}))


def write_checkpoint(model: torch.nn.Module, out: Path, info: dict) -> dict:
    """Save ``model``'s state_dict (float tensors as float16) to ``out`` through a temporary file, and ``info``
    with the file's dtype note, sha256, size and software versions beside it as ``out.json``. Returns the info."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.cpu().state_dict().items()}
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    info = {**info, "dtype": "float16 (float tensors)", "sha256": sha256_file(out), "bytes": out.stat().st_size,
            "software": {"torch": torch.__version__, "python": platform.python_version()}}
    atomic_write_text(out.with_suffix(".json"), json.dumps(info, indent=2) + "\n")
    return info

if __name__ == "__main__":
    main()
