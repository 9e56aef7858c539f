"""The recipe's ``slurm`` section (``shardforge submit``), beside :mod:`train.config.recipe`'s other sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SLURM_SIGNAL_SLACK_S = 30
"""slurmctld checks time limits (and sends ``--signal`` warnings) about every 30 s."""


@dataclass
class SlurmConfig:
    gpus_per_node: int = 8
    """GPUs (and trainer processes) per node."""
    cpus_per_task: int = 64
    """CPUs for the one task per node."""
    mem: str = "0"
    """Memory per node (``0``: all)."""
    partition: Optional[str] = None
    """Partition."""
    account: Optional[str] = None
    """Account to charge."""
    qos: Optional[str] = None
    """Quality of service."""
    time: str = "24:00:00"
    """Time limit per job (requeued jobs start the clock again)."""
    signal_lead_s: int = 300
    """Seconds before the time limit that Slurm signals the job to checkpoint. slurmctld looks at
    time limits only every :data:`SLURM_SIGNAL_SLACK_S` seconds, so the signal can come that much
    later: leave a step, a save and that slack."""
    max_restarts: int = 10
    """Requeue at most this many times."""
    min_nodes: Optional[int] = None
    """Elastic shrink: the job asks Slurm for ``min_nodes`` to ``parallel.nodes`` nodes
    (``--nodes=MIN-MAX``) and runs, or resumes after a requeue, on as many as it gets: the world
    size changes, gradient accumulation grows so ``train.global_batch_size`` stays, and the data
    order is unchanged. Every count in the range must divide the global batch (``submit`` checks).
    Unset: ``parallel.nodes`` exactly, no shrink."""
    extra_sbatch: list[str] = field(default_factory=list)
    """Extra ``#SBATCH`` lines, without the prefix (e.g. ``--constraint=h100``)."""
    env: dict = field(default_factory=dict)
    """Environment variables exported in the job."""
    network_interface: Optional[str] = None
    """Network interface(s) the ranks talk over, e.g. ``ib0`` or ``eth0,eth1``: exported as
    ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` (NCCL's bootstrap and socket transport). Unset:
    each library picks one, which on nodes with several (docker0, a management network) can be one
    the other nodes cannot reach."""
