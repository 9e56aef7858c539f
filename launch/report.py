"""``shardforge report RUN_DIR``: read the TensorBoard event files, draw report.png and report.html."""

from __future__ import annotations

import base64
import html
from pathlib import Path

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


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag → [(step, value)] from every event file under ``run_dir/tensorboard``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run_dir / "tensorboard"
    if not tb.is_dir():
        raise FileNotFoundError(f"{run_dir}: no tensorboard/ directory; is this a shardforge run directory?")
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def write_report(run_dir: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(run_dir)
    if not scalars:
        raise ValueError(f"{run_dir}: the event files hold no scalars yet; run some steps first")
    drawn = panels(scalars)
    rows = (len(drawn) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 3.6 * rows), squeeze=False)
    for ax, (title, tags) in zip(axes.flat, drawn):
        for tag in tags:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=tag)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[len(drawn):]:
        ax.set_visible(False)
    fig.suptitle(f"shardforge run: {run_dir.resolve().name}")
    fig.tight_layout()
    png = run_dir / "report.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    last = {tag: values[-1] for tag, values in sorted(scalars.items())}
    rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{s}</td><td>{v:.6g}</td></tr>" for t, (s, v) in last.items())
    image = base64.b64encode(png.read_bytes()).decode()
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(run_dir.name)}</title>"
            f"<h1>{html.escape(run_dir.name)}</h1><img src='data:image/png;base64,{image}'>"
            f"<h2>Last values</h2><table border=1><tr><th>tag</th><th>step</th><th>value</th></tr>{rows}</table>")
    page_path = run_dir / "report.html"
    page_path.write_text(page)
    return png, page_path
