"""Benchmarks are not tests: these run each one once in its seconds-long smoke mode so the scripts cannot rot.

Nothing here checks a timing; only that every row is produced and the JSON is well formed.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def test_cpu_benchmarks_smoke(tmp_path):
    out = tmp_path / "cpu.json"
    proc = _run("benchmarks.cpu", "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    names = " ".join(row["name"] for row in result["rows"])
    for part in ("loop:", "startup:", "datawait:", "accum:", "logging:", "tokenize:", "ckpt: save", "ckpt: load"):
        assert part in names, f"missing row {part}: {names}"
    assert all(row["ours"] > 0 and row["baseline"] > 0 for row in result["rows"]), result["rows"]
    assert "ratio" in proc.stdout and "loop: step time vs bare PyTorch loop" in proc.stdout


def test_gpu_benchmark_validates_on_cpu(tmp_path):
    """The H100 script, end to end on CPU with a tiny model: every engine and the HF Trainer baseline."""
    out = tmp_path / "gpu.json"
    proc = _run("benchmarks.gpu", "--cpu-smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["engine"] for r in rows} == {"ddp", "fsdp", "zero2", "hf-trainer"}
    assert all(r["tokens_per_s"] and r["tokens_per_s"] > 0 for r in rows), rows
    assert all(r["vs_hf"] for r in rows if r["engine"] != "hf-trainer")


def test_bad_benchmark_arguments_exit_2():
    proc = _run("benchmarks.cpu", "--only", "nonsense")
    assert proc.returncode == 2 and "unknown" in proc.stderr


def test_adversarial_benchmark_smoke(tmp_path):
    """Two recipe cases, no launch: both refused cleanly, the table and JSON are written."""
    out = tmp_path / "adversarial.json"
    proc = _run("benchmarks.adversarial", "--only", "run.seed=-1,duplicate section", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tried"] == 2 and result["counts"]["exit2"] == 2, result
    assert "| tried | exit2 | traceback | hang | silent | data_lost | code_executed |" in proc.stdout
    assert _run("benchmarks.adversarial", "--only", "nonsense").returncode == 2
