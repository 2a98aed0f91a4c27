"""Data-parallel training under ``torchrun`` (DistributedDataParallel): the few helpers a training loop needs.

Outside ``torchrun`` (no ``torch.distributed`` process group) every helper is the single-process no-op, so a
loop written with them runs unchanged in one process. Under ``torchrun --nproc_per_node N`` (``edge-tl build
--nproc N`` starts it, :mod:`edge_tl.workstation.pipeline.launch`):

- :func:`setup` joins the process group torchrun describes in the environment: NCCL on CUDA (one GPU per
  process, ``cuda:LOCAL_RANK``), gloo on CPU.
- :func:`loader` shards the training set: :class:`torch.utils.data.DistributedSampler` (every rank shuffles with
  the same seed and epoch, then takes its share) or, for a class-balanced sampler, :class:`ShardedSampler`. The
  global batch stays the single process's ``batch_size``: each rank loads ``batch_size / N``.
- :func:`wrap` puts the model in :class:`~torch.nn.parallel.DistributedDataParallel` (gradients averaged over
  the ranks, so the step equals the single process's step on the whole batch); call it after the parameters'
  ``requires_grad`` are set for the phase (DDP registers only those).
- :func:`all_sum` adds numbers over the ranks (validation counts, training loss): every rank then takes the
  same early-stopping and best-epoch decision from the same numbers.
- :func:`is_writer` is true on rank 0 only: checkpoints, stage outputs and the manifest are written by it;
  :func:`barrier` lets the other ranks wait for them.

A training loop opts in with ``set_epoch(loader, epoch)`` before each epoch, ``wrap`` per optimizer, ``all_sum``
for every number a decision depends on, and ``is_writer()`` around files (see :func:`edge_tl.workstation.train.fit`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from edge_tl.core.errors import EdgeTLError

#: how long a rank waits at a collective for the others (rank 0 exports and quantizes while the others wait
#: at the end of training; torchrun stops every rank at once when one fails, so this only bounds a hang)
TIMEOUT = timedelta(hours=2)


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_writer() -> bool:
    """True in the one process that writes files (rank 0, or the single process)."""
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (its environment is set), whether or not :func:`setup` ran yet."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> str:
    """Join torchrun's process group (NCCL for CUDA, gloo for CPU); returns the backend. ``device`` is the
    spec's ``train.device``: all ranks train on the same kind of device."""
    if active():
        return torch.distributed.get_backend()
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise EdgeTLError("train.device is 'cuda' but no CUDA GPU is visible to torch", "use --device auto or cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend, timeout=TIMEOUT)
    return backend


def teardown() -> None:
    if active():
        torch.distributed.destroy_process_group()


def place(dev: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA under torchrun, else ``dev``."""
    if dev.type == "cuda" and active():
        return torch.device("cuda", local_rank())
    return dev


def per_rank_batch(batch_size: int) -> int:
    """This rank's share of the global batch (the single process's ``batch_size``)."""
    return per_rank_batch_for(batch_size, world_size())


def per_rank_batch_for(batch_size: int, n: int) -> int:
    if batch_size % n:
        raise EdgeTLError(f"train.batch_size {batch_size} does not split evenly over {n} processes",
                          f"choose a batch size divisible by {n} (each process trains batch_size / {n} images per "
                          f"step), e.g. --batch-size {max(n, batch_size // n * n)}")
    return batch_size // n


class ShardedSampler(torch.utils.data.Sampler):
    """A sampler's order, split over the ranks: every rank draws the same full order from its own copy of
    ``base`` (seeded alike, e.g. :func:`edge_tl.workstation.train.balance.make_sampler`) and keeps every N-th
    index from its rank, padded like DistributedSampler so that all ranks get the same count."""

    def __init__(self, base: torch.utils.data.Sampler, num_replicas: int, rank: int):
        self.base, self.num_replicas, self.rank = base, num_replicas, rank
        self.num_samples = -(-len(base) // num_replicas)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        order += order[:self.num_samples * self.num_replicas - len(order)]
        return iter(order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:  # the base sampler's generator advances by itself
        pass


def loader(dataset: torch.utils.data.Dataset, batch_size: int, *, seed: int,
           sampler: torch.utils.data.Sampler | None = None, workers: int = 0) -> torch.utils.data.DataLoader:
    """The training DataLoader: the single process's (shuffled with ``seed``, or ``sampler``'s order), or this
    rank's shard of it with ``batch_size / N`` images per step."""
    n = world_size()
    if n == 1:
        gen = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                           generator=gen if sampler is None else None, num_workers=workers,
                                           drop_last=len(dataset) > batch_size)  # type: ignore[arg-type]
    part = per_rank_batch(batch_size)
    shard: torch.utils.data.Sampler
    if sampler is None:
        shard = torch.utils.data.DistributedSampler(dataset, num_replicas=n, rank=rank(), shuffle=True, seed=seed)
    else:
        shard = ShardedSampler(sampler, n, rank())
    return torch.utils.data.DataLoader(dataset, batch_size=part, sampler=shard, num_workers=workers,
                                       drop_last=len(shard) > part)  # type: ignore[arg-type]


def set_epoch(data: torch.utils.data.DataLoader, epoch: int) -> None:
    """Before each epoch: a new shuffle, the same on every rank (DistributedSampler.set_epoch)."""
    if hasattr(data.sampler, "set_epoch"):
        data.sampler.set_epoch(epoch)


def wrap(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (its parameters and buffers broadcast from rank 0 first), or
    ``model`` itself in one process. Call per phase, after ``requires_grad`` is set: DDP syncs only those."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dev.index] if dev.type == "cuda" else None
    # buffers: not broadcast before every forward; fit calls sync_buffers after each epoch, before validation
    return DistributedDataParallel(model, device_ids=ids, output_device=dev.index if ids else None,
                                   broadcast_buffers=False)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, so all ranks evaluate the same model
    (:func:`wrap` leaves them to this: where BatchNorm trains, each rank's forwards update its own)."""
    if world_size() == 1:
        return
    for buf in model.buffers():
        torch.distributed.broadcast(buf, src=0)


def all_sum(*values: float, device: torch.device | str = "cpu") -> list[float]:
    """Each value summed over the ranks (float64; the same result on every rank)."""
    if world_size() == 1:
        return [float(v) for v in values]
    dev = torch.device(device)
    if dev.type == "cuda":  # NCCL reduces CUDA tensors only
        dev = place(dev)
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    return [float(v) for v in t.cpu()]


def barrier() -> None:
    if world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[local_rank()])
        else:
            torch.distributed.barrier()


def share(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; the other ranks pass nothing)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
