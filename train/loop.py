"""The per-rank program: ``python -m train RUN_DIR`` (started by torchrun or Slurm)."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from train.checkpoint import (MANIFEST, Checkpointer, CheckpointError, CheckpointSaveError, Counters, RNGState,
                              step_dir_name)
from train.data import DataError, TrainBatches, eval_batches, prepare_data
from train.distributed import DistInfo, all_ranks_agree, init_distributed
from train.engines import build_engine
from train.faults import fault_point, fault_step, nan_fault, points_armed, with_backward_point
from train.evaluation import evaluate, headline, write_test_results
from train.metrics import MetricsWriter, Telemetry, aggregate_ranks, flops_per_token, mfu, peak_tflops
from train.model import build_model
from train.recipe import Recipe, RecipeProblems, eval_batch_count, grad_accum_steps
from train.rundir import (BEST_FILE, EXIT_BAD_INPUT, EXIT_REQUEUE, KIND_EXIT, LABELS_FILE, atomic_write,
                          read_recipe, write_error_report, write_status)
from train.scores import EarlyStopping
from train.tasks import build_task
from train.stop import StopRequest
from train.watchdog import Watchdog

class StepAgreement:
    """Agree across ranks on 'stop', 'save now' and 'a background save is still being written'
    without a host sync in the step.

    Each step launches a non-blocking all-reduce (MAX) of this rank's flags and reads the
    previous step's result, so every rank acts on the same step, one step late.
    """

    def __init__(self, device: torch.device):
        self.device, self._pending = device, None

    def exchange(self, stop: bool, save: bool, writing: bool,
                 wait_now: bool = False) -> tuple[bool, bool, bool]:
        """(stop, save, writing), each true when any rank raised it one step ago (now: ``wait_now``)."""
        agreed = [False, False, True]  # before any result: assume a write may be in flight
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            agreed = [bool(f > 0) for f in flags.tolist()]
            self._pending = None
        flags = torch.tensor([float(stop), float(save), float(writing)], device=self.device)
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True)
        if wait_now:  # the last step: settle everything now
            work.wait()
            now = [bool(f > 0) for f in flags.tolist()]
            return agreed[0] or now[0], agreed[1] or now[1], now[2]
        self._pending = (work, flags)
        return agreed[0], agreed[1], agreed[2]


def seed_rank(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def prepare_on_rank0(recipe: Recipe, d: DistInfo, run_dir: Path, log):
    """Rank 0 tokenizes (when the cache is cold); the others wait, then read the cache."""
    fault_point("prepare", 0, d.rank)
    data = prepare_data(recipe, log=log) if d.is_main else None
    try:
        dist.barrier()
    except RuntimeError as err:
        raise RuntimeError(f"rank {d.rank}: timed out waiting for rank 0 to prepare the data "
                           f"({err}); run `shardforge prepare` before launching") from None
    if data is None:
        data = prepare_data(recipe, log=lambda *_: None)
    if d.is_main:
        data.tokenizer.save_pretrained(str(run_dir / "tokenizer"))
        if data.labels:  # the label map, for export and for reading the metrics
            (run_dir / LABELS_FILE).write_text(json.dumps(data.labels, indent=1))
    return data



def resolve_epochs(recipe: Recipe, train_samples: int, log) -> None:
    """``train.epochs`` > 0 sets ``train.max_steps`` from the size of the training split."""
    t = recipe.train
    if t.epochs > 0:
        per_epoch = max(1, train_samples // t.global_batch_size)
        t.max_steps = max(1, math.ceil(t.epochs * per_epoch))
        log(f"train: {t.epochs:g} epochs of {per_epoch} steps ({train_samples} samples / "
            f"global batch {t.global_batch_size}) = {t.max_steps} steps")


def stopped_before_training(stop: StopRequest, run_dir: Path, d: DistInfo, step: int, phase: str, log) -> bool:
    """A stop that arrived before the first step of this launch ends it here: nothing new to save."""
    if not all_ranks_agree(stop.requested):
        return False
    reason = f"{stop.signal_name or 'stop signal on another rank'} {phase}; nothing new to save"
    log(f"stop requested ({reason}): exiting with code {EXIT_REQUEUE}")
    if d.is_main:
        write_status(run_dir, "stopped", step, reason, d.rank)
    dist.barrier()  # status.json is written before any rank exits
    dist.destroy_process_group()
    return True


CURRENT = Counters()
"""This process's progress counters (replaced by the run's own): error reports name the step."""


def train(run_dir: Path) -> int:
    global CURRENT
    recipe = read_recipe(run_dir)
    d = init_distributed(recipe.parallel.engine)
    log = print if d.is_main else (lambda *a, **k: None)
    stop = StopRequest.install()
    if d.is_main:
        write_status(run_dir, "running", -1)
    if not d.is_main:  # one copy of transformers' load reports and warnings is enough
        import transformers

        transformers.logging.set_verbosity_error()
    t, seq_len = recipe.train, recipe.data.seq_len
    accum = grad_accum_steps(recipe)

    data = prepare_on_rank0(recipe, d, run_dir, log)
    if stopped_before_training(stop, run_dir, d, -1, "during data preparation", log):
        return EXIT_REQUEUE
    resolve_epochs(recipe, len(data.train), log)
    task = build_task(recipe.task, data.labels)
    loss_tokens = task.sample_loss_tokens(data.train)  # None: every micro-batch weighs the same
    model = build_model(recipe.model, len(data.tokenizer), recipe.run.seed, recipe.task, data.labels, log=log)
    flops_token = flops_per_token(model, seq_len)
    engine = build_engine(recipe, model, d.device, run_dir)
    batches = TrainBatches(data.train, recipe.run.seed, t.global_batch_size, t.micro_batch_size,
                           d.rank, d.world_size, num_workers=recipe.data.num_workers,
                           pin_memory=d.device.type == "cuda")
    val = eval_batches(data.val, t.micro_batch_size, d.rank, d.world_size, eval_batch_count(recipe))
    counters = CURRENT = Counters()
    ckpt_cfg, ev = recipe.checkpoint, recipe.eval
    early = EarlyStopping(ev.metric, ev.mode, ev.patience, ev.min_delta)
    keep_best = ev.keep_best if ev.keep_best is not None else recipe.task != "causal_lm"
    checkpointer = Checkpointer(run_dir / "checkpoints", engine,
                                {"data": batches, "counters": counters, "rng": RNGState(), "early_stopping": early},
                                d.rank, d.world_size, meta={"engine": recipe.parallel.engine,
                                                            "data_key": data.key}, log=log)
    seed_rank(recipe.run.seed, d.rank)
    resume_from = checkpointer.find_resume_point(ckpt_cfg.resume)
    if resume_from is not None:
        manifest = checkpointer.load(resume_from)
        if manifest["world_size"] != d.world_size:
            seed_rank(recipe.run.seed + counters.step, d.rank)
        check_fingerprint(manifest, batches, recipe, data.key)
        log(f"resumed from {resume_from} at step {counters.step} "
            f"({manifest['world_size']} → {d.world_size} ranks)")

    device_name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
    peak = recipe.logging.peak_tflops or peak_tflops(device_name, recipe.parallel.precision)
    if peak is None:
        log(f"metrics: no peak TFLOP/s known for {device_name!r} in {recipe.parallel.precision}; "
            f"MFU is omitted (set logging.peak_tflops to report it)")
    writer = MetricsWriter(run_dir, recipe.logging.tensorboard, recipe.logging.console, t.max_steps,
                           counters.step) if d.is_main else None
    telemetry = Telemetry(d.local_rank if d.device.type == "cuda" else None,
                          recipe.logging.telemetry_interval_s, warn=log)
    if stopped_before_training(stop, run_dir, d, counters.step, "before the first step", log):
        telemetry.close()
        if writer:
            writer.close()
        return EXIT_REQUEUE
    agreement = StepAgreement(d.device)
    if d.is_main:
        write_status(run_dir, "running", counters.step, started=time.time())
    last_save_time, last_save_step = time.time(), -1

    def step_seconds() -> float:
        return counters.elapsed_s / max(1, counters.step)

    def save_failed(err: CheckpointSaveError) -> None:
        if ckpt_cfg.on_error == "stop":
            raise err
        log(f"warning: {err} (checkpoint.on_error=continue: training goes on)")

    def save(reason: str, protect: tuple = ()) -> bool:
        nonlocal last_save_time, last_save_step
        last_save_step = counters.step
        nonfinite.check(counters.step)  # never commit a checkpoint after a step that should stop
        if watchdog:
            watchdog.beat(counters.step, f"checkpoint save ({reason})", restart=True)
        background = ckpt_cfg.async_save and reason == "periodic"
        try:
            path = checkpointer.save(counters.step, ckpt_cfg.keep_last, ckpt_cfg.keep_every,
                                     {"tokens": counters.tokens, "reason": reason,
                                      "next_batch_fingerprint": batches.fingerprint(),
                                      "seed": recipe.run.seed, "global_batch_size": t.global_batch_size},
                                     protect={s for s in (*protect, early.best_step) if s and keep_best},
                                     background=background)
        except CheckpointSaveError as err:
            save_failed(err)
            last_save_time = time.time()
            return False
        last_save_time = time.time()
        if background:
            log(f"checkpoint: writing {path.name} in the background ({reason}; training stalled "
                f"{checkpointer.last_save_s:.2f}s)")
            return True
        if keep_best and early.best_step == counters.step and d.is_main:
            write_best(run_dir, early, counters.step)
        log(f"checkpoint: saved {path.name} ({reason}, {checkpointer.last_save_s:.1f}s)")
        lead = recipe.slurm.signal_lead_s
        if "SLURM_JOB_ID" in os.environ and checkpointer.last_save_s + step_seconds() > lead:
            log(f"warning: a save takes {checkpointer.last_save_s:.0f} s and a step {step_seconds():.0f} s, "
                f"more than slurm.signal_lead_s={lead}: a job stopped at its time limit would lose "
                f"its last steps; raise slurm.signal_lead_s")
        return True

    def commit_background() -> None:
        """Commit the background save (waiting for its write if it has not finished)."""
        try:
            path = checkpointer.wait()
        except CheckpointSaveError as err:
            save_failed(err)
            return
        log(f"checkpoint: committed {path.name} (written in the background, {checkpointer.last_commit_s:.1f}s)")

    def validate(step: int) -> bool:
        """Evaluate, log, update early stopping; return whether this is the best evaluation yet."""
        metrics = evaluate(engine, task, val, d.device)
        improved = early.update(metrics.get(ev.metric, float("nan")), step)
        if writer:
            writer.write(step, {"eval_loss": metrics["loss"], "eval_ppl": metrics.get("perplexity"),
                                **{f"eval_{k}": v for k, v in metrics.items() if k not in ("loss", "perplexity")}})
        log(f"step {step}: eval {headline(metrics, task)}" + (f" (best {ev.metric})" if improved and
                                                               ev.metric != "loss" else ""))
        if early.stopped:
            log(f"early stopping: {ev.metric} did not improve for {early.bad_evals} evaluations "
                f"(eval.patience={ev.patience}); best {early.best:.4f} at step {early.best_step}")
        return improved

    def test_with_best_weights() -> None:
        """Evaluate the test split once, with the best checkpoint's weights when it is kept."""
        source = f"{step_dir_name(counters.step)} (final weights)"
        best = run_dir / "checkpoints" / step_dir_name(early.best_step or 0)
        if keep_best and early.best_step and early.best_step != counters.step and (best / MANIFEST).exists():
            engine.load(best, json.loads((best / MANIFEST).read_text())["world_size"])
            source = f"{best.name} (best {ev.metric})"
        if watchdog:
            watchdog.beat(counters.step, "test evaluation", restart=True)
        metrics = evaluate(engine, task, eval_batches(data.test, t.micro_batch_size, d.rank, d.world_size, 0),
                           d.device)
        if writer:
            writer.write(counters.step, {f"test_{k}": v for k, v in metrics.items()})
        if d.is_main:
            write_test_results(run_dir, metrics, data.labels, len(data.test), source, counters.step)
        log(f"test ({len(data.test)} samples, {source}): {headline(metrics, task)}; "
            f"wrote {run_dir / 'test_results.md'}")

    nonfinite = NonFiniteGuard(t.on_nonfinite, engine.name, d.device, batches, run_dir)
    watchdog = Watchdog(run_dir, d.rank, d.world_size, t.step_timeout_s, on_fire=(  # any rank may be first
        lambda msg: write_status(run_dir, "hung", counters.step, msg, d.rank))) \
        if t.step_timeout_s > 0 else None
    hang_at = fault_step("SHARDFORGE_HANG_AT", d.rank)  # fault injection, read once
    nan_at = fault_step("SHARDFORGE_NAN_AT", d.rank)
    armed = points_armed()

    # ---- the loop: data → forward/backward per micro-batch → optimizer step → log/eval/save
    engine.train()
    loss_sum, bad_micro, window_steps = torch.zeros((), device=d.device), torch.zeros((), device=d.device), 0
    timers = {"data_wait_s": 0.0, "fwd_bwd_s": 0.0, "optim_s": 0.0}
    window_start, stopped, first_step, window_tokens = time.time(), False, counters.step, 0
    while counters.step < t.max_steps and not early.stopped:
        step_start = time.time()
        loss_fn = nan_fault(task.loss) if nan_at == counters.step + 1 else task.loss
        if armed:  # fault injection inside a step: before forward, backward, the optimizer
            fault_point("forward", counters.step + 1, d.rank)
            loss_fn = with_backward_point(loss_fn, counters.step + 1, d.rank)
        bad, step_tokens = torch.zeros((), device=d.device), 0
        denominator = None if loss_tokens is None else \
            step_loss_denominator(loss_tokens, batches.next_step_indices(), d.world_size * accum)
        for micro in range(accum):
            t0 = time.perf_counter()
            if watchdog:
                watchdog.beat(counters.step + 1, "data")
                if hang_at == counters.step + 1:
                    time.sleep(10**6)  # fault injection for the watchdog test
            batch = {k: v.to(d.device, non_blocking=True) for k, v in next(batches).items()}
            step_tokens += batch["input_ids"].numel()  # this rank's positions (padding trimmed)
            if denominator is not None:
                batch["loss_denominator"] = denominator
            t1 = time.perf_counter()
            if watchdog:
                watchdog.beat(counters.step + 1, "forward-backward")
            loss = engine.forward_backward(batch, loss_fn, micro == accum - 1)
            finite = torch.isfinite(loss)
            loss_sum += torch.where(finite, loss, 0.0)  # a NaN step must not poison the logged mean
            bad += (~finite).float()
            timers["data_wait_s"] += t1 - t0
            timers["fwd_bwd_s"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        if watchdog:
            watchdog.beat(counters.step + 1, "optimizer")
        if armed:
            fault_point("optimizer", counters.step + 1, d.rank)
        grad_norm, skipped = engine.optimizer_step(bad)
        bad_micro += bad
        nonfinite.record(skipped, counters.step + 1)
        timers["optim_s"] += time.perf_counter() - t2
        counters.step += 1
        counters.tokens += step_tokens * d.world_size  # an estimate until the log step's exact sum
        counters.elapsed_s += time.time() - step_start
        window_steps, window_tokens = window_steps + 1, window_tokens + step_tokens

        if counters.step % t.log_every == 0 or counters.step == t.max_steps:
            good = torch.clamp(accum * window_steps - bad_micro, min=1)  # NaN losses are left out
            stats = torch.stack([(loss_sum / good).double(),  # float64: token sums stay exact
                                 torch.nan_to_num(grad_norm.double().to(d.device), nan=-1.0),
                                 torch.tensor(float(window_tokens), dtype=torch.float64, device=d.device)])
            dist.all_reduce(stats)  # the only host sync: at log steps
            *stats, all_tokens = stats.tolist()
            stats = [v / d.world_size for v in stats]
            counters.tokens += round(all_tokens) - window_tokens * d.world_size  # ranks' lengths differ when not packed
            nonfinite.check(counters.step)
            telemetry_all = [None] * d.world_size
            dist.all_gather_object(telemetry_all, telemetry.drain())
            seconds = time.time() - window_start
            tps = all_tokens / seconds
            values = {"loss": stats[0], "grad_norm": stats[1], "lr": engine.lr,
                      "tokens_per_s": tps, "tokens_per_s_per_device": tps / d.world_size,
                      "samples_per_s": window_steps * t.global_batch_size / seconds,
                      "step_time_s": seconds / window_steps,
                      **{k: v / window_steps for k, v in timers.items()},
                      "model_tflops": tps / d.world_size * flops_token / 1e12,
                      "mfu": mfu(tps / d.world_size, flops_token, peak),
                      "skipped_steps": engine.skipped_steps, "nonfinite_steps": nonfinite.total(),
                      "tokens": counters.tokens,
                      **aggregate_ranks(telemetry_all)}
            if d.device.type == "cuda":
                values["mem_allocated_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
                values["mem_reserved_gb"] = torch.cuda.max_memory_reserved(d.device) / 2**30
            if writer:
                writer.write(counters.step, values)
                writer.progress(counters.step, values)
            loss_sum.zero_()
            bad_micro.zero_()
            window_steps, window_tokens, window_start = 0, 0, time.time()
            timers = dict.fromkeys(timers, 0.0)

        last = counters.step == t.max_steps
        if last:
            nonfinite.check(counters.step)
        new_best, previous_best = False, early.best_step
        if (t.eval_every and counters.step % t.eval_every == 0) or last:
            if watchdog:
                watchdog.beat(counters.step, "evaluation", restart=True)
            new_best = validate(counters.step)
            last = last or early.stopped
            if new_best and keep_best and not (last and ckpt_cfg.at_end) and \
                    not (ckpt_cfg.every_steps and counters.step % ckpt_cfg.every_steps == 0):
                save("best", protect=(previous_best,))

        timed_save = bool(ckpt_cfg.every_minutes) and d.is_main and \
            time.time() - last_save_time >= 60 * ckpt_cfg.every_minutes
        # a background save that started at step s is reported on from step s + 1, agreed at s + 2
        write_started = checkpointer.pending.step if checkpointer.pending is not None else None
        stop_now, save_now, writing = agreement.exchange(stop.signal_name is not None, timed_save,
                                                         checkpointer.write_in_flight(), wait_now=last)
        if t.stop_after and counters.step - first_step >= t.stop_after and not last:
            stop_now, stop.signal_name = True, stop.signal_name or f"train.stop_after={t.stop_after}"
        if stop_now and not last:  # on the last step a stop changes nothing: the run completes
            log(f"stop requested ({stop.signal_name or 'signal on another rank'}) at step "
                f"{counters.step}: saving and exiting with code {EXIT_REQUEUE}")
            save("signal")
            stopped = True
            break
        if write_started is not None and (last or (not writing and counters.step >= write_started + 2)):
            commit_background()
        save_now = save_now and last_save_step < counters.step - 1  # raised before the last step's save: stale
        if (ckpt_cfg.every_steps and counters.step % ckpt_cfg.every_steps == 0) or save_now \
                or (last and ckpt_cfg.at_end):
            save("end" if last else "periodic", protect=(previous_best,) if new_best else ())
    if checkpointer.pending is not None:  # stopped, or no save at the end: commit what is in flight
        commit_background()

    if not stopped and data.test is not None and len(data.test) and ev.test_at_end:
        test_with_best_weights()

    telemetry.close()
    if watchdog:
        watchdog.close()
    if writer:
        writer.close()
    if d.is_main:
        write_status(run_dir, "stopped" if stopped else "completed", counters.step,
                     f"{stop.signal_name or 'stop signal on another rank'}; saved {step_dir_name(counters.step)}"
                     if stopped else "", d.rank)
    dist.barrier()
    dist.destroy_process_group()
    return EXIT_REQUEUE if stopped else 0


class NonFiniteStop(RuntimeError):
    """``train.on_nonfinite=stop`` and a step had a NaN/inf loss or gradient norm."""


class NonFiniteGuard:
    """Counts steps whose loss or gradient norm was non-finite on any rank, on the device.

    The engines agree on the flag with an all-reduce and (DDP/FSDP) skip the update on the
    device, so nothing here synchronises with the host except :meth:`check`, which runs at log
    steps, before every save and at the end.
    """

    def __init__(self, policy: str, engine: str, device: torch.device, batches: TrainBatches, run_dir: Path):
        self.policy = policy if policy != "auto" else ("stop" if engine.startswith("zero") else "skip")
        self.batches, self.run_dir = batches, run_dir
        self.count = torch.zeros((), device=device)
        self.first_step = torch.zeros((), device=device)

    def record(self, skipped: torch.Tensor, step: int) -> None:
        self.count += skipped
        self.first_step = torch.where((self.first_step == 0) & (skipped > 0),
                                      torch.full_like(self.first_step, step), self.first_step)

    def total(self) -> int:
        return int(self.count.item())

    def check(self, step: int) -> None:
        if self.policy != "stop" or self.count.item() == 0:
            return
        bad = int(self.first_step.item())
        fingerprint = self.batches.fingerprint(steps_back=step - bad + 1)
        raise NonFiniteStop(
            f"non-finite loss or gradient norm at step {bad} (batch fingerprint {fingerprint}); "
            f"stopped without saving, so the latest checkpoint in {self.run_dir / 'checkpoints'} is the "
            f"last good state. Lower optim.lr or check that batch, or set train.on_nonfinite=skip "
            f"(ddp/fsdp), then run again to resume")


def step_loss_denominator(loss_tokens: np.ndarray, step_indices: np.ndarray, micro_batches: int) -> float:
    """For tasks whose loss tokens vary by sample (SFT, token classification): the step's loss
    tokens over all ranks (``loss_tokens`` of its global sample indices) / micro-batches on all ranks.

    The engines divide each micro-batch's loss by the micro-batch count and average gradients over
    ranks, so dividing each micro-batch's loss sum by this makes the step's gradient the mean over
    all its loss tokens: a micro-batch with few response tokens no longer weighs as much as one
    with many. Every rank knows the step's global indices, so this needs no collective."""
    return max(float(loss_tokens[step_indices].sum()) / micro_batches, 1e-6)  # no loss tokens: a zero loss


def write_best(run_dir: Path, early: EarlyStopping, step: int) -> None:
    """Point ``checkpoints/best.json`` at the best evaluation's checkpoint (called once it is committed)."""
    atomic_write(run_dir / "checkpoints" / BEST_FILE, json.dumps(
        {"step": step, "checkpoint": step_dir_name(step), "metric": early.metric, "value": early.best}, indent=1))


def check_fingerprint(manifest: dict, batches: TrainBatches, recipe: Recipe, data_key: str) -> None:
    """Refuse to resume when the next batch is not the one the checkpoint expected."""
    expected = manifest.get("next_batch_fingerprint")
    if expected is None or batches.fingerprint() == expected:
        return
    changed = [name for name, old, new in (
        ("data (sources, tokenizer or seq_len)", manifest.get("data_key"), data_key),
        ("run.seed", manifest.get("seed"), recipe.run.seed),
        ("train.global_batch_size", manifest.get("global_batch_size"), recipe.train.global_batch_size))
        if old != new]
    raise CheckpointError(f"resume: the next batch differs from the one saved with the checkpoint; "
                          f"changed: {', '.join(changed) or 'unknown (data files edited in place?)'}; "
                          f"restore the original recipe or start a new run (checkpoint.resume=never)")


def error_kind(err: BaseException) -> str:
    """How a rank's error is reported (see ``train.rundir.KIND_EXIT``)."""
    if isinstance(err, NonFiniteStop):
        return "nonfinite"
    if isinstance(err, CheckpointSaveError):
        return "save_failed"
    if isinstance(err, (DataError, CheckpointError, RecipeProblems)):
        return "bad_input"
    text = str(err)
    if isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(
            s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                "ProcessGroup", "NCCL communicator was aborted", "Socket Timeout"))):
        return "collective"  # a symptom: another rank went away
    return "crash"


