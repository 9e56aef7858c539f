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


def init_distributed(deepspeed: bool = False, timeout_s: float = PROCESS_GROUP_TIMEOUT_S) -> DistInfo:
    """Join the job's process group (a one-rank group when not started by torchrun); through
    DeepSpeed's own initialisation for its engines."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world, device)


def all_ranks_agree(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True on every rank when any rank raised ``flag`` (one small all-reduce). ``device``
    defaults to the one the default group's backend reduces on (the GPU under NCCL)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() and dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
