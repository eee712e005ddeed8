"""torch.distributed set-up for ``torchrun``: one process per GPU (or CPU process with gloo)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "first_failure", "gather_to_rank0", "init_from_env", "process_group", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; ``world == 1`` when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(use_cuda: bool) -> DistInfo:
    """Join the process group torchrun describes in the environment (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def gather_to_rank0(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list in rank order), None elsewhere; ``[obj]`` without torchrun."""
    if info.world == 1:
        return [obj]
    out: list[Any] | None = [None] * info.world if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def first_failure(error: str | None, info: DistInfo) -> tuple[int, str] | None:
    """(rank, message) of the first rank whose ``error`` is not None, the same on every rank; None if none.

    Every rank calls it at the same point, so a rank that failed tells the others instead of leaving
    them waiting at the job's next collective.
    """
    if info.world == 1:
        return None if error is None else (0, error)
    errors: list[str | None] = [None] * info.world
    dist.all_gather_object(errors, error)
    return next(((rank, e) for rank, e in enumerate(errors) if e is not None), None)


def shutdown(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[torch.device, DistInfo]]:
    """Join torchrun's job for a run, on this rank's own GPU when ``device`` is CUDA; leave it after."""
    info = init_from_env(device.type == "cuda")
    if device.type == "cuda" and info.world > 1:
        device = torch.device("cuda", info.local_rank)
    try:
        yield device, info
    finally:
        shutdown(info)
