"""A source checkpoint that really hurts: the demo's good source with every ReLU6 unit dead.

    python models/make_dead_checkpoint.py [--out PATH]    # a second; writes models/demo_dead.pt + .json

Not stored in the repository (it is 4.6 MB and derived in a second): the test and the benchmark make it.

Diverged or badly quantized pretraining leaves networks whose units never fire. This makes one on purpose from
``models/demo_source.pt`` (the demo's real source checkpoint): every BatchNorm's bias (beta) is set to -10, so
every BatchNorm -> ReLU6 outputs 0 for any input and passes no gradient back. Fine-tuning cannot revive those
units (ReLU6's gradient is 0 below 0), the classifier sees constant features, and the pretrained start stays at
chance: the negative-transfer guard's test case (edge_tl.workstation.train.transfer; tests/test_transfer_guard.py,
benchmarks/bench_transfer.py).

Why not a checkpoint pretrained on shuffled labels (``models/pretrain_shuffled.py``, kept for the record): measured
on the demo, it does not hurt. Trained on digits 0-4 with shuffled labels the pretrained start scored 96.0% on
validation, on uniform noise with shuffled labels 94.0%, both above the from-scratch model: with 60 epochs at a
backbone learning rate of 1e-3 fine-tuning re-learns whatever the start holds, and random-label pretraining still
leaves usable low-level filters (Maennel et al., "What do neural networks learn when trained with random labels?",
NeurIPS 2020, report positive transfer from random labels too).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edge_tl.core.fsutil import atomic_write_text, sha256_file

HERE = Path(__file__).resolve().parent
SOURCE, DEAD = HERE / "demo_source.pt", HERE / "demo_dead.pt"
BETA = -10.0


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEAD)
    out = ap.parse_args().out
    state = torch.load(SOURCE, map_location="cpu", weights_only=True)
    bns = [k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")]
    for bn in bns:
        state[f"{bn}.bias"] = torch.full_like(state[f"{bn}.bias"], BETA)
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    info = {"what": "models/demo_source.pt with every BatchNorm bias set to -10: every ReLU6 unit dead (a "
                    "deliberately hurtful source checkpoint)", "command": "python models/make_dead_checkpoint.py",
            "source_sha256": sha256_file(SOURCE), "batchnorms": len(bns), "beta": BETA,
            "sha256": sha256_file(out), "bytes": out.stat().st_size}
    atomic_write_text(out.with_suffix(".json"), json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
