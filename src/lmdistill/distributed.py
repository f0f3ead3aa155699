"""Process-group setup for `torchrun` (gloo on CPU, nccl on GPU) and the wrapping of the trained module: DDP, or
FSDP2 sharding with `--fsdp`; a single process needs nothing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Processes:
    """This process's place in the job."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0


def local_device(local_rank: int = 0) -> torch.device:
    """The device a process of this machine computes on: its local GPU where there is one, else the CPU."""
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def start() -> Processes:
    """Join the process group that `torchrun` describes in the environment, or run alone.

    Returns:
        Rank, world size and the device this process uses (its local GPU, else the CPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = local_device(local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Processes(rank=rank, world=world, device=device)


def wrap(module: nn.Module, processes: Processes, shard: list[nn.Module] | None = None) -> nn.Module:
    """Place `module` on this process's device and make its gradients those of the whole job.

    Args:
        module: what the training loop calls, on the CPU.
        processes: the process group.
        shard: with FSDP, the blocks to shard one by one, in `module.modules()` order (FSDP2 `fully_shard` each,
            then the rest with `module` as the root, moved to the device shard by shard); None: DDP with several
            processes, else nothing.

    Returns:
        The module to call: `module` itself (FSDP shards it in place, so its parameters become DTensors), or a DDP
        wrapper around it.
    """
    if shard is not None:
        for block in reversed(shard):  # a block nested in another one first
            fully_shard(block)
        return fully_shard(module)
    module.to(processes.device)
    return DistributedDataParallel(module) if processes.world > 1 else module


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes inside reduce gradients over processes only if `sync`; else they accumulate in this one.

    DDP's `no_sync`, FSDP2's `set_requires_gradient_sync` (which keeps unsharded gradients until the sync).
    """
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        yield
    elif isinstance(model, DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
    else:
        yield


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (identity when alone)."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def stop() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()
