"""How run directories stand or ended: ``shardforge status`` and the lines a completed run prints.

Both read only what a run directory already holds: ``status.json`` (how the last launch stands or
ended, and the trainers' end summary), ``lock.json`` (whether a launch is alive,
:mod:`launch.runlock`), ``recipe.yaml`` (the step count and the eval metric), the tail of
``metrics.jsonl`` (never the whole file: a long run's grows to gigabytes), ``test_results.json``
and the committed checkpoints. Nothing heavy is imported: the agent prints :func:`end_lines` as
a run ends, on one machine and under Slurm alike.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from launch.runlock import STALE_S, RunLock
from train.checkpoint.files import committed_checkpoints
from train.rundir import BEST_FILE, RECIPE_FILE, STATUS_FILE, describe, read_status

METRICS_FILE = "metrics.jsonl"
TEST_FILE = "test_results.json"  # train.metrics.evaluation.TEST_JSON (that module imports torch)
RUNS_ROOT = Path("runs")
PACE_WINDOW = 10
"""Log records (this launch's) over which the ETA's seconds per step are measured."""
TAIL_FIRST_BYTES = 64 * 1024
TAIL_MAX_BYTES = 16 * 2**20
"""How much of ``metrics.jsonl``'s end is read at most, looking for the last evaluation."""
STATES = ("running", "starting", "dead", "completed", "stopped", "failed", "hung", "new")


def duration(seconds: float) -> str:
    """``41 s``, ``3 min 04 s``, ``2 h 05 min``, ``3 d 07 h``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def tail_records(path: Path, enough: Callable[[list[dict]], bool], first: int = TAIL_FIRST_BYTES,
                 limit: int = TAIL_MAX_BYTES) -> list[dict]:
    """The JSON records at the end of a JSON-lines file, oldest first: its last ``first`` bytes,
    then four times as many until ``enough(records)``, ``limit`` bytes or the whole file. A line
    cut by the window or being written (torn) is skipped; ``[]`` when the file is missing."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return []
    with f:
        size = f.seek(0, 2)
        window = first
        while True:
            start = max(0, size - window)
            f.seek(start)
            lines = f.read(size - start).split(b"\n")
            if start > 0:
                lines = lines[1:]  # begins mid-line
            records = []
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
            if start == 0 or window >= limit or enough(records):
                return records
            window *= 4


def recipe_settings(run_dir: Path) -> dict:
    """``task``, ``max_steps``, ``epochs``, ``global_batch_size`` and ``metric`` (eval) from
    ``recipe.yaml``; ``{}`` when it is missing or unreadable."""
    import yaml

    try:
        recipe = yaml.safe_load((run_dir / RECIPE_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(recipe, dict):
        return {}
    train, ev = recipe.get("train") or {}, recipe.get("eval") or {}
    return {"task": recipe.get("task", "causal_lm"), "max_steps": train.get("max_steps"),
            "epochs": train.get("epochs") or 0, "global_batch_size": train.get("global_batch_size"),
            "metric": ev.get("metric") or "loss"}


def eval_key(metric: str) -> str:
    """The ``metrics.jsonl`` key of a validation metric (``train.metrics.evaluation.Evaluator``)."""
    return {"loss": "eval_loss", "perplexity": "eval_ppl"}.get(metric, f"eval_{metric}")


def total_steps(settings: dict, last: Optional[dict]) -> Optional[int]:
    """``train.max_steps``; under ``train.epochs`` the ranks derive it from the training split's size
    (``train.config.recipe.resolve_epochs``), which the last record's ``epoch`` gives back."""
    if settings.get("epochs", 0) <= 0:
        return settings.get("max_steps")
    batch = settings.get("global_batch_size")
    if not (last and last.get("epoch") and batch):
        return None
    samples = round(last["step"] * batch / last["epoch"])
    return max(1, math.ceil(settings["epochs"] * max(1, samples // batch)))


@dataclass
class Standing:
    """One run directory as ``shardforge status`` shows it."""

    run_dir: Path
    state: str
    """One of :data:`STATES`: ``dead`` is a ``running`` status.json whose launch is gone,
    ``starting`` a live launch that has not begun training, ``new`` a directory never launched."""
    step: Optional[int]
    max_steps: Optional[int]
    loss: Optional[float]
    eval: Optional[str]
    eta_s: Optional[float]
    note: str


def _lock_state(run_dir: Path) -> tuple[bool, str]:
    """Whether a live launch holds the run directory, and who holds (or held) it."""
    lock = RunLock(run_dir)
    holder = lock.holder()
    if holder is None:
        return False, "no launch holds it (no lock.json)"
    who = ("an unreadable lock.json" if holder.get("unreadable")
           else f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}")
    if holder.get("slurm_job"):
        who += f", Slurm job {holder['slurm_job']}"
    if not lock.gone(holder):
        return True, who
    age = time.time() - float(holder.get("heartbeat", 0))
    return False, f"its launch ({who}) is gone: " + (f"no heartbeat for {duration(age)}" if age > STALE_S
                                                     else "no such process")


def standing(run_dir: Path, now: Optional[float] = None) -> Standing:
    """How ``run_dir`` stands, from status.json, lock.json, recipe.yaml and metrics.jsonl's tail."""
    now = time.time() if now is None else now
    status = read_status(run_dir)
    settings = recipe_settings(run_dir)
    metric = settings.get("metric", "loss")
    key = eval_key(metric)

    def enough(records: list[dict]) -> bool:
        return sum("loss" in r for r in records) > PACE_WINDOW and any(key in r for r in records)

    records = tail_records(run_dir / METRICS_FILE, enough)
    train = [r for r in records if "loss" in r and isinstance(r.get("step"), int)]
    last = train[-1] if train else None
    evals = [r for r in records if key in r]
    alive, holder = _lock_state(run_dir)
    state = status.get("state") or "new"
    if state == "running" and not alive:
        state = "dead"
    elif state != "running" and alive:
        state = "starting"
    step = status.get("step") if status else None
    if state in ("running", "dead") and last is not None:
        step = max(step if isinstance(step, int) else -1, last["step"])
    if isinstance(step, int) and step < 0:
        step = None
    eta_s, note = None, ""
    if state == "running":
        started = status.get("started")
        mine = [r for r in train if started is not None and r.get("time", 0) >= started][-PACE_WINDOW - 1:]
        pace = None
        if len(mine) >= 2 and mine[-1]["step"] > mine[0]["step"]:
            pace = (mine[-1]["time"] - mine[0]["time"]) / (mine[-1]["step"] - mine[0]["step"])
        elif mine and mine[-1].get("step_time_s"):
            pace = mine[-1]["step_time_s"]
        total = total_steps(settings, last)
        if pace is not None and total is not None and step is not None:
            eta_s = max(0.0, (total - step) * pace - (now - mine[-1]["time"]))
        note = (f"{pace:.3g} s/step, last logged {duration(now - mine[-1]['time'])} ago" if pace is not None
                else "training; no step of this launch logged yet")
    elif state == "starting":
        note = f"a launch ({holder}) holds it and has not begun training"
    elif state == "dead":
        note = f"status.json says running, but {holder}; run the same command again to resume"
    elif state == "completed":
        best = best_text((status.get("summary") or {}).get("best"))
        note = (f"best {best}; " if best else "") + f"ended {duration(now - status.get('time', now))} ago"
    elif state == "new":
        note = "never launched (no status.json)"
    else:
        note = describe(status)
    resized = status.get("resized")  # an elastic Slurm job on another node count (launch.elastic)
    if isinstance(resized, dict) and isinstance(resized.get("line"), str):
        note = f"{note}; {resized['line']}" if note else resized["line"]
    return Standing(run_dir, state, step, total_steps(settings, last), last["loss"] if last else None,
                    f"{metric} {evals[-1][key]:.4f} @{evals[-1]['step']}" if evals else None, eta_s, note)


def is_run_dir(path: Path) -> bool:
    return (path / RECIPE_FILE).is_file() or (path / STATUS_FILE).is_file()


def run_dirs(paths: list[str]) -> list[Path]:
    """The run directories ``shardforge status`` shows: ``paths`` (a directory of run directories
    stands for those it holds), or those under ``./runs``; ``ValueError`` (one line) for a bad path."""
    if not paths:
        if not RUNS_ROOT.is_dir():
            raise ValueError(f"{RUNS_ROOT}: no such directory in {Path.cwd()}; give the run directories "
                             f"(shardforge status RUN_DIR ...), or run it where runs/ is")
        return sorted(p for p in RUNS_ROOT.iterdir() if p.is_dir() and is_run_dir(p))
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ValueError(f"{path}: no such directory; give a run directory such as runs/NAME")
        inside = [] if is_run_dir(path) else sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
        if not is_run_dir(path) and not inside:
            raise ValueError(f"{path}: not a run directory (no {RECIPE_FILE} or {STATUS_FILE}) and holds none; "
                             f"give a run directory such as runs/NAME")
        found += inside or [path]
    return found


def status_table(rows: list[Standing]) -> str:
    """One line per run under a header; the last column (what to know or do) is not padded."""
    cells = [("RUN", "STATE", "STEP", "LOSS", "EVAL", "ETA", "NOTE")]
    for r in rows:
        step = "-" if r.step is None else f"{r.step}/{r.max_steps}" if r.max_steps else str(r.step)
        cells.append((str(r.run_dir), r.state, step, "-" if r.loss is None else f"{r.loss:.4f}", r.eval or "-",
                      "-" if r.eta_s is None else duration(r.eta_s), r.note))
    widths = [max(len(row[i]) for row in cells) for i in range(6)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[6]]).rstrip() for row in cells)


def best_text(best) -> str:
    """``loss 4.9051 at step 150`` from status.json's ``summary.best``; ``""`` without one."""
    try:
        return f"{best['metric']} {float(best['value']):.4f} at step {best['step']}"
    except (TypeError, KeyError, ValueError):
        return ""


def test_headline(results: dict, task: str, metric: str) -> str:
    """``accuracy 0.8810, loss 0.4123, ...``: the eval metric first, then the task's first four."""
    from train.config.recipe import TASK_METRICS

    metrics = results.get("metrics") or {}
    names = dict.fromkeys([metric, *TASK_METRICS.get(task, ("loss",))[:4]])
    return ", ".join(f"{n} {metrics[n]:.4f}" for n in names if isinstance(metrics.get(n), (int, float)))


def read_test_results(run_dir: Path, step: Optional[int]) -> Optional[dict]:
    """``test_results.json`` when it was written at ``step`` (by this run's end), else ``None``."""
    try:
        results = json.loads((run_dir / TEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("step") == step else None


def export_choice(run_dir: Path) -> tuple[Optional[Path], Optional[Path]]:
    """(the latest committed checkpoint, the best one when ``checkpoints/best.json`` names a
    committed one): without ``--step``, ``shardforge export`` takes the best, else the latest."""
    root = run_dir / "checkpoints"
    committed = committed_checkpoints(root)
    try:
        best = root / json.loads((root / BEST_FILE).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        best = None
    return (committed[-1] if committed else None), (best if best in committed else None)


def end_lines(run_dir: Path, status: dict, launched: Optional[float] = None) -> list[str]:
    """The lines under ``completed at step N``: duration, tokens, best evaluation, test metrics,
    the checkpoint and the command that exports it. ``launched``: when this launch began."""
    settings = recipe_settings(run_dir)
    task, metric = settings.get("task", "causal_lm"), settings.get("metric", "loss")
    summary = status.get("summary") or {}
    step, end = status.get("step"), status.get("time")
    lines = []
    spans = [f"{duration(end - since)}{what}" for since, what in ((launched, " for this launch"),
                                                                 (status.get("started"), " training loop"))
             if end is not None and since is not None]
    if spans:
        lines.append(f"duration    {spans[0]}" + (f" ({spans[1]})" if len(spans) > 1 else ""))
    tail = tail_records(run_dir / METRICS_FILE, lambda records: any("tokens" in r for r in records))
    tokens = summary.get("tokens", next((r["tokens"] for r in reversed(tail) if "tokens" in r), None))
    lines.append(f"trained     {step} steps" + (f", {tokens:,} tokens" if isinstance(tokens, int) else ""))
    best = best_text(summary.get("best"))
    if best:
        lines.append(f"best eval   {best}")
    else:  # a status.json from before the trainers wrote a summary: the last evaluation logged
        key = eval_key(metric)
        last = next((r for r in reversed(tail) if key in r), None)
        if last:
            lines.append(f"last eval   {metric} {last[key]:.4f} at step {last['step']}")
    results = read_test_results(run_dir, step)
    if results:
        lines.append(f"test        {test_headline(results, task, metric)} ({results.get('samples')} samples, "
                     f"{results.get('checkpoint')}; {run_dir / 'test_results.md'})")
    latest, best_ckpt = export_choice(run_dir)
    if latest is None:
        lines.append("checkpoint  none committed (checkpoint.at_end is off and no periodic save ran): "
                     "nothing to export")
        return lines
    out = run_dir / "export"
    if out.exists():
        out = run_dir / f"export-{(best_ckpt or latest).name}"
    command = f"shardforge export {shlex.quote(str(run_dir))} {shlex.quote(str(out))}"
    if best_ckpt is not None and best_ckpt != latest:
        lines.append(f"checkpoint  {latest} (last); best: {best_ckpt}")
        lines.append(f"export      {command}   # the best; --step {int(latest.name.split('-')[1])} for the last")
    else:
        lines.append(f"checkpoint  {latest}")
        lines.append(f"export      {command}")
    return lines
