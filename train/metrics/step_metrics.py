"""The training metrics of a log window: summed on the device each step, reduced over the ranks
once per ``train.log_every`` steps (the step loop's only host sync), then written by rank 0."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from train.metrics.flops import mfu
from train.metrics.telemetry import Telemetry
from train.metrics.writer import MetricsWriter, aggregate_ranks
from train.checkpoint.state import Counters
from train.metrics.phase_clock import Mark, phase_seconds
from train.config.recipe import TrainConfig


@dataclass
class StepResult:
    """What one optimizer step (:class:`train.loop.step.TrainStep`) hands to the metrics: device
    tensors, read only at log steps."""

    losses: list[torch.Tensor]
    """Each micro-batch's (detached) loss, in order; non-finite ones are left out of the logged mean."""
    nonfinite: torch.Tensor
    """How many of those were non-finite on this rank."""
    grad_norm: torch.Tensor
    """The clipped-before gradient norm (on the device)."""
    tokens: int
    """Positions this rank trained on (padding trimmed)."""
    seconds: float
    """Wall time of the step."""
    phases: list[tuple[str, Mark, Mark]] = field(default_factory=list)
    """(phase, start, end) marks of this step's ``data_wait_s``, ``fwd_bwd_s`` and ``optim_s``
    (:class:`~train.metrics.phase_clock.PhaseClock`: CUDA events on a GPU, read at log steps)."""


class LogWindow:
    """This rank's loss sums and token count since the last log step.

    Saved with every checkpoint (same world size only, like the RNG streams), so a log window that
    spans a stop logs the same mean loss as the uninterrupted run.
    """

    def __init__(self, device: torch.device):
        self.loss_sum, self.nonfinite = torch.zeros((), device=device), torch.zeros((), device=device)
        self.steps = self.tokens = 0

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.nonfinite.zero_()
        self.steps = self.tokens = 0

    def state_dict(self) -> dict:
        return {"loss_sum": float(self.loss_sum), "nonfinite": float(self.nonfinite), "steps": self.steps,
                "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum.fill_(state["loss_sum"])
        self.nonfinite.fill_(state["nonfinite"])
        self.steps, self.tokens = int(state["steps"]), int(state["tokens"])


class StepMetrics:
    """Adds each step's losses, tokens and phase times on the device (:meth:`record`, no sync); every
    ``train.log_every`` steps and at the last, reduces them over the ranks in one collective, lets
    the non-finite guard act, and has rank 0 write one ``metrics.jsonl`` row (loss, rates, MFU,
    telemetry) and the progress line."""

    def __init__(self, *, engine, guard, telemetry: Telemetry, writer: Optional[MetricsWriter], device: torch.device,
                 world_size: int, accum: int, train: TrainConfig, flops_token: float, peak_tflops: Optional[float],
                 window: LogWindow, train_samples: int):
        self.engine, self.guard, self.telemetry, self.writer = engine, guard, telemetry, writer
        self.device, self.world_size, self.accum, self.global_batch = device, world_size, accum, train.global_batch_size
        self.log_every, self.max_steps, self.flops_token, self.peak = train.log_every, train.max_steps, flops_token, \
            peak_tflops
        self.window = window  # may hold steps from before a resume; the rates count this launch's only
        self.train_samples = train_samples
        self._new_timing()

    def _new_timing(self) -> None:
        self.timed_steps, self.timed_tokens, self.start = 0, 0, time.time()
        self.phases: list[tuple[str, Mark, Mark]] = []  # read at the log step (CUDA events: no sync before)

    def record(self, result: StepResult, counters: Counters) -> None:
        """Add the step (no sync); at a log step, reduce, check the guard, write and start a new window."""
        w = self.window
        for loss in result.losses:
            w.loss_sum += torch.where(torch.isfinite(loss), loss, 0.0)  # a NaN must not poison the mean
        w.nonfinite += result.nonfinite
        w.steps, w.tokens = w.steps + 1, w.tokens + result.tokens
        self.timed_steps, self.timed_tokens = self.timed_steps + 1, self.timed_tokens + result.tokens
        self.phases += result.phases
        if counters.step % self.log_every == 0 or counters.step == self.max_steps:
            self._log(result.grad_norm, counters)

    def _log(self, grad_norm: torch.Tensor, counters: Counters) -> None:
        w = self.window
        finite = self.accum * w.steps - w.nonfinite  # non-finite losses are left out of the mean
        stats = torch.cat([  # float64: token sums stay exact
            torch.stack([w.loss_sum.double(), finite.double(),
                         torch.nan_to_num(grad_norm.double().to(self.device), nan=-1.0)]),
            torch.tensor([float(w.tokens), float(self.timed_tokens)], dtype=torch.float64, device=self.device)])
        dist.all_reduce(stats)  # the only host sync: at log steps
        loss_sum, finite_all, norm, all_tokens, timed_tokens = stats.tolist()
        # the mean over every finite micro-batch loss of every rank: a rank whose losses were all
        # NaN must not pull the mean towards 0 (NaN when none was finite)
        loss = loss_sum / finite_all if finite_all > 0 else float("nan")
        norm = norm / self.world_size
        counters.tokens += round(all_tokens) - w.tokens * self.world_size  # ranks' lengths differ unpacked
        self.guard.check(counters.step)
        telemetry_all: list[Any] = [None] * self.world_size  # every rank's drained telemetry
        dist.all_gather_object(telemetry_all, self.telemetry.drain())
        seconds = time.time() - self.start
        steps = max(self.timed_steps, 1)
        tps = timed_tokens / seconds
        values = {"loss": loss, "grad_norm": norm, "lr": self.engine.lr,
                  "tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world_size,
                  "samples_per_s": self.timed_steps * self.global_batch / seconds,
                  "step_time_s": seconds / steps,
                  **{k: v / steps for k, v in phase_seconds(self.phases).items()},
                  "model_tflops": tps / self.world_size * self.flops_token / 1e12,
                  "mfu": mfu(tps / self.world_size, self.flops_token, self.peak),
                  # updates not applied: the fp16 loss scaler's skips include every non-finite step,
                  # and without a scaler the guard's are the only ones
                  "skipped_steps": max(self.engine.skipped_steps, self.guard.total()),
                  "nonfinite_steps": self.guard.total(),
                  "tokens": counters.tokens,
                  "epoch": counters.step * self.global_batch / max(self.train_samples, 1),
                  **aggregate_ranks(telemetry_all)}
        if self.device.type == "cuda":
            values["mem_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            values["mem_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        if self.writer:
            self.writer.write(counters.step, values)
            self.writer.progress(counters.step, values)
        w.reset()
        self._new_timing()
