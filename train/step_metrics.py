"""The training metrics of a log window: summed on the device each step, reduced over the ranks
once per ``train.log_every`` steps (the step loop's only host sync), then written by rank 0."""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from train.metrics import MetricsWriter, Telemetry, aggregate_ranks, mfu
from train.state import Counters
from train.step import StepResult


class StepMetrics:
    def __init__(self, engine, guard, telemetry: Telemetry, writer: Optional[MetricsWriter], device: torch.device,
                 world_size: int, accum: int, global_batch: int, log_every: int, max_steps: int,
                 flops_token: float, peak_tflops: Optional[float]):
        self.engine, self.guard, self.telemetry, self.writer = engine, guard, telemetry, writer
        self.device, self.world_size, self.accum, self.global_batch = device, world_size, accum, global_batch
        self.log_every, self.max_steps, self.flops_token, self.peak = log_every, max_steps, flops_token, peak_tflops
        self.loss_sum, self.nonfinite = torch.zeros((), device=device), torch.zeros((), device=device)
        self._new_window()

    def _new_window(self) -> None:
        self.loss_sum.zero_()
        self.nonfinite.zero_()
        self.steps, self.tokens, self.start = 0, 0, time.time()
        self.timers = {"data_wait_s": 0.0, "fwd_bwd_s": 0.0, "optim_s": 0.0}

    def record(self, result: StepResult, counters: Counters) -> None:
        """Add the step (no sync); at a log step, reduce, check the guard, write and start a new window."""
        for loss in result.losses:
            self.loss_sum += torch.where(torch.isfinite(loss), loss, 0.0)  # a NaN must not poison the mean
        self.nonfinite += result.nonfinite
        self.steps, self.tokens = self.steps + 1, self.tokens + result.tokens
        for key, seconds in result.timers.items():
            self.timers[key] += seconds
        if counters.step % self.log_every == 0 or counters.step == self.max_steps:
            self._log(result.grad_norm, counters)

    def _log(self, grad_norm: torch.Tensor, counters: Counters) -> None:
        finite = self.accum * self.steps - self.nonfinite  # non-finite losses are left out of the mean
        stats = torch.stack([self.loss_sum.double(), finite.double(),  # float64: token sums stay exact
                             torch.nan_to_num(grad_norm.double().to(self.device), nan=-1.0),
                             torch.tensor(float(self.tokens), dtype=torch.float64, device=self.device)])
        dist.all_reduce(stats)  # the only host sync: at log steps
        loss_sum, finite_all, norm, all_tokens = stats.tolist()
        # the mean over every finite micro-batch loss of every rank: a rank whose losses were all
        # NaN must not pull the mean towards 0 (NaN when none was finite)
        loss = loss_sum / finite_all if finite_all > 0 else float("nan")
        norm = norm / self.world_size
        counters.tokens += round(all_tokens) - self.tokens * self.world_size  # ranks' lengths differ unpacked
        self.guard.check(counters.step)
        telemetry_all = [None] * self.world_size
        dist.all_gather_object(telemetry_all, self.telemetry.drain())
        seconds = time.time() - self.start
        tps = all_tokens / seconds
        values = {"loss": loss, "grad_norm": norm, "lr": self.engine.lr,
                  "tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world_size,
                  "samples_per_s": self.steps * self.global_batch / seconds,
                  "step_time_s": seconds / self.steps,
                  **{k: v / self.steps for k, v in self.timers.items()},
                  "model_tflops": tps / self.world_size * self.flops_token / 1e12,
                  "mfu": mfu(tps / self.world_size, self.flops_token, self.peak),
                  "skipped_steps": self.engine.skipped_steps, "nonfinite_steps": self.guard.total(),
                  "tokens": counters.tokens,
                  **aggregate_ranks(telemetry_all)}
        if self.device.type == "cuda":
            values["mem_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            values["mem_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        if self.writer:
            self.writer.write(counters.step, values)
            self.writer.progress(counters.step, values)
        self._new_window()
