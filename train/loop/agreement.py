"""When the ranks stop: agreement on stop / save-now / write-in-flight one step late, and the
``train.stop_after`` time box. Each decides from flags the other parts raise; none of them runs
the step (the non-finite guard is in :mod:`train.loop.nonfinite`)."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist

from train.stop_signals import StopRequest
from train.rundir import EXIT_REQUEUE

logger = logging.getLogger("shardforge")


class Agreed(NamedTuple):
    """What every rank acts on after a step (each true when any rank raised it)."""

    stop: bool
    """Save and stop now."""
    save: bool
    """A save is due by the clock (``checkpoint.every_minutes``)."""
    writing: bool
    """A background save is still being written somewhere."""


class StepAgreement:
    """Agree across ranks on 'stop', 'save now' and 'a background save is still being written'
    without a host sync in the step.

    Each step launches a non-blocking all-reduce (MAX) of this rank's flags and reads the
    previous step's result, so every rank acts on the same step, one step late. The flags live in
    CPU memory and travel through a gloo group (on GPUs, a group of their own), so reading the
    result never waits for the device's queue of kernels.
    """

    def __init__(self, device: torch.device):
        self.world = dist.get_world_size()
        self.group = dist.new_group(backend="gloo") if device.type != "cpu" and self.world > 1 else None
        self._pending: Optional[tuple[Any, torch.Tensor]] = None  # (the all-reduce in flight, its flags)

    def exchange(self, stop: bool, save: bool, writing: bool, wait_now: bool = False) -> Agreed:
        """Each flag true when any rank raised it one step ago (now, with ``wait_now``)."""
        agreed = [False, False, True]  # before any result: assume a write may be in flight
        if self._pending is not None:
            agreed = self._read(*self._pending)
            self._pending = None
        flags = torch.tensor([stop, save, writing], dtype=torch.uint8)
        work = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
                if self.world > 1 else None)
        if wait_now:  # the last step: settle everything now
            now = self._read(work, flags)
            return Agreed(agreed[0] or now[0], agreed[1] or now[1], now[2])
        self._pending = (work, flags)
        return Agreed(*agreed)

    @staticmethod
    def _read(work, flags: torch.Tensor) -> list[bool]:
        if work is not None:
            work.wait()
        return [bool(f) for f in flags.tolist()]


class Stopper:
    """Turns stop signals (on any rank) and ``train.stop_after`` into one decision per step."""

    def __init__(self, request: StopRequest, device: torch.device, stop_after: int, first_step: int):
        self.request, self.stop_after, self.first_step = request, stop_after, first_step
        self.agreement = StepAgreement(device)
        self.counted_out = False
        """``train.stop_after`` ended this launch (the signal request is the signal handler's alone)."""

    def agree(self, step: int, last: bool, save_due: bool, writing: bool) -> Agreed:
        """The ranks' agreement after ``step``; on the last step a stop changes nothing (the run completes)."""
        stop, save, writing = self.agreement.exchange(self.request.requested, save_due, writing, wait_now=last)
        if self.stop_after and step - self.first_step >= self.stop_after and not last:
            stop = self.counted_out = True
        agreed = Agreed(stop and not last, save, writing)
        if agreed.stop:
            logger.info(f"stop requested ({self.reason}) at step {step}: saving and exiting with code {EXIT_REQUEUE}")
        return agreed

    @property
    def reason(self) -> str:
        """Why the run stopped: the signal (it wins over ``stop_after`` when both came), the count, or a peer."""
        if self.request.signal_name:
            return self.request.signal_name
        return f"train.stop_after={self.stop_after}" if self.counted_out else "stop signal on another rank"
