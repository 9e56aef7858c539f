"""``shardforge report RUN_DIR``: read the TensorBoard event files, draw report.png and report.html."""

from __future__ import annotations

import base64
import html
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

from launch.status import duration

# (title, tags); a panel shows the tags the run logged and is left out when it logged none
PANELS = [
    ("Loss", ["train/loss", "eval/loss"]),
    ("Gradient norm (before clipping)", ["train/grad_norm"]),
    ("Tokens/s (global)", ["perf/tokens_per_s"]),
    ("Step time breakdown (s per step)", ["perf/step_time_s", "perf/data_wait_s", "perf/fwd_bwd_s", "perf/optim_s"]),
    ("MFU", ["perf/mfu"]),
    ("GPU utilisation % (mean over ranks)", ["gpu_util/mean"]),
    ("Host CPU utilisation % (no GPU; mean over ranks)", ["host_cpu_util/mean"]),
    ("Memory GB", ["memory/peak_allocated_gb", "gpu_mem_used_gb/mean", "host_rss_gb/mean"]),
    ("Learning rate", ["train/lr"]),
]
NOT_TASK_METRICS = ("eval/loss", "eval/perplexity")
TIME_AXIS = {"Tokens/s (global)", "Step time breakdown (s per step)", "MFU", "GPU utilisation % (mean over ranks)",
             "Host CPU utilisation % (no GPU; mean over ranks)", "Memory GB"}
"""Panels of rates and machine state, drawn against wall-clock time: a stall (an evaluation, a save,
a gap between launches) shows where it happened and for how long, which a step axis hides."""
FROM_ZERO = {"Memory GB", "GPU utilisation % (mean over ranks)", "Host CPU utilisation % (no GPU; mean over ranks)"}
"""Panels whose y axis starts at 0: an amount, read against the whole."""


def panels(scalars: dict) -> list[tuple[str, list[str]]]:
    """The panels to draw for these scalars: the fixed ones that have data, then the task's
    validation metrics (accuracy, F1, ...) when it logged any. Host CPU use is shown only
    without GPU telemetry, and labelled as such."""
    chosen = [(title, [t for t in tags if t in scalars]) for title, tags in PANELS]
    if any(t.startswith("gpu_util/") for t in scalars):
        chosen = [(title, tags) for title, tags in chosen if not title.startswith("Host CPU")]
    task = sorted(t for t in scalars if t.startswith("eval/") and t not in NOT_TASK_METRICS and t.count("/") == 1)
    chosen.append(("Validation metrics", task))
    return [(title, tags) for title, tags in chosen if tags]


