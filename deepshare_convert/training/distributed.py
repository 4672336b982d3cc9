"""Data-parallel training under ``torchrun``: process group, DDP wrapping, rank-0 writes.

``torchrun --nproc_per_node 2 -m deepshare_convert.cli.app retrain ...`` sets
RANK / WORLD_SIZE / MASTER_ADDR; :func:`init_from_env` then starts a gloo (CPU)
or nccl (GPU) group.  Without those variables everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistContext", "init_from_env", "wrap_ddp"]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BN running stats) to every rank.

        DDP broadcasts buffers at the *start* of each forward, so after the last
        step each rank holds running stats updated by its own batch.
        """
        if self.enabled:
            for buf in model.buffers():
                dist.broadcast(buf, src=0)

    def any(self, flag: bool) -> bool:
        """True if ``flag`` is true on any rank (one tiny all-reduce; free without DDP)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_floats(self, value: float) -> list[float]:
        """Every rank's ``value`` (used to prove replicas ended identical)."""
        if not self.enabled:
            return [value]
        out = [torch.zeros(1, dtype=torch.float64) for _ in range(self.world_size)]
        dist.all_gather(out, torch.tensor([value], dtype=torch.float64))
        return [float(t) for t in out]


def init_from_env() -> DistContext:
    """Join the process group torchrun describes in the environment (no-op otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size())


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel on CPU/gloo; buffers (BN stats, masks) follow rank 0."""
    if not ctx.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, broadcast_buffers=True)
