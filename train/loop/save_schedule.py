"""When and how the trainer saves: every N steps or minutes, at the end, on a stop, and the best
evaluation's checkpoint; periodic saves optionally written in the background and committed once
every rank's write is done. The checkpointer does the writing; this decides the timing."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from train.checkpoint.manager import Checkpointer, CheckpointSaveError
from train.checkpoint.files import step_dir_name
from train.loop.agreement import Agreed
from train.loop.nonfinite import NonFiniteGuard, NonFiniteStop
from train.config.recipe import SLURM_SIGNAL_SLACK_S, CheckpointConfig, Recipe
from train.rundir import BEST_FILE, atomic_write
from train.metrics.early_stopping import EarlyStopping
from train.checkpoint.state import Counters

logger = logging.getLogger("shardforge")


class Saver:
    """Decides when the trainer saves (every N steps or minutes, at the end, on a stop, a new best
    evaluation) and commits background saves once every rank has written them; the
    :class:`~train.checkpoint.manager.Checkpointer` does the writing. The trainer calls, per step:
    :meth:`save_best` after an evaluation, :meth:`flags` for this rank's part of the ranks'
    agreement (a query, no state), then :meth:`after_step` with what was agreed (a stop included);
    :meth:`finish` after the loop."""

    def __init__(self, checkpointer: Checkpointer, *, recipe: Recipe, counters: Counters, batches,
                 early: EarlyStopping, guard: NonFiniteGuard, watchdog, run_dir: Path, is_main: bool):
        self.checkpointer, self.recipe, self.counters, self.batches = checkpointer, recipe, counters, batches
        self.early, self.guard, self.watchdog, self.run_dir = early, guard, watchdog, run_dir
        self.is_main = is_main
        self.cfg: CheckpointConfig = recipe.checkpoint
        self.keep_best = bool(recipe.eval.keep_best)
        self.last_save_time, self.last_save_step = time.time(), -1

    # ---- the decisions, in the order the trainer asks after each step

    def save_best(self, step: int, last: bool, previous_best) -> None:
        """A new best evaluation: save it now unless the end or a periodic save at this step will."""
        if self.keep_best and not (last and self.cfg.at_end) and not self._periodic_due(step):
            self.save("best", protect=(previous_best,))

    def flags(self) -> tuple[bool, bool]:
        """(a save is due by the clock, a background write is in flight): this rank's part of the
        agreement. A query: it changes no state, and :meth:`after_step` needs no earlier call of it."""
        due = bool(self.cfg.every_minutes) and self.is_main and \
            time.time() - self.last_save_time >= 60 * self.cfg.every_minutes
        return due, self.checkpointer.write_in_flight()

    def after_step(self, step: int, last: bool, agreed: Agreed, protect: tuple = ()) -> None:
        """On an agreed stop, the stop's save (the trainer then ends the loop). Else commit a finished
        background save; then save when a period, the clock or the end says so.

        A background save started at step s is first in the flags sent after step s + 1, and the
        agreement is one step late: from s + 2, ``agreed.writing`` false means every rank has written it."""
        if agreed.stop:
            self.save("signal")
            return
        pending = self.checkpointer.pending
        if pending is not None and (last or (not agreed.writing and step >= pending.step + 2)):
            self.commit_background()
        clock = agreed.save and self.last_save_step < step - 1  # raised before the last step's save: stale
        if self._periodic_due(step) or clock or (last and self.cfg.at_end):
            self.save("end" if last else "periodic", protect=protect)

    def finish(self) -> None:
        """Stopped, or no save at the end: commit what is in flight."""
        if self.checkpointer.pending is not None:
            self.commit_background()

    def _periodic_due(self, step: int) -> bool:
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    # ---- doing it

    def save(self, reason: str, protect: tuple = ()) -> bool:
        """Save at the current step (``periodic`` ones in the background when asked); False if it failed
        and ``checkpoint.on_error=continue``."""
        step, cfg = self.counters.step, self.cfg
        self.last_save_step = step
        self.guard.check(step)  # never commit a checkpoint after a step that should stop
        if not self.checkpointer.engine.weights_finite():
            raise NonFiniteStop(f"the weights hold NaN or inf at step {step} (a finite loss, then an update that "
                                f"overflowed); not saving them, so the latest checkpoint in "
                                f"{self.run_dir / 'checkpoints'} is the last good state. Lower optim.lr, then run "
                                f"again to resume")
        self.watchdog.beat(step, f"checkpoint save ({reason})", restart=True)
        background = cfg.async_save and reason == "periodic"
        t = self.recipe.train
        try:
            path = self.checkpointer.save(
                step, cfg.keep_last, cfg.keep_every,
                {"tokens": self.counters.tokens, "reason": reason, "next_batch_fingerprint": self.batches.fingerprint(),
                 "seed": self.recipe.run.seed, "global_batch_size": t.global_batch_size, "sample_order": self.batches.sample_order},
                protect={s for s in (*protect, self.early.best_step) if s and self.keep_best}, background=background)
        except CheckpointSaveError as err:
            self._failed(err, final=reason in ("end", "signal"))
            self.last_save_time = time.time()
            return False
        self.last_save_time = time.time()
        took = self.checkpointer.last_save_s or 0.0  # set by the save just made
        if background:
            logger.info(f"checkpoint: writing {path.name} in the background ({reason}; training stalled {took:.2f}s)")
            return True
        if self.keep_best and self.early.best_step == step and self.is_main:
            self.write_best(step)
        logger.info(f"checkpoint: saved {path.name} ({reason}, {took:.1f}s)")
        self._warn_if_slower_than_lead(took)
        return True

    def commit_background(self) -> None:
        """Commit the background save (waiting for its write if it has not finished)."""
        try:
            path = self.checkpointer.wait()
        except CheckpointSaveError as err:
            self._failed(err)
            return
        if path is None:  # nothing was in flight
            return
        logger.info(f"checkpoint: committed {path.name} (written in the background, "
                    f"{self.checkpointer.last_commit_s:.1f}s)")

    def write_best(self, step: int) -> None:
        """Point ``checkpoints/best.json`` at the best evaluation's checkpoint (once it is committed)."""
        early = self.early
        atomic_write(self.run_dir / "checkpoints" / BEST_FILE, json.dumps(
            {"step": step, "checkpoint": step_dir_name(step), "metric": early.metric, "value": early.best}, indent=1))

    def _failed(self, err: CheckpointSaveError, final: bool = False) -> None:
        """``on_error=stop`` ends the run; ``continue`` trains on, except when this was the save that
        should hold the run's end or its stop: then nothing would hold it, and the run fails."""
        if self.cfg.on_error == "stop" or final:
            raise err
        logger.warning(f"{err} (checkpoint.on_error=continue: training goes on)")

    def _warn_if_slower_than_lead(self, save_s: float) -> None:
        lead = self.recipe.slurm.signal_lead_s
        step_s = self.counters.elapsed_s / max(1, self.counters.step)
        if "SLURM_JOB_ID" in os.environ and save_s + step_s > lead - SLURM_SIGNAL_SLACK_S:
            logger.warning(f"a save takes {save_s:.0f} s and a step {step_s:.0f} s, more than "
                           f"slurm.signal_lead_s={lead} less the {SLURM_SIGNAL_SLACK_S} s Slurm may be late with "
                           f"its signal: a job stopped at its time limit would lose its last steps; raise "
                           f"slurm.signal_lead_s")
