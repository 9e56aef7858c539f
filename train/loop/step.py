"""One optimizer step: micro-batches → forward/backward (gradients synchronised on the last one
only, by the engine) → optimizer step. Device-side sums only: nothing here waits for the host."""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch

from train.metrics.phase_clock import PhaseClock
from train.metrics.step_metrics import StepResult


def step_loss_denominator(loss_tokens: np.ndarray, step_indices: np.ndarray, micro_batches: int) -> float:
    """For tasks whose loss tokens vary by sample (SFT, token classification): the step's loss
    tokens over all ranks (``loss_tokens`` of its global sample indices) / micro-batches on all ranks.

    The engines divide each micro-batch's loss by the micro-batch count and average gradients over
    ranks, so dividing each micro-batch's loss sum by this makes the step's gradient the mean over
    all its loss tokens: a micro-batch with few response tokens no longer weighs as much as one
    with many. Every rank knows the step's global indices, so this needs no collective."""
    return max(float(loss_tokens[step_indices].sum()) / micro_batches, 1e-6)  # no loss tokens: a zero loss


class TrainStep:
    """Runs step N on this rank: ``accum`` micro-batches of ``batches`` through ``engine`` with the
    task's loss, then the optimizer step; reports phases to the watchdog and non-finite steps to
    the guard. Fault injection (``train.faults.install``) wraps its parts from the outside."""

    def __init__(self, engine, loss_fn, batches, *, accum: int, world_size: int, device: torch.device,
                 guard, watchdog, loss_tokens: Optional[np.ndarray] = None):
        self.engine, self.loss_fn, self.batches, self.accum = engine, loss_fn, batches, accum
        self.world_size, self.device, self.guard, self.watchdog = world_size, device, guard, watchdog
        self.loss_tokens = loss_tokens  # None: every micro-batch weighs the same
        self.clock = PhaseClock(device)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in next(self.batches).items()}

    def run(self, step: int) -> StepResult:
        start = time.time()
        clock, phases = self.clock, []
        losses, bad, tokens = [], torch.zeros((), device=self.device), 0
        denominator = None if self.loss_tokens is None else step_loss_denominator(
            self.loss_tokens, self.batches.next_step_indices(), self.world_size * self.accum)
        for micro in range(self.accum):
            t0 = clock.mark()
            self.watchdog.beat(step, "data")
            batch: dict[str, Any] = self.next_batch()  # and the loss denominator, a float
            tokens += batch["input_ids"].numel()
            if denominator is not None:
                batch["loss_denominator"] = denominator
            t1 = clock.mark()
            self.watchdog.beat(step, "forward-backward")
            loss = self.engine.forward_backward(batch, self.loss_fn, micro == self.accum - 1)
            losses.append(loss)
            bad += (~torch.isfinite(loss)).float()
            phases += [("data_wait_s", t0, t1), ("fwd_bwd_s", t1, clock.mark())]
        t2 = clock.mark()
        self.watchdog.beat(step, "optimizer")
        grad_norm, skipped = self.optimizer_step(bad)
        self.guard.record(skipped, step)
        phases.append(("optim_s", t2, clock.mark()))
        return StepResult(losses, bad, grad_norm, tokens, time.time() - start, phases)

    def optimizer_step(self, nonfinite: torch.Tensor):
        return self.engine.optimizer_step(nonfinite)
