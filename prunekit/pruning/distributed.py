"""More than one process (``torchrun``): calibration batches are dealt out across processes, each
block's input statistics are summed over all of them, and every process then prunes the block
identically. Blocks stay sequential; tokens go in parallel. One process needs none of this.
"""

from __future__ import annotations

import os

import torch


def start_from_environment() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, NCCL on GPU."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def world() -> tuple[int, int]:
    """(this process's rank, number of processes)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Rank 0 writes the checkpoint and the report; the others only compute."""
    return world()[0] == 0


def my_batches(count: int) -> list[int]:
    """The calibration batches this process runs: every world-th one, from its rank."""
    rank, size = world()
    return list(range(rank, count, size))


def sum_across_processes(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over all processes, in place (float64 statistics stay float64)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
