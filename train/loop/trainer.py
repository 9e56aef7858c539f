"""The per-rank program: ``python -m train RUN_DIR`` (started by launch.agent, directly or through torchrun).

:func:`train` builds the parts, then runs the loop: step → metrics → evaluation → save → stop.
Each part decides its own timing (``train.loop.save_schedule``, ``train.metrics.evaluation``, ``train.loop.agreement``,
``train.metrics.step_metrics``); the engine hides every data-parallel detail (``train.engines``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from train import startup_gc
from train import faults
from train.checkpoint.manager import Checkpointer, CheckpointError, CheckpointSaveError
from train.checkpoint.files import step_dir_name
from train.data.batches import SAMPLE_ORDER, TrainBatches, eval_batches
from train.data.cache import PreparedData
from train.data.prepare import prepare_data
from train.data.sources import DataError
from train.distributed import PROCESS_GROUP_TIMEOUT_S, DistInfo, all_ranks_agree, init_distributed
from train.engines import capabilities
from train.engines.base import Engine, report_compute_dtype, set_deterministic, set_fp32_matmul_precision
from train.engines.build import build_engine
from train.engines.config import checked_engine_config
from train.engines.placement import place_model
from train.metrics.evaluation import Evaluator
from train.device_peaks import peak_tflops
from train.metrics.flops import flops_per_token
from train.metrics.telemetry import Telemetry
from train.metrics.writer import MetricsWriter
from train.model import build_model, frozen_digest, token_ids, trainable_summary
from train.config.model_checks import memory_problems, model_problems, plan_gpu_bytes
from train.loop.agreement import Stopper
from train.loop.nonfinite import NonFiniteGuard, NonFiniteStop
from train.config.recipe import Recipe, grad_accum_steps, micro_batch, offloaded, resolve_epochs, world_size
from train.config.loading import read_recipe
from train.rundir import (AGENT_ENV, EXIT_BAD_INPUT, EXIT_REQUEUE, KIND_EXIT, LABELS_FILE, write_error_report,
                         write_status)
from train.checkpoint.safe_load import forbid_code_in_checkpoints
from train.loop.save_schedule import Saver
from train.config.typed import RecipeError
from train.metrics.early_stopping import EarlyStopping
from train.checkpoint.state import Counters, RNGState
from train.loop.step import TrainStep
from train.metrics.step_metrics import LogWindow, StepMetrics
from train.stop_signals import StopRequest
from train.tasks import Task, build_task
from train.loop.watchdog import start_watchdog
from train.console import show_on_console

logger = logging.getLogger("shardforge")

CURRENT = Counters()
"""This process's progress counters (replaced by the run's own): error reports name the step."""


def train(run_dir: Path) -> int:
    """Train the run in ``run_dir`` on this rank; ``EXIT_REQUEUE`` when stopped, 0 when done."""
    global CURRENT
    recipe = read_recipe(run_dir, check=True)  # the launcher's checks, again on what this rank reads
    d = join_process_group(recipe)
    show_on_console(d.is_main)  # one copy of each line: rank 0's
    set_fp32_matmul_precision(recipe.parallel.tf32)
    set_deterministic(recipe.train.deterministic)
    check_model(recipe, d)  # imports transformers' model stack
    startup_gc.resume()  # the heavy imports are done; nothing is built yet
    stop = StopRequest.install()
    if d.is_main:
        write_status(run_dir, "running", -1)
    quiet_other_ranks(d)
    data = prepare_on_rank0(recipe, d, run_dir)
    if stopped_before_training(stop, run_dir, d, -1, "during data preparation"):
        return EXIT_REQUEUE
    t, ev, closing = recipe.train, recipe.eval, contextlib.ExitStack()
    with closing:
        counters = CURRENT = Counters()
        parts = build_parts(recipe, data, d, run_dir, counters, closing)
        engine, task, batches, early = parts.engine, parts.task, parts.batches, parts.early
        report_compute_dtype(engine.model)
        guard = NonFiniteGuard(t.on_nonfinite, d.device, batches, run_dir)
        writer = closing.enter_context(MetricsWriter(run_dir, recipe.logging.tensorboard, recipe.logging.console,
                                                     t.max_steps, counters.step)) if d.is_main else None
        telemetry = closing.enter_context(Telemetry(d.device if d.device.type == "cuda" else None,
                                                    recipe.logging.telemetry_interval_s))
        if stopped_before_training(stop, run_dir, d, counters.step, "before the first step", closing):
            return EXIT_REQUEUE
        watchdog = closing.enter_context(start_watchdog(run_dir, d.rank, d.world_size, t.step_timeout_s, on_fire=(
            lambda msg: write_status(run_dir, "hung", counters.step, msg, d.rank))))  # any rank may be first
        step = TrainStep(engine, task.loss, batches, accum=parts.accum, world_size=d.world_size, device=d.device,
                         guard=guard, watchdog=watchdog, loss_tokens=task.sample_loss_tokens(data.train))
        faults.install(step, d.rank)
        saver = Saver(parts.checkpointer, recipe=recipe, counters=counters, batches=batches, early=early, guard=guard,
                      watchdog=watchdog, run_dir=run_dir, is_main=d.is_main)
        evaluator = Evaluator(engine, task, val=eval_batches(data.val, micro_batch(recipe), d.rank, d.world_size,
                                                             t.eval_batches * t.global_batch_size),
                              early=early, eval_cfg=ev, eval_every=t.eval_every, device=d.device, writer=writer,
                              watchdog=watchdog)
        stopper = Stopper(stop, d.device, t.stop_after, first_step=counters.step)
        metrics = StepMetrics(engine=engine, guard=guard, telemetry=telemetry, writer=writer, device=d.device, train=t,
                              world_size=d.world_size, accum=parts.accum, flops_token=parts.flops_token, peak_tflops=(
                                  peak_flops(recipe, d)), window=parts.log_window, train_samples=len(data.train))
        if d.is_main:
            write_status(run_dir, "running", counters.step, started=time.time())

        # ---- the loop
        stopped = False
        while counters.step < t.max_steps and not early.stopped:
            result = step.run(counters.step + 1)
            counters.advance(result.tokens * d.world_size, result.seconds)
            metrics.record(result, counters)
            last = counters.step == t.max_steps
            if last:
                guard.check(counters.step)
            previous_best = early.best_step
            improved = evaluator.maybe_eval(counters.step, last)
            last = last or early.stopped
            if improved:
                saver.save_best(counters.step, last, previous_best)
            agreed = stopper.agree(counters.step, last, *saver.flags())
            saver.after_step(counters.step, last, agreed, protect=(previous_best,) if improved else ())
            if agreed.stop:
                stopped = True
                break
        saver.finish()

        if not stopped and data.test is not None and len(data.test) and ev.test_at_end:
            evaluator.test(data.test, eval_batches(data.test, micro_batch(recipe), d.rank, d.world_size),
                           data.labels, run_dir, counters.step, d.is_main)
    if d.is_main:
        write_status(run_dir, "stopped" if stopped else "completed", counters.step,
                     f"{stopper.reason}; saved {step_dir_name(counters.step)}" if stopped else "", d.rank,
                     summary=end_summary(counters, early))
    dist.barrier()  # every rank has ended the same way; the process groups end with the process (train/__main__.py)
    return EXIT_REQUEUE if stopped else 0


def end_summary(counters: Counters, early: EarlyStopping) -> dict:
    """What only the ranks know at the end, for ``status.json``: tokens over every launch, the
    seconds the steps took, and the best evaluation (early stopping's, so resumes count)."""
    best = None if early.best is None else {"metric": early.metric, "value": early.best, "step": early.best_step}
    return {"tokens": counters.tokens, "step_seconds": round(counters.elapsed_s, 3), "best": best}


@dataclass
class Parts:
    """What :func:`build_parts` makes, resumed from the latest checkpoint when there is one."""

    engine: Engine
    task: Task
    batches: TrainBatches
    early: EarlyStopping
    checkpointer: Checkpointer
    flops_token: float
    log_window: LogWindow
    accum: int
    """Micro-batches per rank per optimizer step, computed once (:func:`train.config.recipe.grad_accum_steps`)."""


def build_parts(recipe: Recipe, data: PreparedData, d: DistInfo, run_dir: Path, counters: Counters,
                closing: contextlib.ExitStack) -> Parts:
    """Model, engine, data position, early stopping and checkpointer; then resume into them."""
    t, ev = recipe.train, recipe.eval
    line = resolve_epochs(recipe, len(data.train))
    if line:
        logger.info(line)
    task = build_task(recipe.task, data.labels)
    if d.world_size != world_size(recipe):
        raise RecipeError(None, [f"parallel: recipe.yaml plans {world_size(recipe)} ranks ({recipe.parallel.nproc} per node × "
                              f"{recipe.parallel.nodes} nodes), but this launch has {d.world_size}; start it with "
                              f"`shardforge run` or `submit`, which write both"])
    accum = grad_accum_steps(recipe, d.world_size)  # computed once here; refuses a batch that does not divide
    engine_cfg = checked_engine_config(recipe, run_dir)
    model, weights = place_model(recipe.parallel.engine, lambda empty_init: build_model(
        recipe.model, len(data.tokenizer), recipe.run.seed, recipe.task, data.labels,
        special_ids=token_ids(data.tokenizer), empty_init=empty_init), d.rank, d.world_size, engine_cfg)
    if d.is_main and (trainable := trainable_summary(model)):
        logger.info(trainable)
    if weights.from_rank0:
        how = "inside zero.Init" if capabilities(recipe.parallel.engine).zero_stage == 3 else "on the meta device"
        logger.info(f"model: rank 0 built the weights; the other {d.world_size - 1} rank(s) built the structure {how} "
                    f"and receive rank 0's values")
    flops_token = flops_per_token(model, recipe.data.seq_len)
    frozen_base = frozen_base_digest(model, recipe, d)
    engine = build_engine(recipe, model, d.device, accum=accum, cfg=engine_cfg, weights=weights)
    del model, weights  # the engine holds what it needs; rank 0's full copy is gone
    engine.train()  # whatever mode the build or a wrapper left: training starts in train mode on every rank
    batches = closing.enter_context(TrainBatches(data.train, recipe.run.seed, t.global_batch_size, micro_batch(recipe),
                                                 d.rank, d.world_size, num_workers=recipe.data.num_workers,
                                                 pin_memory=d.device.type == "cuda"))
    early = EarlyStopping(ev.metric, ev.mode, ev.patience, ev.min_delta)
    log_window = LogWindow(d.device)
    checkpointer = Checkpointer(run_dir / "checkpoints", engine,
                                {"data": batches, "counters": counters, "rng": RNGState(), "early_stopping": early,
                                 "log_window": log_window},
                                d.rank, d.world_size, meta={"engine": recipe.parallel.engine, "data_key": data.key,
                                                            **({"frozen_base": frozen_base} if frozen_base else {})})
    closing.callback(checkpointer.close)  # pruned checkpoints are gone before status.json says how the run ended
    seed_rank(recipe.run.seed, d.rank)
    forbid_code_in_checkpoints(deepspeed=capabilities(recipe.parallel.engine).family == "deepspeed")
    resume_from = checkpointer.find_resume_point(recipe.checkpoint.resume)
    if resume_from is not None:
        manifest = checkpointer.load(resume_from)
        check_frozen_base(manifest, frozen_base, resume_from, recipe)
        if manifest["world_size"] != d.world_size:
            seed_rank(recipe.run.seed + counters.step, d.rank)
        check_fingerprint(manifest, batches, recipe, data.key)
        logger.info(f"resumed from {resume_from} at step {counters.step} ({manifest['world_size']} → {d.world_size} ranks)")
    return Parts(engine, task, batches, early, checkpointer, flops_token, log_window, accum)


def frozen_base_digest(model: torch.nn.Module, recipe: Recipe, d: DistInfo) -> Optional[str]:
    """The digest of the frozen parameters (:func:`train.model.frozen_digest`) that rank 0 built, on
    every rank; ``None`` when everything trains or the engine's checkpoints hold the whole model."""
    if capabilities(recipe.parallel.engine).checkpoint_format != "dcp":
        return None
    digest = [frozen_digest(model) if d.is_main else None]  # the other ranks may hold an empty structure
    dist.broadcast_object_list(digest, src=0)
    return digest[0]


def check_frozen_base(manifest: dict, frozen_base: Optional[str], ckpt: Path, recipe: Recipe) -> None:
    """Refuse to resume trainable parameters onto frozen weights other than those they trained with."""
    saved = manifest.get("frozen_base")
    if saved is not None and saved != frozen_base:
        raise CheckpointError(f"resume: {ckpt.name} holds only the trainable parameters, and the frozen ones "
                              f"built now differ from those it was trained with (model.pretrained "
                              f"{recipe.model.pretrained!r} changed, or model.freeze_*/lora settings); restore "
                              f"that model, or start over with checkpoint.resume=never")


def check_model(recipe: Recipe, d: DistInfo) -> None:
    """The checks of the model and its memory that ``shardforge run`` leaves to the ranks."""
    stated, device = plan_gpu_bytes(recipe), device_bytes(d.device)  # the smaller: a stated size may be wrong
    gpu = min(b for b in (stated, device) if b) if stated or device else None
    problems = model_problems(recipe) or memory_problems(recipe, gpu)
    if problems:
        raise RecipeError(None, problems)


def join_process_group(recipe: Recipe) -> DistInfo:
    """The job's process group; for DeepSpeed, its C++ ops are built or loaded first (see ``load_ops``)."""
    if capabilities(recipe.parallel.engine).family != "deepspeed":  # FSDP2 offload: gloo for CPU tensors too
        return init_distributed(cpu_collectives=offloaded(recipe))
    from train.engines.deepspeed_engine import load_ops

    load_ops(offload=offloaded(recipe))
    return init_distributed(deepspeed=True)


def device_bytes(device: torch.device) -> Optional[float]:
    """This rank's GPU memory (none on CPU)."""
    return float(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None


def seed_rank(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def quiet_other_ranks(d: DistInfo) -> None:
    """One copy of transformers' load reports and warnings is enough."""
    if not d.is_main:
        import transformers

        transformers.logging.set_verbosity_error()


def prepare_on_rank0(recipe: Recipe, d: DistInfo, run_dir: Path) -> PreparedData:
    """Rank 0 tokenizes (when the cache is cold); the others wait, then read the cache."""
    faults.fault_point("prepare", 0, d.rank)
    data = prepare_data(recipe) if d.is_main else None
    started = time.monotonic()
    try:
        dist.barrier()
    except RuntimeError as err:
        if time.monotonic() - started < 0.9 * PROCESS_GROUP_TIMEOUT_S:  # rank 0 went away: its report says why
            raise PeerGone(f"rank {d.rank}: rank 0 ended while preparing the data ({err})") from None
        raise RuntimeError(f"rank {d.rank}: timed out waiting for rank 0 to prepare the data "
                           f"({err}); run `shardforge prepare` before launching") from None
    if data is None:
        data = prepare_data(recipe)
    if d.is_main:
        data.tokenizer.save_pretrained(str(run_dir / "tokenizer"))
        if data.labels:  # the label map, for export and for reading the metrics
            (run_dir / LABELS_FILE).write_text(json.dumps(data.labels, indent=1))
    return data


def stopped_before_training(stop: StopRequest, run_dir: Path, d: DistInfo, step: int, phase: str,
                            closing: Optional[contextlib.ExitStack] = None) -> bool:
    """A stop that arrived before the first step of this launch ends it here: nothing new to save."""
    if not all_ranks_agree(stop.requested):
        return False
    if closing is not None:
        closing.close()
    reason = f"{stop.signal_name or 'stop signal on another rank'} {phase}; nothing new to save"
    logger.info(f"stop requested ({reason}): exiting with code {EXIT_REQUEUE}")
    if d.is_main:
        write_status(run_dir, "stopped", step, reason, d.rank)
    dist.barrier()  # status.json is written before any rank exits
    return True


def peak_flops(recipe: Recipe, d: DistInfo) -> Optional[float]:
    """Per-device peak TFLOP/s for MFU: the recipe's, or the device's from the table."""
    device_name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
    precision: str = recipe.parallel.precision
    if precision == "fp32" and recipe.parallel.tf32 and d.device.type == "cuda":
        precision = "tf32"
    peak = recipe.logging.peak_tflops or peak_tflops(device_name, precision)
    if peak is None:
        logger.info(f"metrics: no peak TFLOP/s known for {device_name!r} in {precision}; "
                    f"MFU is omitted (set logging.peak_tflops to report it)")
    return peak


def check_fingerprint(manifest: dict, batches: TrainBatches, recipe: Recipe, data_key: str) -> None:
    """Refuse to resume when the next batch is not the one the checkpoint expected."""
    expected = manifest.get("next_batch_fingerprint")
    if expected is None or batches.fingerprint() == expected:
        return
    changed = [name for name, old, new in (
        ("data (sources, tokenizer or seq_len)", manifest.get("data_key"), data_key),
        ("run.seed", manifest.get("seed"), recipe.run.seed),
        ("train.global_batch_size", manifest.get("global_batch_size"), recipe.train.global_batch_size),
        ("the sample order (a checkpoint of shardforge before 2026-12-06 shuffled epochs another way)",
         manifest.get("sample_order", "numpy-permutation"), SAMPLE_ORDER))
        if old != new]
    raise CheckpointError(f"resume: the next batch differs from the one saved with the checkpoint; "
                          f"changed: {', '.join(changed) or 'unknown (data files edited in place?)'}; "
                          f"restore the original recipe or start a new run (checkpoint.resume=never)")


class PeerGone(RuntimeError):
    """Another rank ended (its own report holds the cause); this rank's error is only the symptom."""


def error_kind(err: BaseException) -> str:
    """How a rank's error is reported (see ``train.rundir.KIND_EXIT``)."""
    if isinstance(err, PeerGone):
        return "collective"
    if isinstance(err, NonFiniteStop):
        return "nonfinite"
    if isinstance(err, CheckpointSaveError):
        return "save_failed"
    if isinstance(err, (DataError, CheckpointError, RecipeError)):
        return "bad_input"
    text = str(err)
    if isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(
            s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                "ProcessGroup", "NCCL communicator was aborted", "Socket Timeout"))):
        return "collective"  # a symptom: another rank went away
    return "crash"


def main(argv: Optional[list[str]] = None) -> int:
    """Train, and leave an account of any error for the agent: ``logs/error-rank-N.json``.

    Under the agent every ending the ranks agree on (completed, stopped) exits 0 and ``status.json``
    carries it; an error exits non-zero, so the agent ends the other ranks, picks the
    root cause among the ranks' reports and prints it once.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m train RUN_DIR", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_dir, rank = Path(argv[0]), int(os.environ.get("RANK", "0"))
    under_agent = os.environ.get(AGENT_ENV) == "1"
    try:
        code = train(run_dir)
        return 0 if code == EXIT_REQUEUE and under_agent else code
    except BaseException as err:  # noqa: BLE001 - every ending is accounted for
        kind = error_kind(err) if isinstance(err, Exception) else "crash"
        message = f"{type(err).__name__}: {err}" if kind in ("crash", "collective") else str(err)
        tb = traceback.format_exc() if kind in ("crash", "collective") else ""
        try:
            write_error_report(run_dir, rank, kind, message.strip() or type(err).__name__, tb, CURRENT.step,
                               symptom=bool(getattr(err, "symptom", False)))
        except OSError:
            pass  # the console below still says it
        if not under_agent:  # nobody else will print it
            print(tb + f"error: {message}", file=sys.stderr, flush=True)
        return KIND_EXIT[kind]
