"""The Saver (train/loop/save_schedule.py) on its own: when checkpoints are written, committed
in the background and kept, with a fake checkpointer that records what it is asked (issue 34 item 4).

``train.loop.trainer.train`` asks it after every step: ``save_best`` on a new best evaluation,
``flags()`` for the ranks' agreement, then ``after_step`` with what was agreed (an agreed stop
is saved as ``signal``); ``finish`` after the loop. No test here launches training.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.loop_fakes import CPU, QUIET, WRITING, FakeCheckpointer, FakeGuard, FakeStopRequest, FakeWatchdog
from tests.loop_fakes import one_rank_group  # noqa: F401 - a fixture, found by its name here
from train.checkpoint.files import step_dir_name
from train.checkpoint.manager import CheckpointSaveError
from train.loop.save_schedule import Saver
from train.checkpoint.state import Counters
from train.loop.agreement import Agreed, Stopper
from train.metrics.early_stopping import EarlyStopping
from train.loop.nonfinite import NonFiniteStop
from train.config.recipe import recipe_from_dict
from train.rundir import BEST_FILE

def make_rig(tmp_path: Path, checkpoint: dict = None, keep_best: bool = False, is_main: bool = True,
             **checkpointer) -> SimpleNamespace:
    """A Saver with this ``checkpoint:`` section over a fake checkpointer (``checkpointer``: its
    arguments), real counters and early stopping on the loss."""
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    recipe = recipe_from_dict({"checkpoint": checkpoint or {}, "eval": {"keep_best": keep_best}})
    rig = SimpleNamespace(ckpt=FakeCheckpointer(**checkpointer), counters=Counters(), guard=FakeGuard(),
                          early=EarlyStopping("loss"))
    rig.saver = Saver(rig.ckpt, recipe=recipe, counters=rig.counters,
                      batches=SimpleNamespace(fingerprint=lambda steps_back=0: "fp", sample_order="test-order"),
                      early=rig.early, guard=rig.guard,
                      watchdog=FakeWatchdog(), run_dir=tmp_path, is_main=is_main)
    return rig


def after_step(rig, step: int, last: bool = False, agreed: Agreed = QUIET) -> None:
    rig.counters.step = step  # the Saver saves at the counters' step, as in the loop
    rig.saver.after_step(step, last, agreed)


@pytest.mark.parametrize("at_end, saved", [(True, [(3, "periodic"), (6, "periodic"), (8, "end")]),
                                           (False, [(3, "periodic"), (6, "periodic")])])
def test_saver_saves_every_n_steps_and_at_the_end_when_asked(tmp_path, at_end, saved):
    rig = make_rig(tmp_path, {"every_steps": 3, "at_end": at_end})
    for step in range(1, 9):
        after_step(rig, step, last=step == 8)
    assert [s[:3] for s in rig.ckpt.saves] == [(*s, False) for s in saved]  # synchronous without async_save


def test_a_clock_save_is_flagged_by_rank0_and_taken_once_agreed(tmp_path):
    rig = make_rig(tmp_path, {"every_minutes": 1})
    assert rig.saver.flags() == (False, False)  # the clock starts with the launch
    rig.saver.last_save_time -= 61
    assert rig.saver.flags() == (True, False)
    other = make_rig(tmp_path, {"every_minutes": 1}, is_main=False)
    other.saver.last_save_time -= 61
    assert other.saver.flags() == (False, False)  # rank 0's clock decides; the agreement tells the rest
    after_step(rig, 5, agreed=Agreed(stop=False, save=True, writing=False))
    assert rig.ckpt.saves == [(5, "periodic", False, set())]
    assert rig.saver.flags() == (False, False)  # a save restarts the clock
    # the flag agreed after step 6 was raised after step 5, before that save: stale, no second save
    after_step(rig, 6, agreed=Agreed(stop=False, save=True, writing=False))
    assert len(rig.ckpt.saves) == 1


def test_a_new_best_is_saved_at_once_pointed_at_and_kept_from_pruning(tmp_path):
    rig = make_rig(tmp_path, {"every_steps": 10}, keep_best=True)
    rig.counters.step = 3
    rig.early.update(2.0, 3)
    rig.saver.save_best(3, last=False, previous_best=None)
    assert rig.ckpt.saves == [(3, "best", False, {3})]
    best = json.loads((tmp_path / "checkpoints" / BEST_FILE).read_text())
    assert (best["step"], best["checkpoint"], best["value"]) == (3, step_dir_name(3), 2.0)
    rig.counters.step = 5
    rig.early.update(1.0, 5)
    rig.saver.save_best(5, last=False, previous_best=3)
    assert rig.ckpt.saves[-1] == (5, "best", False, {3, 5})  # the old best stays until the new one is committed
    after_step(rig, 10)
    assert rig.ckpt.saves[-1] == (10, "periodic", False, {5})  # every later save keeps the best


@pytest.mark.parametrize("step, last, at_end, reason", [(4, False, True, "periodic"), (7, True, True, "end"),
                                                        (7, True, False, "best"), (5, False, True, "best")])
def test_a_best_is_saved_once_by_whichever_save_falls_on_its_step(tmp_path, step, last, at_end, reason):
    rig = make_rig(tmp_path, {"every_steps": 4, "at_end": at_end}, keep_best=True)
    rig.counters.step = step
    rig.early.update(1.0, step)
    rig.saver.save_best(step, last, previous_best=None)
    after_step(rig, step, last)
    assert [s[:2] for s in rig.ckpt.saves] == [(step, reason)]
    assert json.loads((tmp_path / "checkpoints" / BEST_FILE).read_text())["step"] == step


def test_without_keep_best_no_best_is_saved_or_protected(tmp_path):
    rig = make_rig(tmp_path, {"every_steps": 4})
    rig.early.update(1.0, 3)
    rig.counters.step = 3
    rig.saver.save_best(3, last=False, previous_best=None)
    after_step(rig, 4)
    assert rig.ckpt.saves == [(4, "periodic", False, set())]
    assert not (tmp_path / "checkpoints" / BEST_FILE).exists()


def test_a_background_save_commits_once_no_rank_is_writing_it(tmp_path, logged):
    rig = make_rig(tmp_path, {"every_steps": 5, "async_save": True})
    after_step(rig, 5)
    assert rig.ckpt.saves == [(5, "periodic", True, set())] and rig.ckpt.committed == []
    after_step(rig, 6)  # agreed now: the flags sent after step 5, before this write began
    assert rig.ckpt.committed == []
    after_step(rig, 7, agreed=WRITING)  # some rank is still writing it
    assert rig.ckpt.committed == []
    after_step(rig, 8)
    assert rig.ckpt.committed == [5] and "committed step-000005" in logged[-1]


def test_the_last_step_and_finish_commit_a_background_save_without_waiting_for_agreement(tmp_path):
    rig = make_rig(tmp_path, {"every_steps": 5, "async_save": True, "at_end": False})
    after_step(rig, 5)
    after_step(rig, 6, last=True, agreed=WRITING)
    assert rig.ckpt.committed == [5]
    stopped = make_rig(tmp_path, {"every_steps": 5, "async_save": True})
    after_step(stopped, 5)
    stopped.saver.finish()  # the loop ended early (a stop, or early stopping)
    assert stopped.ckpt.committed == [5]


def test_after_step_does_not_depend_on_flags_having_been_asked(tmp_path):
    """``after_step`` finds the background write itself (it used to commit only a write that an
    earlier ``flags()`` call had noted), and ``flags()`` is a query that changes no state."""
    rig = make_rig(tmp_path, {"every_steps": 5, "async_save": True})
    after_step(rig, 5)
    after_step(rig, 7)  # flags() never asked since the write began
    assert rig.ckpt.committed == [5]
    asked = make_rig(tmp_path, {"every_steps": 5, "async_save": True})
    after_step(asked, 5)
    asked.ckpt.still_writing = True
    state = dict(vars(asked.saver))
    assert asked.saver.flags() == asked.saver.flags() == (False, True)
    assert vars(asked.saver) == state


def test_a_stop_save_is_synchronous_named_signal_and_commits_what_is_in_flight(tmp_path):
    rig = make_rig(tmp_path, {"every_steps": 5, "async_save": True})
    after_step(rig, 5)
    rig.counters.step = 6
    assert rig.saver.save("signal")
    assert rig.ckpt.saves[-1] == (6, "signal", False, set())
    assert rig.ckpt.committed == [5, 6] and rig.ckpt.pending is None


@pytest.mark.parametrize("on_error, reason, fails_the_run", [
    ("continue", "periodic", False), ("continue", "best", False),
    ("continue", "end", True), ("continue", "signal", True),  # nothing else would hold the run's end
    ("stop", "periodic", True)])
def test_a_failed_save_ends_the_run_unless_on_error_continue_and_a_later_save_can_follow(
        tmp_path, logged, on_error, reason, fails_the_run):
    rig = make_rig(tmp_path, {"on_error": on_error}, fail=True)
    rig.counters.step = 4
    if fails_the_run:
        with pytest.raises(CheckpointSaveError):
            rig.saver.save(reason)
    else:
        assert rig.saver.save(reason) is False
        assert "training goes on" in logged[-1]


def test_nothing_is_saved_after_a_non_finite_step_or_of_non_finite_weights(tmp_path):
    bad_weights = make_rig(tmp_path, finite=False)
    bad_weights.counters.step = 3
    with pytest.raises(NonFiniteStop, match="weights hold NaN or inf at step 3"):
        bad_weights.saver.save("periodic")
    bad_step = make_rig(tmp_path)
    bad_step.guard.stop = True
    bad_step.counters.step = 3
    with pytest.raises(NonFiniteStop):
        bad_step.saver.save("end")
    assert bad_weights.ckpt.saves == bad_step.ckpt.saves == [] and bad_step.guard.checks == [3]


# ---- the Saver with the Stopper, in the order train() asks them

def save_and_stop_loop(rig, stopper: Stopper, max_steps: int, request: FakeStopRequest = None,
                       signal_at: int = None):
    """The save-and-stop half of ``train()``'s loop, call for call. Returns the step it stopped
    at (``None``: it completed) and, for each committed checkpoint, the step it was committed after."""
    committed_after = {}
    for step in range(1, max_steps + 1):
        rig.counters.step = step
        if step == signal_at:
            request.signal_name = "SIGUSR1"
        last = step == max_steps
        agreed = stopper.agree(step, last, *rig.saver.flags())
        rig.saver.after_step(step, last, agreed)
        if agreed.stop:
            return step, committed_after
        committed_after.update({s: step for s in rig.ckpt.committed if s not in committed_after})
    rig.saver.finish()
    return None, committed_after


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("signal_at, stop_after, stopped_at, saved", [
    (5, 0, 6, [(4, "periodic"), (6, "signal")]),  # acted on one step late, by every rank alike
    (None, 6, 6, [(4, "periodic"), (6, "signal")]),
    (10, 0, None, [(4, "periodic"), (8, "periodic"), (10, "end")])])  # on the last step: the run completes
def test_an_agreed_stop_saves_and_ends_the_loop(tmp_path, logged, signal_at, stop_after, stopped_at, saved):
    rig, request = make_rig(tmp_path, {"every_steps": 4}), FakeStopRequest()
    stopper = Stopper(request, CPU, stop_after, first_step=0)
    assert save_and_stop_loop(rig, stopper, 10, request, signal_at)[0] == stopped_at
    assert [s[:2] for s in rig.ckpt.saves] == saved
    said = [line for line in logged if line.startswith("stop requested")]
    reason = "SIGUSR1" if signal_at else f"train.stop_after={stop_after}"
    assert said == ([f"stop requested ({reason}) at step {stopped_at}: saving and exiting with code 75"]
                    if stopped_at else [])
    if stopped_at:  # said before the stop's save, as a job log should read
        assert logged.index(said[0]) < next(i for i, line in enumerate(logged) if "(signal" in line)


@pytest.mark.usefixtures("one_rank_group")
def test_background_saves_commit_two_steps_after_they_start_when_the_write_is_done(tmp_path):
    rig = make_rig(tmp_path, {"every_steps": 3, "async_save": True})
    stopped_at, committed_after = save_and_stop_loop(rig, Stopper(FakeStopRequest(), CPU, 0, 0), 10)
    assert stopped_at is None
    assert [s[:3] for s in rig.ckpt.saves] == [(3, "periodic", True), (6, "periodic", True),
                                               (9, "periodic", True), (10, "end", False)]
    assert committed_after == {3: 5, 6: 8, 9: 10, 10: 10}
