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
    assert all(r["plan_gb"] > 0 for r in rows if r["engine"] != "hf-trainer")  # the plan, next to the peak


def test_build_memory_benchmark_smoke(tmp_path):
    """Every rank building the weights vs rank 0 building them (fsdp, zero3), and the plan vs DeepSpeed."""
    out = tmp_path / "build.json"
    proc = _run("benchmarks.build_memory", "--smoke", "--nproc", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {(c["engine"], c["mode"]) for c in result["cases"]} == {
        (e, m) for e in ("fsdp", "zero3") for m in ("eager", "placed")}
    assert all(c["peak_rss_node"] > 0 and len(c["peak_rss_per_rank"]) == len(c["rss_after_build"]) == 2
               for c in result["cases"])
    assert {r["recipe"] for r in result["plan_vs_deepspeed"]} == {"llama-1b", "llama-7b-zero3"}


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
    assert "| tried | exit2 | ok | traceback | hang | silent | data_lost | code_executed |" in proc.stdout
    assert _run("benchmarks.adversarial", "--only", "nonsense").returncode == 2


def test_wheel_check_finds_each_requirement_in_the_wheels_or_the_gpu_image(tmp_path):
    """The carried-wheel check on wheels made here: a requirement met by a wheel, one met by the
    image's recorded version, one too old in the image, one nowhere, one whose marker excludes
    Python 3.12, and one the image holds at a version not on record (unverified, not unmet)."""
    import zipfile

    from benchmarks.wheel_check import check

    def wheel(name: str, version: str, *requires: str) -> None:
        with zipfile.ZipFile(tmp_path / f"{name}-{version}-py3-none-any.whl", "w") as zf:
            meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n".format(name, version)
            zf.writestr(f"{name}-{version}.dist-info/METADATA", meta + "".join(f"Requires-Dist: {r}\n" for r in requires))

    wheel("foo", "1.0", "bar>=2", "numpy>=2.0", "torch>=2.12", "nowhere-pkg", "oldpy; python_version < '3.0'",
          "pandas>=2")
    wheel("bar", "2.1")
    lines, unmet, unverified = check(tmp_path)
    assert any("bar>=2" in line and "wheel 2.1" in line for line in lines)
    assert any("numpy>=2.0" in line and "image 2.5.2" in line and "UNMET" not in line for line in lines)
    assert [u.split()[1] for u in unmet if u.startswith("foo")] == ["torch>=2.12", "nowhere-pkg"]
    assert not any("oldpy" in line for line in lines)
    assert any(u.startswith("foo") and "pandas>=2" in u for u in unverified)
    wheel("bar", "3.0")
    assert check(tmp_path)[1] == ["bar: two wheels (2.1 and 3.0); keep one"]
