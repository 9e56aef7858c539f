"""The training loop's parts one at a time, with small fakes around them (issue 34 item 4): the
Stopper and the ranks' StepAgreement, StepMetrics and the Evaluator (the Saver: tests/test_loop_saver.py).

``train.loop.trainer.train`` calls them after every step in this order: ``StepMetrics.record`` →
``Evaluator.maybe_eval`` → ``Saver.save_best`` → ``Stopper.agree(*Saver.flags())`` →
``Saver.after_step`` (which saves an agreed stop); then the loop ends on a stop. The end-to-end tests launch real runs; these
pin what each part promises, in seconds, without launching anything. Collectives run in a one-rank
gloo group in this process; where a second rank matters, it is a scripted fake of ``torch.distributed``.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from tests.loop_fakes import CPU, FakeGuard, FakeStopRequest, FakeWatchdog, FakeWriter
from tests.loop_fakes import one_rank_group  # noqa: F401 - a fixture, found by its name here
from train.checkpoint.files import MANIFEST, step_dir_name
from train.config.recipe import EvalConfig, TrainConfig
from train.checkpoint.state import Counters
from train.loop import agreement
from train.loop.agreement import Agreed, StepAgreement, Stopper
from train.metrics.early_stopping import EarlyStopping
from train.metrics.evaluation import TEST_JSON, Evaluator
from train.metrics.step_metrics import LogWindow, StepMetrics, StepResult

# ---- StepAgreement and Stopper: every rank stops, saves and commits at the same step


class FakeWork:
    """An asynchronous all-reduce: its result lands in the tensor only once it is waited on."""

    def __init__(self, land):
        self.land = land

    def wait(self) -> None:
        self.land()


class TwoRankDist:
    """``torch.distributed`` as ``train.loop.agreement`` sees it, with one more rank whose flags
    the test scripts, step by step."""

    ReduceOp = dist.ReduceOp

    def __init__(self, peer_flags: list[tuple[int, int, int]]):
        self.peer_flags, self.new_groups, self.reduced_in = list(peer_flags), [], []

    def get_world_size(self) -> int:
        return 2

    def new_group(self, backend=None):
        self.new_groups.append(backend)
        return f"{backend} group"

    def all_reduce(self, tensor, op, group=None, async_op=False):
        assert op == dist.ReduceOp.MAX and async_op  # "raised on any rank", without waiting in the step
        self.reduced_in.append(group)
        peer = torch.tensor(self.peer_flags.pop(0), dtype=tensor.dtype)
        return FakeWork(lambda: tensor.copy_(torch.maximum(tensor, peer)))


def test_step_agreement_raises_each_flag_any_rank_raised_one_step_late(monkeypatch):
    fake = TwoRankDist([(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)])  # the peer's (stop, save, writing)
    monkeypatch.setattr(agreement, "dist", fake)
    flags = StepAgreement(CPU)
    mine = [(False, False, False), (False, False, True), (False, False, False), (True, False, False)]
    assert [flags.exchange(*m) for m in mine] == [
        Agreed(stop=False, save=False, writing=True),  # nothing agreed yet: a write may be in flight
        Agreed(stop=False, save=False, writing=False),  # after step 1 nobody raised anything
        Agreed(stop=True, save=False, writing=True),  # step 2: the peer's stop, this rank's write
        Agreed(stop=False, save=True, writing=False)]  # step 3: the peer's clock save
    assert fake.new_groups == [] and fake.reduced_in == [None] * 4  # on CPU: the default (gloo) group


def test_the_last_exchange_waits_and_says_what_is_true_now(monkeypatch):
    """On the last step nothing is left for later: stop and save as raised then or one step ago,
    and whether a write is still in flight as of now."""
    monkeypatch.setattr(agreement, "dist", TwoRankDist([(0, 0, 1), (0, 1, 0)]))
    flags = StepAgreement(CPU)
    flags.exchange(False, False, False)  # after step 1 the peer was still writing
    assert flags.exchange(False, False, False, wait_now=True) == Agreed(stop=False, save=True, writing=False)


def test_on_gpus_the_flags_travel_through_a_gloo_group_of_their_own(monkeypatch):
    """Reading the flags must never wait for the GPU's queue of kernels: they stay in CPU memory."""
    fake = TwoRankDist([(0, 0, 0)])
    monkeypatch.setattr(agreement, "dist", fake)
    StepAgreement(torch.device("cuda", 0)).exchange(False, False, False)
    assert fake.new_groups == ["gloo"] and fake.reduced_in == ["gloo group"]


