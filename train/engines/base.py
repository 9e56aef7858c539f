"""What the training step needs from an engine: a micro-step, an optimizer step, an eval
forward, save and load. Every engine saves and loads model + optimizer + LR schedule (+ loss
scale) itself; the checkpointer adds the rest."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from train.engines.config import DTYPE_NAMES

logger = logging.getLogger("shardforge")

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
DTYPES = {**{precision: getattr(torch, name) for precision, name in DTYPE_NAMES.items()},
          **{name: getattr(torch, name) for name in DTYPE_NAMES.values()}}
"""``parallel.precision`` or an engine config's dtype name → the torch dtype."""


def set_fp32_matmul_precision(tf32: bool) -> None:
    """``parallel.tf32``: let fp32 matmuls and convolutions use TF32 tensor cores on GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
"""cuBLAS's workspace setting for reproducible results (CUDA's documentation: ``:4096:8`` or ``:16:8``)."""


def set_deterministic(on: bool) -> None:
    """``train.deterministic``: torch picks deterministic kernels and raises on an op that has none;
    cuBLAS gets a fixed workspace (read when its first handle is made, so before any matmul: a value
    the user set is kept); cuDNN neither autotunes nor picks nondeterministic algorithms."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def report_compute_dtype(model: torch.nn.Module) -> None:
    """Say once, at the first forward, which dtype the model's output layer (its last linear layer,
    outside any compiled block) computed in: the precision that actually ran under autocast, FSDP's
    mixed-precision policy or DeepSpeed's casts, not only the one the recipe asked for."""
    last = next((m for m in reversed(list(model.modules())) if isinstance(m, torch.nn.Linear)), None)
    if last is None:
        return

    def once(module, args, output) -> None:
        handle.remove()
        logger.info(f"precision: the first forward computed in {output.dtype} (the output layer's result)")

    handle = last.register_forward_hook(once)


class Engine:
    """What the loop needs: a micro-step, an optimizer step, eval forward, save and load."""

    name = "engine"
    model: torch.nn.Module
    device: torch.device

    def forward_backward(self, batch: dict, loss_fn: LossFn, last_micro: bool) -> torch.Tensor:
        """Forward and backward one micro-batch; return the (detached) unscaled loss."""
        raise NotImplementedError

    def optimizer_step(self, nonfinite_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, step the optimizer and the LR schedule, zero grads; return (grad norm, skipped).

        ``nonfinite_loss`` > 0 when this rank saw a NaN/inf loss in the step. Every rank agrees
        (an all-reduce, no host sync) on ``skipped`` = 1.0 when any rank saw a non-finite loss
        or the gradient norm is non-finite; engines that can, skip the update on the device.
        """
        raise NotImplementedError

    def eval_forward(self, batch: dict, fn: LossFn) -> torch.Tensor:
        """``fn(model, batch)`` without gradients, in the engine's compute precision."""
        with torch.no_grad(), self.autocast():
            return fn(self.model, batch).detach()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def lr(self) -> float:
        raise NotImplementedError

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped by the fp16 loss scaler."""
        return 0

    def save(self, path: Path, background: bool = False, digests: Optional[dict] = None):
        """Write model + optimizer + schedule state into ``path``. With ``background`` (DDP/FSDP),
        copy it to CPU memory, start the write in a thread and return its future. An engine that
        hashes files as it writes them records ``absolute path → digest`` (``train.checkpoint.files.DIGEST``) in ``digests``."""
        raise NotImplementedError

    def load(self, path: Path, saved_world_size: int) -> None:
        """Restore from ``path``, saved by ``saved_world_size`` ranks (resharding when it differs)."""
        raise NotImplementedError

    def full_model_state(self) -> Optional[dict]:
        """The unsharded model state dict on rank 0 (``None`` elsewhere); a collective."""
        raise NotImplementedError

    def local_weights(self) -> list[torch.Tensor]:
        """This rank's share of the weights (its shards when they are sharded)."""
        return [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]

    def weights_finite(self) -> bool:
        """Whether every rank's weights are finite (a collective): checked before each save, so a
        checkpoint never holds NaN or inf weights."""
        import torch.distributed as dist

        bad = torch.zeros((), device=self.device)
        for w in self.local_weights():
            bad += (~torch.isfinite(w.detach())).any().float().to(bad.device)  # offloaded shards: on the CPU
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item() == 0)

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()
