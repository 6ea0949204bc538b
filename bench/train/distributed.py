"""Data parallel training with torch.distributed: one process per device, DDP-averaged gradients.

`attnbench train --gpus N` spawns N processes here (gloo on CPU, NCCL on CUDA); under
torchrun the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is already set.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place: rank of size; local_rank picks its GPU."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> World:
    """The world torchrun (or `spawn`) described in the environment; a single process otherwise."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init(world: World, device: torch.device) -> None:
    """Join the process group when there is more than one process (NCCL on CUDA, gloo on CPU)."""
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size)


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over all processes (itself when there is one)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)


def spawn(size: int, fn: Callable, *args) -> None:
    """Run fn(*args) in ``size`` fresh processes that form one world; raises if any fails."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(size, _free_port(), fn, args), nprocs=size, join=True)
