"""Validation and test evaluation: sums on each rank, one all-reduce, the task's metrics; when to
evaluate and early stopping (:class:`Evaluator`); the final test report as JSON and a table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from train.checkpoint.files import MANIFEST, step_dir_name
from train.config.recipe import EvalConfig
from train.rundir import atomic_write
from train.metrics.early_stopping import EarlyStopping
from train.tasks import Task

TEST_JSON, TEST_TABLE = "test_results.json", "test_results.md"

logger = logging.getLogger("shardforge")


def evaluate(engine, task: Task, batches: list[dict], device: torch.device) -> dict[str, float]:
    """The task's metrics over ``batches`` (this rank's share; every rank calls it)."""
    engine.eval()
    sums: Optional[torch.Tensor] = None
    for batch in batches:
        on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        part = engine.eval_forward(on_device, task.eval_sums).float()
        sums = part if sums is None else sums + part
    engine.train()
    if sums is None:  # every rank has the same number of batches (eval_batches): none anywhere
        return {"loss": float("nan")}
    dist.all_reduce(sums)
    return task.metrics(sums)


def headline(metrics: dict[str, float], task: Task) -> str:
    """``loss 0.4123, accuracy 0.8810, macro_f1 0.8702`` — the task's main metrics, in order."""
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in task.metric_names if k in metrics)


def test_table(metrics: dict[str, float], labels: Optional[list[str]], samples: int, checkpoint: str) -> str:
    """A Markdown report: overall metrics, then precision/recall/F1 per class."""
    lines = [f"# Test results ({samples} samples, weights of {checkpoint})", "", "| metric | value |",
             "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if "/" not in k]
    types = sorted(k.split("/", 1)[1] for k in metrics if k.startswith("entity_f1/"))
    if types:
        lines += ["", "| entity type | precision | recall | F1 |", "|---|---|---|---|"]
        lines += [f"| {t} | {metrics[f'entity_precision/{t}']:.4f} | {metrics[f'entity_recall/{t}']:.4f} | "
                  f"{metrics[f'entity_f1/{t}']:.4f} |" for t in types]
    if labels and f"f1/{labels[0]}" in metrics:
        lines += ["", "| class | precision | recall | F1 |", "|---|---|---|---|"]
        lines += [f"| {name} | {metrics[f'precision/{name}']:.4f} | {metrics[f'recall/{name}']:.4f} | "
                  f"{metrics[f'f1/{name}']:.4f} |" for name in labels]
    return "\n".join(lines) + "\n"


def write_test_results(run_dir: Path, metrics: dict[str, float], labels: Optional[list[str]],
                       samples: int, checkpoint: str, step: int) -> None:
    """``test_results.json`` and ``test_results.md`` in the run directory, each written atomically."""
    payload = {"step": step, "checkpoint": checkpoint, "samples": samples, "metrics": metrics}
    for name, text in ((TEST_JSON, json.dumps(payload, indent=1)),
                       (TEST_TABLE, test_table(metrics, labels, samples, checkpoint))):
        atomic_write(run_dir / name, text)


class Evaluator:
    """Evaluates the validation split every ``train.eval_every`` steps and at the end, keeps the
    early-stopping score, and evaluates the test split once at the end with the best weights."""

    def __init__(self, engine, task: Task, *, val: list[dict], early: EarlyStopping, eval_cfg: EvalConfig,
                 eval_every: int, device: torch.device, writer, watchdog):
        self.engine, self.task, self.val, self.early, self.eval_every = engine, task, val, early, eval_every
        self.keep_best, self.device, self.writer, self.watchdog = bool(eval_cfg.keep_best), device, writer, watchdog

    def maybe_eval(self, step: int, last: bool) -> bool:
        """Evaluate when due; return whether this is the best evaluation yet."""
        if not ((self.eval_every and step % self.eval_every == 0) or last):
            return False
        self.watchdog.beat(step, "evaluation", restart=True)
        metrics = evaluate(self.engine, self.task, self.val, self.device)
        early, name = self.early, self.early.metric
        improved = early.update(metrics.get(name, float("nan")), step)
        if self.writer:
            self.writer.write(step, {"eval_loss": metrics["loss"], "eval_ppl": metrics.get("perplexity"),
                                     **{f"eval_{k}": v for k, v in metrics.items() if k not in ("loss", "perplexity")}})
        logger.info(f"step {step}: eval {headline(metrics, self.task)}"
                    + (f" (best {name})" if improved and name != "loss" else ""))
        if early.stopped:
            logger.info(f"early stopping: {name} did not improve for {early.bad_evals} evaluations "
                        f"(eval.patience={early.patience}); best {early.best:.4f} at step {early.best_step}")
        return improved

    def test(self, test_set, batches: list[dict], labels, run_dir: Path, step: int, is_main: bool) -> None:
        """Evaluate the test split once, with the best checkpoint's weights when it is kept."""
        source = f"{step_dir_name(step)} (final weights)"
        best_step = self.early.best_step
        best = run_dir / "checkpoints" / step_dir_name(best_step or 0)
        if self.keep_best and best_step and best_step != step and (best / MANIFEST).exists():
            self.engine.load(best, json.loads((best / MANIFEST).read_text())["world_size"])
            source = f"{best.name} (best {self.early.metric})"
        self.watchdog.beat(step, "test evaluation", restart=True)
        metrics = evaluate(self.engine, self.task, batches, self.device)
        if self.writer:
            self.writer.write(step, {f"test_{k}": v for k, v in metrics.items()})
        if is_main:
            write_test_results(run_dir, metrics, labels, len(test_set), source, step)
        logger.info(f"test ({len(test_set)} samples, {source}): {headline(metrics, self.task)}; "
                    f"wrote {run_dir / 'test_results.md'}")
