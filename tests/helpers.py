"""Shared helpers for the tests: a generated corpus, tiny recipes, real `shardforge` launches."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "shakespeare"

WORDS = ("the king queen lord lady sword crown night day love death blood heart hand eye "
         "speak come go stay fly fight weep laugh sleep dream ghost storm sea shore field "
         "castle tower gate fool knave wit truth lie honour fortune grace mercy war peace").split()


def make_corpus(root: Path, files: int = 12, words_per_file: int = 3000, seed: int = 0) -> Path:
    """Deterministic pseudo-English text files: real enough for BPE and a falling loss."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = []
        for _ in range(words_per_file // 10):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + ".")
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_recipe(corpus: Path, cache: Path, run_dir: Path, **sections) -> dict:
    """A seconds-long fp32 recipe on the generated corpus; ``sections`` update it shallowly."""
    recipe = {
        "run": {"name": run_dir.name, "dir": str(run_dir), "seed": 7},
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 2,
                             "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "data": {"sources": [{"path": str(corpus)}], "seq_len": 32, "val_fraction": 0.05,
                 "tokenizer": {"train": {"vocab_size": 400}}, "cache_dir": str(cache),
                 "num_workers": 0},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "decay": "cosine"},
        "train": {"max_steps": 6, "micro_batch_size": 2, "global_batch_size": 8, "log_every": 1,
                  "eval_every": 0, "eval_batches": 2},
        "parallel": {"engine": "ddp", "precision": "fp32", "nproc": 2},
        "checkpoint": {"every_steps": 0, "at_end": False},
        "logging": {"console": False, "telemetry_interval_s": 0.2},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def shardforge(*args: str, cwd: Path | None = None, timeout: float = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI (``python -m launch``) in a subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def launch_in_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``shardforge ARGS`` through ``launch.cli.main`` in this process: the same code path as the
    CLI minus a fresh interpreter, which saves the launcher's ~8 s of imports per launch. The
    trainers still run as real torchrun subprocesses. CLI behaviour itself (exit codes, one-line
    errors) is tested through :func:`shardforge`.
    """
    import io
    import signal

    from launch.cli import main

    extra = {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
             "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    saved_env = {k: os.environ.get(k) for k in extra}
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    saved_streams = sys.stdout, sys.stderr
    os.environ.update(extra)
    sys.stdout, sys.stderr = out, err
    try:
        code = main(list(args))
    finally:
        sys.stdout, sys.stderr = saved_streams
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(["shardforge", *args], code, out.buffer.getvalue().decode(),
                                       err.buffer.getvalue().decode())


def run_recipe(tmp: Path, recipe: dict, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    path = write_recipe(tmp / f"{Path(recipe['run']['dir']).name}.yaml", recipe)
    proc = launch_in_process("run", str(path), *overrides)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def train_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