@pytest.mark.usefixtures("one_rank_group")
def test_stopper_stops_after_stop_after_steps_of_this_launch():
    request = FakeStopRequest()
    stopper = Stopper(request, CPU, stop_after=3, first_step=10)  # resumed at step 10
    assert [stopper.agree(step, False, False, False).stop for step in (11, 12, 13)] == [False, False, True]
    assert stopper.reason == "train.stop_after=3"
    assert request.signal_name is None  # the signal request stays the signal handler's
    request.signal_name = "SIGTERM"
    assert stopper.reason == "SIGTERM"


@pytest.mark.usefixtures("one_rank_group")
def test_a_stop_signal_is_acted_on_one_step_after_it_arrives():
    request = FakeStopRequest()
    stopper = Stopper(request, CPU, stop_after=0, first_step=0)
    assert not stopper.agree(1, False, False, False).stop
    request.signal_name = "SIGUSR1"
    assert not stopper.agree(2, False, False, False).stop  # sent now, read after the next step
    assert stopper.agree(3, False, False, False).stop
    assert stopper.reason == "SIGUSR1"


def test_a_stop_raised_on_another_rank_stops_this_one_too(monkeypatch):
    monkeypatch.setattr(agreement, "dist", TwoRankDist([(1, 0, 0), (0, 0, 0)]))
    stopper = Stopper(FakeStopRequest(), CPU, stop_after=0, first_step=0)
    assert [stopper.agree(step, False, False, False).stop for step in (1, 2)] == [False, True]
    assert stopper.reason == "stop signal on another rank"


@pytest.mark.usefixtures("one_rank_group")
def test_on_the_last_step_a_stop_changes_nothing_and_the_flags_are_current():
    stopper = Stopper(FakeStopRequest("SIGTERM"), CPU, stop_after=1, first_step=0)
    assert stopper.agree(1, True, True, False) == Agreed(stop=False, save=True, writing=False)


# ---- StepMetrics: one row per log step, nothing in between

LOGGED = {"loss", "grad_norm", "lr", "tokens_per_s", "tokens_per_s_per_device", "samples_per_s", "step_time_s",
          "data_wait_s", "fwd_bwd_s", "optim_s", "model_tflops", "mfu", "skipped_steps", "nonfinite_steps",
          "tokens", "epoch", "host_cpu_util/mean"}
"""Keys of every log row on CPU (the README lists them; telemetry adds per-rank min/mean/max)."""


class FakeTelemetry:
    def drain(self) -> dict:
        return {"host_cpu_util": 50.0}


def make_metrics(writer, guard, log_every: int, max_steps: int, scaler_skips: int = 0,
                 window: LogWindow = None) -> StepMetrics:
    """One rank, 2 micro-batches per step, 8 samples per step, 80 training samples."""
    engine = SimpleNamespace(lr=3e-4, skipped_steps=scaler_skips)  # fp16 loss scaler skips
    return StepMetrics(engine=engine, guard=guard, telemetry=FakeTelemetry(), writer=writer, device=CPU, world_size=1,
                       accum=2, train=TrainConfig(global_batch_size=8, log_every=log_every, max_steps=max_steps),
                       flops_token=1e6, peak_tflops=None, window=window or LogWindow(CPU), train_samples=80)


def train_step(metrics: StepMetrics, counters: Counters, losses: tuple[float, ...], tokens: int = 10) -> None:
    """What the loop does with a step's result: advance the counters, then record it."""
    loss_tensors = [torch.tensor(x) for x in losses]
    result = StepResult(loss_tensors, torch.tensor(float(sum(not math.isfinite(x) for x in losses))),
                        torch.tensor(0.5), tokens, 0.01,
                        [("data_wait_s", 0.0, 0.001), ("fwd_bwd_s", 0.001, 0.006), ("optim_s", 0.006, 0.008)])
    counters.advance(tokens, result.seconds)
    metrics.record(result, counters)


@pytest.mark.usefixtures("one_rank_group")
def test_step_metrics_write_one_row_per_log_step_and_at_the_last_step():
    writer, guard, counters = FakeWriter(), FakeGuard(), Counters()
    metrics = make_metrics(writer, guard, log_every=3, max_steps=7)
    for _ in range(7):
        train_step(metrics, counters, (2.0, 2.0))
    assert [step for step, _ in writer.rows] == writer.progressed == [3, 6, 7]
    assert guard.checks == [3, 6, 7]  # the non-finite policy is enforced at each log step
    assert all(LOGGED <= set(values) for _, values in writer.rows)
    assert [(v["tokens"], v["epoch"], v["lr"]) for _, v in writer.rows] == [(30, 0.3, 3e-4), (60, 0.6, 3e-4),
                                                                           (70, 0.7, 3e-4)]


