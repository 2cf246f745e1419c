"""Data-parallel meta-training over ``torch.distributed``, launched by ``torchrun``.

Each rank meta-trains the same model on its share of every meta-batch (tasks ``rank,
rank + world, …`` of it); the meta-gradients are summed across ranks so every rank takes the
same optimiser step as one process with the whole meta-batch. Everything else that must agree is
a pure function of the config: θ₀, task *i* of a split, MetaMix's and RigL's random draws. Only
rank 0 writes to the run directory and shows progress; the others wait for its files at a
barrier. Validation and test tasks are shared out the same way and gathered before the mean.

    torchrun --nproc_per_node 2 -m sparsemeta train ...            # CPU: gloo
    torchrun --nproc_per_node 4 -m sparsemeta train --set device=cuda ...   # GPUs: nccl,
                                                         # one GPU per rank (LOCAL_RANK)

Several nodes need a run directory on a shared file system.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsemeta.foundations.errors import UserError


@dataclass(frozen=True)
class Group:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's indices among ``n`` items (tasks of a meta-batch or an evaluation)."""
        return range(self.rank, n, self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place (flattened into one message)."""
        tensors = list(tensors)
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def group() -> Group:
    """The current job's group: set up by :func:`init_from_env`, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def _import_group_holders() -> None:
    """Import, before the group exists, the torch modules whose functions take
    ``group=group.WORLD`` as a default argument, fixed when the module is first imported.

    Why: torch imports them lazily itself (creating an optimiser imports torch._dynamo, which
    imports FSDP, sharding and torch.distributed.nn). Imported after init_process_group they
    hold the group, destroy_process_group cannot free it, and its gloo threads live into
    interpreter shutdown, where they aborted a rank now and then (SIGABRT, "terminate called
    without an active exception"). Imported before, they hold None.
    """
    from torch import _dynamo  # noqa: F401
    from torch.distributed import fsdp, optim  # noqa: F401
    from torch.distributed import nn as distributed_nn  # noqa: F401


#: what torchrun sets for every rank besides WORLD_SIZE
TORCHRUN_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> torch.device:
    """Join the job torchrun started (gloo on CPU, nccl on CUDA, one GPU per local rank) and
    return this rank's device; a no-op for a plain single process."""
    if not launched() or dist.is_initialized():
        return device
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
                        "launch data-parallel training with torchrun, or unset WORLD_SIZE")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    _import_group_holders()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
