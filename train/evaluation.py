"""Validation and test evaluation: sums on each rank, one all-reduce, the task's metrics; the
final test report as JSON and a readable table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from train.tasks import Task

TEST_JSON, TEST_TABLE = "test_results.json", "test_results.md"


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
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)
