"""A first try at a hurtful source checkpoint: the demo's backbone pretrained on SHUFFLED labels (kept for the record).

    python models/pretrain_shuffled.py [--images noise|digits]   # 5-8 minutes on 2 CPU cores; models/demo_shuffled.pt

MEASURED: IT DOES NOT HURT on the demo (validation top-1 of the pretrained start 96.0% on digits, 94.0% on noise,
both above the from-scratch model), so no checkpoint is stored and the guard's test case is
``models/make_dead_checkpoint.py``. What it does:

Same network, preprocessing, optimiser and seed as ``models/pretrain_demo.py``, but every training image gets
the label of another image (a seeded permutation of the training labels), and no augmentation, so the net
memorises noise: its features carry no knowledge about digits and its later layers are tuned to arbitrary
image-to-class pairings. Transferring it to the demo's target task (digits 5-9) is the test case of the
negative-transfer guard (edge_tl.workstation.train.transfer): the build must say the pretrained start is not
better than training from scratch. The "best" epoch is picked on the training images themselves (with their
shuffled labels), i.e. the most memorised state is kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pretrain_demo import write_checkpoint  # models/ is sys.path[0] when this script runs

from edge_tl.workstation import demo
from edge_tl.workstation.data import scan
from edge_tl.workstation.spec import BuildSpec
from edge_tl.workstation.train import build, fit, scratch_phases
from edge_tl.workstation.train.datasets import TrainDataset, eval_arrays

HERE = Path(__file__).resolve().parent
SHUFFLED_CHECKPOINT = "demo_shuffled.pt"


def _to_noise(paths: list, seed: int) -> None:
    """Overwrite each image with uniform noise of its own size and mode (seeded): nothing digit-like is left."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for p in paths:
        with Image.open(p) as img:
            size, mode = img.size, img.mode
        bands = len(Image.new(mode, (1, 1)).getbands())
        pix = rng.integers(0, 256, size=(size[1], size[0], bands), dtype=np.uint8)
        Image.fromarray(pix[..., 0] if bands == 1 else pix, mode=None).convert(mode).save(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", choices=("noise", "digits"), default="noise",
                    help="noise (default): every training image replaced by seeded uniform noise, a source domain "
                         "far from digits; digits: the real images (measured: that start still helps)")
    ap.add_argument("--out", type=Path, default=HERE / SHUFFLED_CHECKPOINT)
    args = ap.parse_args()

    spec = BuildSpec.demo()
    pre = spec.model.preprocess()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        root = demo.source_task(td, seed=args.seed)
        split = scan(root, seed=args.seed)
        if args.images == "noise":
            _to_noise(split.paths("train"), args.seed)
        true = np.asarray(split.labels("train"))
        shuffled = np.random.default_rng(args.seed).permutation(true)
        train = TrainDataset(split.paths("train"), shuffled, pre, augment="none", hflip=False)
        memorised = eval_arrays(split.paths("train"), shuffled, pre)
        model = build(spec.model.backbone, len(split.classes), spec.model.dropout, seed=args.seed)
        res = fit(model, spec.model.backbone, train, memorised, scratch_phases(args.epochs, args.lr), batch_size=32,
                  seed=args.seed, label="pretrain digits 0-4, shuffled labels")
    info = write_checkpoint(model, args.out, {
        "what": "torchvision mobilenet_v2, 5-class head, trained from scratch on the demo's source task (sklearn "
                "digits 0-4) with the training labels shuffled (a seeded permutation) and, with images = noise, "
                "every training image replaced by seeded uniform noise: a deliberately hurtful source checkpoint",
        "images": args.images,
        "command": f"python models/pretrain_shuffled.py --images {args.images} --epochs {args.epochs}",
        "classes": split.classes, "seed": args.seed, "epochs": args.epochs, "lr": args.lr, "optimizer": "AdamW",
        "augment": "none", "labels_kept": int((shuffled == true).sum()), "train_images": int(true.size),
        "best_epoch": res.best_epoch, "memorised_top1": round(res.best_val_top1, 4),
        "preprocess": pre.model_dump(mode="json"), "seconds": round(time.perf_counter() - start, 1)})
    print(json.dumps({k: info[k] for k in ("memorised_top1", "labels_kept", "seconds", "bytes")}))


if __name__ == "__main__":
    main()
