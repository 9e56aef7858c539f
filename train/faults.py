"""Fault injection for the tests and the kill harness, switched on by environment variables.

A real crash, divergence, deadlock or signal cannot be produced on cue at an exact point, so
the rank program calls :func:`fault_point` at named points and the tests choose one:

- ``SHARDFORGE_KILL_AT=point:step[:rank]`` SIGKILLs that rank at the point.
- ``SHARDFORGE_RAISE_AT=point:step[:rank]`` raises a ``RuntimeError`` there (an unexpected crash).
- ``SHARDFORGE_PAUSE_AT=point:step[:rank]`` pauses that rank there: it writes the file named by
  ``SHARDFORGE_PAUSE_FILE`` (the test's cue to send a signal) and waits until a stop signal has
  arrived (at most :data:`PAUSE_LIMIT_S`), then goes on as if nothing happened.
- ``SHARDFORGE_NOSPACE_FROM=point:step[:rank]`` raises ``OSError(ENOSPC)`` at that point of that
  step and every later one: a disk that stays full, where mounting a small tmpfs needs root.
- ``SHARDFORGE_NAN_AT=step[:rank]`` and ``SHARDFORGE_HANG_AT=step[:rank]``: see :func:`fault_step`.
- ``SHARDFORGE_FAULTS_IN_RUN=N``: every fault above fires only in run N of a Slurm job (its
  ``SLURM_RESTART_COUNT``, 0 for the first run), so a job requeued after the fault goes on cleanly.

Points: ``prepare`` (step 0, before rank 0 prepares the data), ``forward``, ``backward`` and
``optimizer`` of step N, and a checkpoint of step N's ``write``, ``rename``, ``manifest`` and
``prune``. Rank defaults to 0.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

PAUSE_LIMIT_S = 120.0


def _in_faulted_run() -> bool:
    wanted = os.environ.get("SHARDFORGE_FAULTS_IN_RUN")
    return wanted is None or int(wanted) == int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _matches(variable: str, name: str, step: int, rank: int, onwards: bool = False) -> bool:
    spec = os.environ.get(variable)
    if not spec or not _in_faulted_run():
        return False
    where, at_step, *at_rank = spec.split(":")
    hit = step >= int(at_step) if onwards else step == int(at_step)
    return where == name and hit and int(at_rank[0] if at_rank else 0) == rank


POINT_VARIABLES = ("SHARDFORGE_KILL_AT", "SHARDFORGE_RAISE_AT", "SHARDFORGE_PAUSE_AT", "SHARDFORGE_NOSPACE_FROM")


def points_armed() -> bool:
    """Whether any :func:`fault_point` can fire in this process (the loop skips the calls if not)."""
    return _in_faulted_run() and any(os.environ.get(v) for v in POINT_VARIABLES)


def fault_point(name: str, step: int, rank: int) -> None:
    """A named point of the rank program: kill or pause here when the environment asks for it."""
    if _matches("SHARDFORGE_KILL_AT", name, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if _matches("SHARDFORGE_NOSPACE_FROM", name, step, rank, onwards=True):
        import errno

        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name} of step {step}: SHARDFORGE_NOSPACE_FROM)")
    if _matches("SHARDFORGE_RAISE_AT", name, step, rank):
        raise RuntimeError(f"injected fault at {name} of step {step} on rank {rank} (SHARDFORGE_RAISE_AT)")
    if _matches("SHARDFORGE_PAUSE_AT", name, step, rank):
        _pause_until_stop_requested(f"{name}:{step}:{rank}")


def _pause_until_stop_requested(where: str) -> None:
    from train.stop_signals import StopRequest

    cue = os.environ.get("SHARDFORGE_PAUSE_FILE")
    if cue:
        Path(cue).write_text(where)
    stop = StopRequest.install()
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.02)


def fault_step(variable: str, rank: int) -> int:
    """``VARIABLE=step[:rank]`` names the step for this rank (0: none).

    ``SHARDFORGE_NAN_AT`` poisons that step's loss with NaN; ``SHARDFORGE_HANG_AT`` sleeps in its
    data phase.
    """
    spec = os.environ.get(variable)
    if not spec or not _in_faulted_run():
        return 0
    at_step, *at_rank = spec.split(":")
    return int(at_step) if int(at_rank[0] if at_rank else 0) == rank else 0


def install(train_step, rank: int) -> None:
    """Arm the faults the environment asks for on a :class:`train.loop.step.TrainStep`, by wrapping its
    ``run``, ``loss_fn``, ``next_batch`` and ``optimizer_step`` (nothing changes when none is set).
    The wrapped ``run`` notes the step, which the other wrappers read."""
    nan_at, hang_at = fault_step("SHARDFORGE_NAN_AT", rank), fault_step("SHARDFORGE_HANG_AT", rank)
    armed = points_armed()
    if not (nan_at or hang_at or armed):
        return
    run, loss_fn = train_step.run, train_step.loss_fn
    next_batch, optimizer_step = train_step.next_batch, train_step.optimizer_step
    current: dict[str, Optional[int]] = {"step": None}  # None until the first step runs

    def faulty_run(step: int):
        current["step"] = step
        if armed:  # before the step's first batch (and its timer: a pause here is not step time)
            fault_point("forward", step, rank)
        return run(step)

    def faulty_loss(model, batch):
        loss = loss_fn(model, batch)
        if nan_at and current["step"] == nan_at:  # the non-finite tests' divergence
            loss = loss * float("nan")
        if armed:  # the engine runs backward right after the loss
            fault_point("backward", current["step"], rank)
        return loss

    def faulty_next_batch():
        if hang_at and current["step"] == hang_at:
            time.sleep(10**6)  # a rank stuck in its data phase, for the watchdog
        return next_batch()

    def faulty_optimizer_step(nonfinite):
        if armed:
            fault_point("optimizer", current["step"], rank)
        return optimizer_step(nonfinite)

    train_step.run, train_step.loss_fn = faulty_run, faulty_loss
    train_step.next_batch, train_step.optimizer_step = faulty_next_batch, faulty_optimizer_step
