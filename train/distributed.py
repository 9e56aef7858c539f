"""Process-group setup: NCCL on GPUs, gloo on CPU; works with or without torchrun."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from train.ports import free_port


@dataclass
class DistInfo:
    rank: int
    """Global rank."""
    local_rank: int
    """Rank on this node."""
    world_size: int
    """Total ranks."""
    device: torch.device
    """This rank's device."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


PROCESS_GROUP_TIMEOUT_S = 1800.0
"""How long a collective waits for the other ranks (rank 0 tokenizing a large corpus, a slow save)."""


def process_group_args(world: int, device: torch.device, cpu_collectives: bool = False
                       ) -> tuple[str, Optional[torch.device]]:
    """The backend and ``device_id`` this rank's default process group is made with.

    * CPU: gloo, no device.
    * GPU: NCCL. ``cpu_collectives`` (FSDP2 with CPU offload: sharded gradients and the gathers of
      the full state are CPU DTensors) adds gloo for CPU tensors, ``cpu:gloo,cuda:nccl``: NCCL
      cannot reduce CPU tensors (pytorch#148532). Only then: a gloo group connects every pair of
      ranks when it is made, which costs start-up time on large jobs.
    * ``device_id`` binds the group to this rank's GPU (eager NCCL init, and later groups split from
      it), except on one rank: there is no peer, and DeepSpeed skips it there too (deepspeed#8248:
      CUDA error 600 on a single GPU).
    """
    if device.type != "cuda":
        return "gloo", None
    return ("cpu:gloo,cuda:nccl" if cpu_collectives else "nccl"), (device if world > 1 else None)


def init_distributed(deepspeed: bool = False, timeout_s: float = PROCESS_GROUP_TIMEOUT_S,
                     cpu_collectives: bool = False) -> DistInfo:
    """Join the job's process group (a one-rank group when not started by torchrun); through
    DeepSpeed's own initialisation for its engines (which binds the device itself, and offloads
    through its own CPU optimizer: ``cpu_collectives`` is for the torch engines)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend, device_id = process_group_args(world, device, cpu_collectives and not deepspeed)
    timeout = datetime.timedelta(seconds=timeout_s)
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    return DistInfo(rank, local_rank, world, device)


def all_ranks_agree(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True on every rank when any rank raised ``flag`` (one small all-reduce). ``device``
    defaults to the one the default group's backend reduces on (the GPU under NCCL, also when
    gloo serves its CPU tensors: ``cpu:gloo,cuda:nccl``)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() and "nccl" in dist.get_backend() else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
