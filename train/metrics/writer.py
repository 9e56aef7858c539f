"""The rank-0 metrics writer (TensorBoard, metrics.jsonl, the console bar) and the ranks' aggregation."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

logger = logging.getLogger("shardforge")


def aggregate_ranks(per_rank: list[dict]) -> dict:
    """Per-rank values as ``name/rankN`` plus ``name/min|mean|max`` across ranks."""
    out: dict[str, float] = {}
    for key in sorted(set().union(*per_rank)):
        values = [r[key] for r in per_rank if key in r]
        for i, r in enumerate(per_rank):
            if key in r:
                out[f"{key}/rank{i}"] = r[key]
        out[f"{key}/min"], out[f"{key}/max"] = min(values), max(values)
        out[f"{key}/mean"] = sum(values) / len(values)
    return out


# TensorBoard tag for each metrics.jsonl key (the README lists them).
TB_TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s", "tokens_per_s_per_device": "perf/tokens_per_s_per_device",
    "samples_per_s": "perf/samples_per_s", "step_time_s": "perf/step_time_s",
    "data_wait_s": "perf/data_wait_s", "fwd_bwd_s": "perf/fwd_bwd_s", "optim_s": "perf/optim_s",
    "model_tflops": "perf/model_tflops_per_device", "mfu": "perf/mfu",
    "mem_allocated_gb": "memory/peak_allocated_gb", "mem_reserved_gb": "memory/peak_reserved_gb",
    "skipped_steps": "train/skipped_steps", "nonfinite_steps": "train/nonfinite_steps", "tokens": "train/tokens",
    "epoch": "train/epoch",
    "eval_loss": "eval/loss", "eval_ppl": "eval/perplexity",
}


def tb_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key: :data:`TB_TAGS`, ``eval_x`` → ``eval/x``, ``test_x`` → ``test/x``."""
    if key in TB_TAGS:
        return TB_TAGS[key]
    for prefix in ("eval", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return key


class MetricsWriter:
    """Rank 0's sink: one JSON object per log step in ``metrics.jsonl``, TensorBoard, a console line."""

    FLUSH_EVERY_S = 10.0

    def __init__(self, run_dir: Path, tensorboard: bool, console: bool, max_steps: int, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        self._flushed = time.monotonic()
        self._drop_after(resume_step)
        self.jsonl = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed run wrote after its last checkpoint
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
            recipe = run_dir / "recipe.yaml"
            if recipe.exists():  # the resolved recipe, as TensorBoard text (indented: a code block)
                self.tb.add_text("recipe", "".join(f"    {line}\n" for line in recipe.read_text().splitlines()),
                                 global_step=resume_step)
            # Building ~20 summary protos per log step costs milliseconds: a thread does it.
            self._queue: queue.Queue = queue.Queue()
            self._thread = threading.Thread(target=self._tb_worker, name="tensorboard", daemon=True)
            self._thread.start()
        self.bar = None
        if console:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=resume_step, dynamic_ncols=True, desc="train",
                            mininterval=1.0, smoothing=0.1)

    def _drop_after(self, step: int) -> None:
        """Remove lines past ``step`` (logged after the checkpoint we resume from), and lines that
        are no record (torn by a crash mid-write). A ``metrics.jsonl`` that is a symbolic link is
        replaced by a file of its own: the run never reads or appends through a link."""
        if self.path.is_symlink():
            logger.warning(f"metrics: {self.path} was a symbolic link to {os.readlink(self.path)}; this run writes a "
                           f"metrics.jsonl of its own (the link's target is untouched)")
            self.path.unlink()
            return
        if not self.path.exists():
            return
        kept, torn = [], 0
        with open(self.path, errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    torn += bool(line.strip())
                    continue
                if isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= step:
                    kept.append(line.rstrip("\n"))
        if torn:
            logger.warning(f"metrics: dropped {torn} line(s) of {self.path} that are no JSON record (torn by a crash?)")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, values: dict) -> None:
        record = {"step": step, "time": round(time.time(), 3),
                  **{k: v for k, v in values.items() if v is not None}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb:
            self._queue.put(record)

    def _tb_worker(self) -> None:
        assert self.tb is not None  # the thread runs only with a SummaryWriter (__init__)
        while (record := self._queue.get()) is not None:
            for key, value in record.items():
                if key not in ("step", "time"):
                    self.tb.add_scalar(tb_tag(key), value, record["step"])
            if time.monotonic() - self._flushed >= self.FLUSH_EVERY_S:  # a flush costs a file sync
                self.tb.flush()
                self._flushed = time.monotonic()

    def progress(self, step: int, values: dict) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{values['loss']:.4f}", "tok/s": f"{values['tokens_per_s']:,.0f}",
                "samples/s": f"{values['samples_per_s']:,.{1 if values['samples_per_s'] < 100 else 0}f}"}
        if values.get("mfu") is not None:
            post["mfu"] = f"{100 * values['mfu']:.1f}%"
        self.bar.n = step
        self.bar.set_postfix(post, refresh=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb:
            self._queue.put(None)
            self._thread.join()
            self.tb.close()
        self.jsonl.close()