@pytest.mark.usefixtures("one_rank_group")
def test_the_logged_loss_is_the_mean_of_the_windows_finite_micro_batch_losses():
    writer, counters = FakeWriter(), Counters()
    metrics = make_metrics(writer, FakeGuard(), log_every=2, max_steps=6)
    nan, inf = float("nan"), float("inf")
    for losses in ((1.0, 3.0), (2.0, nan), (4.0, 2.0), (inf, 30.0), (nan, -inf), (inf, nan)):
        train_step(metrics, counters, losses)
    logged = [values["loss"] for _, values in writer.rows]
    assert logged[:2] == [2.0, 12.0]  # (1 + 3 + 2) / 3, then a fresh window: (4 + 2 + 30) / 3
    assert math.isnan(logged[2])  # no finite loss at all: not a made-up 0


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("scaler_skips, nonfinite, skipped", [(0, 2, 2), (5, 2, 5)])
def test_skipped_steps_count_the_loss_scalers_skips_or_the_guards_whichever_is_more(
        scaler_skips, nonfinite, skipped):
    writer = FakeWriter()
    metrics = make_metrics(writer, FakeGuard(nonfinite=nonfinite), log_every=1, max_steps=1, scaler_skips=scaler_skips)
    train_step(metrics, Counters(), (1.0, 1.0))
    assert (writer.rows[0][1]["skipped_steps"], writer.rows[0][1]["nonfinite_steps"]) == (skipped, nonfinite)


@pytest.mark.usefixtures("one_rank_group")
def test_a_log_window_resumed_from_a_checkpoint_logs_what_the_uninterrupted_run_logs():
    steps = [(1.0, 2.0), (3.0, 4.0), (5.0, 6.0), (7.0, 9.0)]
    straight, counters = FakeWriter(), Counters()
    metrics = make_metrics(straight, FakeGuard(), log_every=4, max_steps=8)
    for losses in steps:
        train_step(metrics, counters, losses)
    before, counters = FakeWriter(), Counters()
    metrics = make_metrics(before, FakeGuard(), log_every=4, max_steps=8)
    for losses in steps[:2]:
        train_step(metrics, counters, losses)
    saved = {"window": metrics.window.state_dict(), "counters": counters.state_dict()}  # what a checkpoint holds
    resumed_window, counters = LogWindow(CPU), Counters()
    resumed_window.load_state_dict(saved["window"])
    counters.load_state_dict(saved["counters"])
    after = FakeWriter()
    metrics = make_metrics(after, FakeGuard(), log_every=4, max_steps=8, window=resumed_window)
    for losses in steps[2:]:
        train_step(metrics, counters, losses)
    assert before.rows == []
    assert [(s, v["loss"], v["tokens"]) for s, v in after.rows] == [(s, v["loss"], v["tokens"]) for s, v in
                                                                    straight.rows] == [(4, 37 / 8, 40)]


# ---- Evaluator: when the validation split is evaluated, and what early stopping hears

VAL = [{"input_ids": torch.zeros(2, 4, dtype=torch.long)}]


class FakeEvalEngine:
    """Returns one scripted (loss, accuracy) per evaluation; notes the mode it evaluated in."""

    def __init__(self, scores):
        self.scores, self.training, self.evaluated_in_train_mode, self.loaded = list(scores), True, [], []

    def eval(self) -> None:
        self.training = False

    def train(self) -> None:
        self.training = True

    def eval_forward(self, batch, eval_sums):
        self.evaluated_in_train_mode.append(self.training)
        return torch.tensor(self.scores.pop(0))

    def load(self, path, world_size: int) -> None:
        self.loaded.append((path.name, world_size))


class FakeTask:
    metric_names = ("loss", "accuracy")
    eval_sums = None

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        loss, accuracy = sums.tolist()
        return {"loss": loss, "accuracy": accuracy}


def make_evaluator(scores, early: EarlyStopping, eval_every: int, keep_best: bool = False, writer=None):
    return Evaluator(FakeEvalEngine(scores), FakeTask(), val=VAL, early=early, eval_cfg=EvalConfig(keep_best=keep_best),
                     eval_every=eval_every, device=CPU, writer=writer, watchdog=FakeWatchdog())


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("eval_every, evaluated", [(4, [4, 8, 10]), (5, [5, 10]), (0, [10])])
def test_evaluator_evaluates_every_eval_every_steps_and_at_the_end(eval_every, evaluated):
    writer = FakeWriter()
    evaluator = make_evaluator([(3.0, 0.5)] * len(evaluated), EarlyStopping("loss"), eval_every, writer=writer)
    for step in range(1, 11):
        evaluator.maybe_eval(step, last=step == 10)
    assert writer.rows == [(step, {"eval_loss": 3.0, "eval_ppl": None, "eval_accuracy": 0.5}) for step in evaluated]
    assert evaluator.watchdog.beats == [(step, "evaluation") for step in evaluated]
    engine = evaluator.engine
    assert engine.training and not any(engine.evaluated_in_train_mode)  # eval mode inside, train mode after


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("metric, improved, best_step, stopped", [
    ("loss", [True, True, False, False], 4, True),  # lower is better: two evaluations without a gain
    ("accuracy", [True, True, True, True], 8, False)])  # higher is better
