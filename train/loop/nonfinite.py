"""The non-finite guard: counts NaN/inf steps on the device; under ``train.on_nonfinite: skip``
names each skipped step at the next log step, under ``stop`` stops the run naming the first bad
step's batch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger("shardforge")


class NonFiniteStop(RuntimeError):
    """``train.on_nonfinite=stop`` and a step had a NaN/inf loss or gradient norm."""


class NonFiniteGuard:
    """Counts steps whose loss or gradient norm was non-finite on any rank, on the device.

    The engines agree on the flag with an all-reduce and (DDP/FSDP) skip the update on the
    device, so nothing here synchronises with the host except :meth:`check`, which runs at log
    steps, before every save and at the end.
    """

    def __init__(self, policy: str, device: torch.device, batches, run_dir: Path):
        self.policy, self.batches, self.run_dir = policy, batches, run_dir
        self.count = torch.zeros((), device=device)
        self.first_step = torch.zeros((), device=device)
        self._since_check: list[tuple[int, torch.Tensor]] = []  # (step, flag) not yet reported

    def record(self, skipped: torch.Tensor, step: int) -> None:
        self.count += skipped
        self.first_step = torch.where((self.first_step == 0) & (skipped > 0),
                                      torch.full_like(self.first_step, step), self.first_step)
        if self.policy == "skip":
            self._since_check.append((step, skipped))

    def total(self) -> int:
        return int(self.count.item())

    def check(self, step: int) -> None:
        """Under ``skip``, print one line per step skipped since the last check; raise
        :class:`NonFiniteStop` when the policy is ``stop`` and any step so far was non-finite."""
        if self._since_check:  # one host sync for the whole window
            flags = torch.stack([flag for _, flag in self._since_check]).tolist()
            for (bad, _), flag in zip(self._since_check, flags):
                if flag > 0:
                    logger.warning(f"step {bad}: non-finite loss or gradient norm on some rank; its update was skipped "
                                   f"on every rank (train.on_nonfinite=skip)")
            self._since_check.clear()
        if self.policy != "stop" or self.count.item() == 0:
            return
        bad = int(self.first_step.item())
        fingerprint: Optional[str] = self.batches.fingerprint(steps_back=step - bad + 1)
        raise NonFiniteStop(
            f"non-finite loss or gradient norm at step {bad} (batch fingerprint {fingerprint}); "
            f"stopped without saving, so the latest checkpoint in {self.run_dir / 'checkpoints'} is the "
            f"last good state. Lower optim.lr or check that batch, or set train.on_nonfinite=skip "
            f"(ddp/fsdp), then run again to resume")