def main(argv: list[str] | None = None) -> int:
    """Train, and leave an account of any error for the agent: ``logs/error-rank-N.json``.

    Under torchrun every ending the ranks agree on (completed, stopped) exits 0 and ``status.json``
    carries it; an error exits non-zero, so torchrun ends the other ranks, and the agent picks the
    root cause among the ranks' reports and prints it once.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m train RUN_DIR", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_dir, rank = Path(argv[0]), int(os.environ.get("RANK", "0"))
    under_agent = "TORCHELASTIC_RUN_ID" in os.environ
    try:
        code = train(run_dir)
        return 0 if code == EXIT_REQUEUE and under_agent else code
    except BaseException as err:  # noqa: BLE001 - every ending is accounted for
        kind = error_kind(err) if isinstance(err, Exception) else "crash"
        message = f"{type(err).__name__}: {err}" if kind in ("crash", "collective") else str(err)
        tb = traceback.format_exc() if kind in ("crash", "collective") else ""
        try:
            write_error_report(run_dir, rank, kind, message.strip() or type(err).__name__, tb, CURRENT.step)
        except OSError:
            pass  # the console below still says it
        if not under_agent:  # nobody else will print it
            print(tb + f"error: {message}", file=sys.stderr, flush=True)
        return KIND_EXIT[kind]
    finally:
        stop_data_workers()


def stop_data_workers() -> None:
    """Kill this rank's DataLoader workers on the way out. They ignore the stop signals (see
    ``train.stop``), so multiprocessing's exit handler, which terminates them with SIGTERM and
    joins them, would wait forever for a loader that is still open (after an error, or when
    reference cycles keep the loader alive until exit)."""
    import multiprocessing
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise for the killed worker
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=10)