def test_evaluations_feed_early_stopping_the_metric_it_watches(logged, metric, improved, best_step, stopped):
    early, logs = EarlyStopping(metric, patience=2), logged
    scores = [(3.0, 0.25), (2.0, 0.5), (2.5, 0.625), (2.25, 0.75)]
    evaluator = make_evaluator(scores, early, eval_every=2)
    assert [evaluator.maybe_eval(step, last=False) for step in (2, 4, 6, 8)] == improved
    assert (early.best_step, early.stopped) == (best_step, stopped)
    assert ("early stopping" in logs[-1]) == stopped


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("keep_best, weights", [(True, f"{step_dir_name(4)} (best loss)"),
                                                (False, f"{step_dir_name(10)} (final weights)")])
def test_the_test_split_is_evaluated_once_with_the_best_checkpoints_weights_when_kept(tmp_path, keep_best, weights):
    early, writer = EarlyStopping("loss"), FakeWriter()
    early.update(1.0, 4)
    best = tmp_path / "checkpoints" / step_dir_name(4)
    best.mkdir(parents=True)
    (best / MANIFEST).write_text(json.dumps({"world_size": 2}))  # saved by two ranks
    evaluator = make_evaluator([(0.5, 0.75)], early, eval_every=0, keep_best=keep_best, writer=writer)
    evaluator.test([{}] * 6, VAL, None, tmp_path, step=10, is_main=True)
    assert evaluator.engine.loaded == ([(step_dir_name(4), 2)] if keep_best else [])
    assert json.loads((tmp_path / TEST_JSON).read_text()) == {"step": 10, "checkpoint": weights, "samples": 6,
                                                               "metrics": {"loss": 0.5, "accuracy": 0.75}}
    assert writer.rows == [(10, {"test_loss": 0.5, "test_accuracy": 0.75})]


def test_phase_times_are_read_at_log_steps_from_cuda_events():
    """A fake ``torch.cuda.Event`` (no GPU here; the narrowest seam: the class the clock makes): the
    clock records one event per mark, and a log step waits once, on the last event, then sums
    the GPU's own milliseconds per phase."""
    from train.metrics.phase_clock import PhaseClock, phase_seconds

    class FakeEvent:
        made: list["FakeEvent"] = []

        def __init__(self, enable_timing: bool):
            assert enable_timing
            self.stamp, self.synced = None, 0
            FakeEvent.made.append(self)

        def record(self):
            self.stamp = 10.0 * len(FakeEvent.made)  # ms on the stream's clock

        def synchronize(self):
            self.synced += 1

        def elapsed_time(self, end: "FakeEvent") -> float:
            return end.stamp - self.stamp

    real = torch.cuda.Event
    torch.cuda.Event = FakeEvent  # type: ignore[misc]
    try:
        clock = PhaseClock(torch.device("cuda"))
        marks = [clock.mark() for _ in range(4)]
    finally:
        torch.cuda.Event = real  # type: ignore[misc]
    spans = [("data_wait_s", marks[0], marks[1]), ("fwd_bwd_s", marks[1], marks[2]), ("optim_s", marks[2], marks[3])]
    assert phase_seconds(spans) == {"data_wait_s": 0.01, "fwd_bwd_s": 0.01, "optim_s": 0.01}
    assert [e.synced for e in FakeEvent.made] == [0, 0, 0, 1]
    assert phase_seconds([("optim_s", 1.0, 1.25)]) == {"data_wait_s": 0.0, "fwd_bwd_s": 0.0, "optim_s": 0.25}


def test_a_checkpoint_from_before_the_sample_order_changed_is_refused_naming_it():
    """A manifest without ``sample_order`` was written when epochs were numpy permutations: its next
    batch is not this code's, and the refusal says why instead of "unknown"."""
    from train.checkpoint.manager import CheckpointError
    from train.config.recipe import recipe_from_dict
    from train.data.batches import SAMPLE_ORDER
    from train.loop.trainer import check_fingerprint

    recipe = recipe_from_dict({"run": {"seed": 7}, "train": {"global_batch_size": 8}})
    batches = SimpleNamespace(fingerprint=lambda: "new")
    old = {"next_batch_fingerprint": "old", "data_key": "k", "seed": 7, "global_batch_size": 8}
    with pytest.raises(CheckpointError, match=r"changed: the sample order \(a checkpoint of shardforge before "):
        check_fingerprint(old, batches, recipe, "k")
    check_fingerprint({**old, "next_batch_fingerprint": "new", "sample_order": SAMPLE_ORDER}, batches, recipe, "k")
