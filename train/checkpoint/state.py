"""The small stateful parts the checkpointer collects besides the engine and the data: progress
counters and every RNG. Each exposes ``state_dict()`` / ``load_state_dict()``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import torch


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Counters:
    """Progress counters saved with every checkpoint."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0

    def advance(self, tokens: int, seconds: float) -> None:
        """One optimizer step done: ``tokens`` over all ranks (an estimate until the log step's exact sum)."""
        self.step += 1
        self.tokens += tokens
        self.elapsed_s += seconds

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_s}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.elapsed_s = state["step"], state["tokens"], state["elapsed_s"]


class RNGState:
    """Python, numpy, torch CPU and this rank's CUDA generator states.

    CUDA: the current device's generator only (the rank's own GPU, set by
    ``train.distributed.init_distributed``), never every visible device's: a rank drew only from
    its own, and the checkpoint is restored per global rank, so a job resumed on another layout
    (1 node × 8 as 2 × 4, or one GPU per process) asks for no generator that is not there."""

    def state_dict(self) -> dict:
        # legacy=True (the default) gives MT19937's tuple; numpy's stub overloads type a no-argument call as a dict
        np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
        return {"python": random.getstate(),
                "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if isinstance(cuda, (list, tuple)):  # written before: every visible device's; this device's index
            index = torch.cuda.current_device() if torch.cuda.is_available() else -1
            cuda = cuda[index] if 0 <= index < len(cuda) else None
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
