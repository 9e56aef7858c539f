"""``shardforge report RUN_DIR``: read the TensorBoard event files, draw report.png and report.html."""

from __future__ import annotations

import base64
import html
from pathlib import Path

PANELS = [
    ("Loss", ["train/loss", "eval/loss"]),
    ("Tokens/s (global)", ["perf/tokens_per_s"]),
    ("MFU", ["perf/mfu"]),
    ("GPU utilisation % (mean over ranks)", ["gpu_util/mean", "host_cpu_util/mean"]),
    ("Memory GB", ["memory/peak_allocated_gb", "gpu_mem_used_gb/mean", "host_rss_gb/mean"]),
    ("Learning rate", ["train/lr"]),
]


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
    fig, axes = plt.subplots(3, 2, figsize=(12, 11))
    for ax, (title, tags) in zip(axes.flat, PANELS):
        shown = [t for t in tags if t in scalars]
        for tag in shown:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=tag)
        ax.set_title(title if shown else f"{title} (not logged)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if shown:
            ax.legend(fontsize=8)
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
