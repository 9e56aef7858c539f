"""The small stateful parts the checkpointer collects besides the engine and the data: progress
counters and every RNG. Each exposes ``state_dict()`` / ``load_state_dict()``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

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
    """Python, numpy, torch CPU and CUDA generator states of this rank."""

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        return {"python": random.getstate(),
                "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])