def read_events(run_dir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """Tag → [(wall time, step, value)] from every event file under ``run_dir/tensorboard``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run_dir / "tensorboard"
    if not tb.is_dir():
        raise FileNotFoundError(f"{run_dir}: no tensorboard/ directory; is this a shardforge run directory?")
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag → [(step, value)] from every event file under ``run_dir/tensorboard``."""
    return {tag: [(step, value) for _, step, value in events] for tag, events in read_events(run_dir).items()}


def time_unit(seconds: float) -> tuple[str, float]:
    """The unit an elapsed-time axis of ``seconds`` reads best in, and its length in seconds."""
    return ("s", 1.0) if seconds < 120 else ("min", 60.0) if seconds < 2 * 3600 else ("h", 3600.0)


def extrapolated(xs, ys) -> tuple[list[float], list[float]]:
    """``(xs, ys)`` with one more point a whole span beyond each end, on the mean slope: an axis
    mapped through them stays linear past the data instead of stopping at its ends."""
    span = xs[-1] - xs[0]
    slope = (ys[-1] - ys[0]) / span if span else 0.0
    return [xs[0] - span, *xs, xs[-1] + span], [ys[0] - slope * span, *ys, ys[-1] + slope * span]


def run_start(run_dir: Path, events: dict) -> float:
    """Time zero of the elapsed axes: the first event, or this launch's training loop when it began
    earlier (the first event comes a log step later)."""
    from train.rundir import read_status

    first = min(t for values in events.values() for t, _, _ in values)
    started = read_status(run_dir).get("started")
    return min(first, started) if isinstance(started, (int, float)) else first


def headline(run_dir: Path, events: dict) -> tuple[str, str]:
    """The figure's title (run, state, steps, wall-clock duration) and a line of final numbers:
    train loss, the last and best evaluation, the test split, tokens."""
    from launch.status import best_text, eval_key, read_test_results, recipe_settings, test_headline
    from train.rundir import read_status

    status, settings = read_status(run_dir), recipe_settings(run_dir)
    end = max(t for values in events.values() for t, _, _ in values)
    last_step = max((s for values in events.values() for _, s, _ in values), default=0)
    state = f"{status['state']} at step {status.get('step')}" if status.get("state") else f"step {last_step}"
    span = duration(end - run_start(run_dir, events))
    title = f"shardforge run: {run_dir.resolve().name} ({state}; {span} wall clock)"
    metric = settings.get("metric", "loss")
    numbers = []

    def last(tag: str) -> Optional[tuple[int, float]]:
        return (events[tag][-1][1], events[tag][-1][2]) if events.get(tag) else None

    if (loss := last("train/loss")) is not None:
        numbers.append(f"final train loss {loss[1]:.4f}")
    eval_tag = "eval/" + {"eval_ppl": "perplexity"}.get(eval_key(metric), eval_key(metric)[5:])
    if (ev := last(eval_tag)) is not None:
        numbers.append(f"eval {metric} {ev[1]:.4f} at step {ev[0]}")
    if best := best_text((status.get("summary") or {}).get("best")):
        numbers.append(f"best {best}")
    results = read_test_results(run_dir, status.get("step"))
    if results:
        numbers.append(f"test {test_headline(results, settings.get('task', 'causal_lm'), metric)}")
    if (tokens := last("train/tokens")) is not None:
        numbers.append(f"{tokens[1]:,.0f} tokens")
    return title, "; ".join(numbers)


def draw(run_dir: Path, events: dict[str, list[tuple[float, int, float]]], title: str, numbers: str):
    """The report's figure (matplotlib, Agg): ``title`` and ``numbers`` (:func:`headline`), then the
    panels; rates and machine state against elapsed wall-clock time, the rest against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    drawn = panels({tag: values for tag, values in events.items()})
    start = run_start(run_dir, events)
    unit, per_unit = time_unit(max(t for values in events.values() for t, _, _ in values) - start)
    rows = (len(drawn) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 3.6 * rows + 0.6), squeeze=False)
    steps: Sequence[float]  # a panel's steps, then (Loss) the extrapolated ones of the loss events
    for ax, (title, tags) in zip(axes.flat, drawn):
        for tag in tags:
            times, steps, values = zip(*events[tag])
            x = [(t - start) / per_unit for t in times] if title in TIME_AXIS else steps
            ax.plot(x, values, marker="." if len(steps) < 30 else None, label=tag)
        ax.set_title(title)
        ax.set_xlabel(f"elapsed ({unit}, wall clock)" if title in TIME_AXIS else "step")
        if title in FROM_ZERO:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if title == "Loss" and len(events.get("train/loss", ())) >= 2:  # when each loss was reached
            loss_times, loss_steps, _ = zip(*events["train/loss"])
            steps, elapsed = extrapolated(loss_steps, np.maximum.accumulate([(t - start) / per_unit
                                                                             for t in loss_times]))
            if np.all(np.diff(elapsed) > 0):  # invertible
                top = ax.secondary_xaxis("top", functions=(partial(np.interp, xp=steps, fp=elapsed),
                                                           partial(np.interp, xp=elapsed, fp=steps)))
                top.set_xlabel(f"elapsed ({unit})", fontsize=8)
                top.tick_params(labelsize=8)
    for ax in axes.flat[len(drawn):]:
        ax.set_visible(False)
    inch = 1 / fig.get_figheight()  # the header's rows, in figure fractions
    fig.suptitle(title, fontsize=13, y=1 - 0.12 * inch, va="top")
    fig.text(0.5, 1 - 0.5 * inch, numbers, ha="center", va="top", fontsize=9,
             bbox={"boxstyle": "round", "facecolor": "whitesmoke", "edgecolor": "lightgray"})
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 * inch))
    return fig


def write_report(run_dir: Path) -> tuple[Path, Path]:
    import matplotlib.pyplot as plt

    events = read_events(run_dir)
    if not events:
        raise ValueError(f"{run_dir}: the event files hold no scalars yet; run some steps first")
    title, numbers = headline(run_dir, events)
    fig = draw(run_dir, events, title, numbers)
    png = run_dir / "report.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    last = {tag: values[-1] for tag, values in sorted(events.items())}
    rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{s}</td><td>{v:.6g}</td></tr>" for t, (_, s, v) in last.items())
    image = base64.b64encode(png.read_bytes()).decode()
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(run_dir.name)}</title>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(numbers)}</p><img src='data:image/png;base64,{image}'>"
            f"<h2>Last values</h2><table border=1><tr><th>tag</th><th>step</th><th>value</th></tr>{rows}</table>")
    page_path = run_dir / "report.html"
    page_path.write_text(page)
    return png, page_path
