"""Benchmarks are not tests: these run each one once in its seconds-long smoke mode so the scripts cannot rot.

Nothing here checks a timing; only that every row is produced and the JSON is well formed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
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


def _gpu_sh(tmp_path, *args: str, inject: str = "") -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OUT": str(tmp_path / "out"), "SHARDFORGE_GPU_WORK": str(tmp_path / "work"),
           "SHARDFORGE_GPU_PYTHON": sys.executable, "SHARDFORGE_GPU_INJECT": inject}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--cpu-smoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gpu_sh_runs_both_phases_on_cpu(tmp_path):
    """`bash benchmarks/gpu.sh` end to end on CPU with tiny models of the same families: phase 1's
    checks and one 5-step run per engine, then every measurement (the compile rows are skipped), the
    JSON written as it goes."""
    from benchmarks.gpu import MEASUREMENTS
    from benchmarks.gpu_check import ENGINES

    proc = _gpu_sh(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    check = json.loads((out / "gpu-check.json").read_text())
    assert check["ok"] and [c["name"] for c in check["checks"]] == [
        "python", "imports", "requirements", "torch", "corpus", *(f"engine-{e}" for e in ENGINES)]
    assert all(len(c["losses"]) == 5 for c in check["checks"] if c["name"].startswith("engine-"))
    lines = _jsonl(out / "gpu-results.jsonl")
    assert [r["name"] for r in lines] == [m[0] for m in MEASUREMENTS]
    rows = {r["name"]: r for r in json.loads((out / "gpu-results.json").read_text())["rows"]}
    assert {n for n, r in rows.items() if r["status"] != "ok"} == {"gpt2-ddp-compile", "gpt2-hf-compile"}, rows
    for name in ("gpt2-ddp", "gpt2-fsdp", "gpt2-zero2", "llama1b-fsdp", "llama1b-zero3"):
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["plan_gb"] > 0 and rows[name]["vs_hf"] > 0, rows[name]
    assert rows["gpt2-ddp"]["model"] == "tiny-gpt2" and rows["llama1b-zero3"]["model"] == "tiny-llama"
    assert rows["gpt2-hf"]["tokens_per_s"] > 0 and rows["host-overhead"]["bare_step_time_s"] > 0
    assert rows["ckpt"]["stall_s"] > 0 and rows["ckpt"]["load_vs_torch_load"] > 0
    assert rows["resume"]["equal"] and rows["resume"]["losses_resumed"], rows["resume"]
    assert rows["nvml-tags"]["points"]["host_cpu_util"] > 0  # on CPU the telemetry is the host's
    assert "gpu.sh: done" in (out / "gpu.log").read_text()


def test_gpu_sh_phase_1_stops_at_the_first_failure(tmp_path):
    proc = _gpu_sh(tmp_path, inject="fail:requirements")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: FAIL requirements: injected failure" in proc.stdout
    check = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert check["ok"] is False and check["failed"] == "requirements"
    assert [c["name"] for c in check["checks"]] == ["python", "imports", "requirements"]
    assert not (tmp_path / "out" / "gpu-results.jsonl").exists()


def _gpu(tmp_path, *args: str, inject: str) -> subprocess.Popen:
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "SHARDFORGE_GPU_INJECT": inject}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--cpu-smoke", "--out", str(tmp_path / "out"),
                             "--work", str(tmp_path / "work"), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_measurement_past_its_timeout_is_killed_with_its_tree_and_the_next_one_runs(tmp_path):
    import re

    proc = _gpu(tmp_path, "--only", "peak,ckpt", "--timeout", "peak=4", inject="hang:peak")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    rows = _jsonl(tmp_path / "out" / "gpu-results.jsonl")
    assert [(r["name"], r["status"]) for r in rows] == [("peak", "timeout"), ("ckpt", "ok")], rows
    assert "killed at its 4 s timeout" in rows[0]["error"]
    pid = int(re.search(r"grandchild pid (\d+)", (tmp_path / "out" / "gpu-measure.log").read_text()).group(1))
    assert _gone(pid), "the hung measurement's grandchild (a session of its own) outlived the timeout"


def test_the_deadline_caps_timeouts_and_skips_what_cannot_fit(tmp_path):
    import time

    proc = _gpu(tmp_path, "--only", "peak,ckpt", "--deadline-at", str(time.time() + 3), inject="hang:peak")
    out, _ = proc.communicate(timeout=300)
    rows = _jsonl(tmp_path / "out" / "gpu-results.jsonl")
    assert [(r["name"], r["status"]) for r in rows] == [("peak", "timeout"), ("ckpt", "skipped")], out[-3000:]
    assert "before the deadline" in rows[1]["error"]


def test_a_run_cut_off_keeps_every_finished_row(tmp_path):
    """What the device call's own limit does: the orchestrator killed mid-measurement."""
    import time

    from benchmarks.gpu_common import kill_tree

    proc = _gpu(tmp_path, "--only", "peak,ckpt", inject="hang:ckpt")
    jsonl = tmp_path / "out" / "gpu-results.jsonl"
    deadline = time.time() + 300
    while not (jsonl.exists() and jsonl.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1)
    kill_tree(proc.pid)
    proc.communicate(timeout=60)
    assert [(r["name"], r["status"]) for r in _jsonl(jsonl)] == [("peak", "ok")]
    full = json.loads((tmp_path / "out" / "gpu-results.json").read_text())
    assert [r["name"] for r in full["rows"]] == ["peak"] and full["peak"]["measured_peak_tflops"] > 0


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


def test_the_data_scale_benchmark_runs(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.data_scale", "--smoke", "--work", str(tmp_path / "work"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["prepare"]["outside_bytes"] == 0
    # the same ids as the bare tokenizer on whole files (over the piece bound), plus one EOS per file
    assert row["tokens"] == row["baseline"]["tokens"] + row["files"] == row["baseline_fast"]["tokens"] + row["files"]
    for part in ("prepare", "baseline", "baseline_fast"):
        assert row[part]["wall_s"] > 0 and row[part]["peak_rss_mb"] > 0, row
    assert row["startup_s"] > 0 and "| corpus |" in proc.stdout and not (tmp_path / "work").exists()
