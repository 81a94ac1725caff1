"""Ranks for scale-out extraction under torchrun.

Each rank takes a contiguous range of chunks of the list (no padded duplicates), writes one part per
chunk and then its own shard bank; after a barrier rank 0 assembles the shards into the final bank, by
concatenation or as an HDF5 virtual dataset. All ranks need the same filesystem for ``--out``::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m disalign extract --model model.ts --card card.json --root DIR --list train.txt \\
        --out /shared/fs/train.h5 --device cuda

On one machine, two CPU processes (what the tests run)::

    python -m torch.distributed.run --nproc-per-node 2 --master-port 29511 -m disalign extract ... --device cpu

The process group uses gloo on CPU and nccl on CUDA; small Python objects (an error found by rank 0)
travel over an extra gloo group so they never need a GPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """This process's rank in a running process group (``world_size == 1``: no group, no-op collectives)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _objects: object = field(default=None, repr=False)  # gloo group for broadcast_object

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._objects)
        return box[0]

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str) -> tuple[DistContext, str]:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1; returns the context and this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    timeout = datetime.timedelta(hours=2)  # rank 0's assembly of a large bank can take a while
    dist.init_process_group(backend="nccl" if on_cuda else "gloo", timeout=timeout)
    objects = dist.new_group(backend="gloo", timeout=timeout) if on_cuda else None
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, _objects=objects), device


def chunk_range(num_chunks: int, rank: int, world_size: int) -> range:
    """The contiguous chunks of ``rank``: sizes differ by at most one, every chunk exactly once."""
    return range(num_chunks * rank // world_size, num_chunks * (rank + 1) // world_size)
