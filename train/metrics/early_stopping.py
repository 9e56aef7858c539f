"""Early stopping on one validation metric; stateful, so a resumed run keeps counting."""

from __future__ import annotations

import math
from typing import Optional

from train.config.recipe import LOWER_IS_BETTER


class EarlyStopping:
    """Tracks the best value of one metric; says when ``patience`` evaluations brought nothing.

    Saved with every checkpoint, so a resumed run keeps counting, and a run that stopped early
    stays stopped.
    """

    def __init__(self, metric: str, mode: str = "auto", patience: int = 0, min_delta: float = 0.0):
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.higher_is_better = (metric not in LOWER_IS_BETTER) if mode == "auto" else mode == "max"
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad_evals = 0
        self.stopped = False

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; return whether it is a new best."""
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        else:
            gain = value - self.best if self.higher_is_better else self.best - value
            improved = gain > self.min_delta
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
            self.stopped = self.patience > 0 and self.bad_evals >= self.patience
        return improved

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        if state.get("metric") != self.metric:  # a changed eval.metric starts tracking afresh
            return
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evals, self.stopped = state["bad_evals"], state["stopped"]
