"""Fakes shared by the loop-part tests (tests/test_loop_parts.py, tests/test_loop_saver.py): each
stands in for what one part sees of another, so a test pins one part's promise and nothing else."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from train.checkpoint.files import step_dir_name
from train.checkpoint.manager import CheckpointSaveError
from train.loop.agreement import Agreed
from train.loop.nonfinite import NonFiniteStop

CPU = torch.device("cpu")
QUIET = Agreed(stop=False, save=False, writing=False)
"""No rank raised anything."""
WRITING = Agreed(stop=False, save=False, writing=True)
"""Some rank is still writing a background save."""


@pytest.fixture(scope="module")
def one_rank_group():
    """The parts call collectives; in a one-rank gloo group they return at once. Left as found, so
    other files' tests (which start their own group) may run after these in the same process."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---- fakes

class FakeCheckpointer:
    """Records what the Saver asks for. Like the real one, a background save stays pending until
    :meth:`wait` commits it, and any new save commits a pending one first."""

    def __init__(self, finite: bool = True, fail: bool = False):
        self.engine = SimpleNamespace(weights_finite=lambda: finite)
        self.fail, self.still_writing = fail, False
        self.saves: list[tuple] = []  # (step, reason, background, protect)
        self.committed: list[int] = []
        self.pending = None
        self.last_save_s = self.last_commit_s = 0.0

    def save(self, step, keep_last, keep_every, extra_manifest, protect=frozenset(), background=False) -> Path:
        self.wait()
        if self.fail:
            raise CheckpointSaveError(f"checkpoint: saving step {step} failed: No space left on device")
        self.saves.append((step, extra_manifest["reason"], background, set(protect)))
        if background:
            self.pending = SimpleNamespace(step=step)
        else:
            self.committed.append(step)
        return Path(step_dir_name(step))

    def write_in_flight(self) -> bool:
        return self.pending is not None and self.still_writing

    def wait(self):
        if self.pending is None:
            return None
        step, self.pending = self.pending.step, None
        self.committed.append(step)
        return Path(step_dir_name(step))


class FakeGuard:
    """The non-finite guard as the parts see it: ``check`` raises when a step went non-finite."""

    def __init__(self, nonfinite: int = 0, stop: bool = False):
        self.nonfinite, self.stop, self.checks = nonfinite, stop, []

    def check(self, step: int) -> None:
        self.checks.append(step)
        if self.stop:
            raise NonFiniteStop(f"non-finite loss at step {step}")

    def total(self) -> int:
        return self.nonfinite


class FakeWatchdog:
    def __init__(self):
        self.beats = []

    def beat(self, step: int, what: str, restart: bool = False) -> None:
        self.beats.append((step, what))


class FakeWriter:
    """Rank 0's metrics sink: the rows it was given."""

    def __init__(self):
        self.rows, self.progressed = [], []

    def write(self, step: int, values: dict) -> None:
        self.rows.append((step, values))

    def progress(self, step: int, values: dict) -> None:
        self.progressed.append(step)


class FakeStopRequest:
    """What a stop signal sets (the real one installs signal handlers, not wanted in pytest)."""

    def __init__(self, signal_name=None):
        self.signal_name = signal_name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
