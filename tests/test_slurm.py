"""Slurm: the rendered job script (golden files, quoting) and real jobs on the local cluster.

The real-cluster tests need `slurm/local-cluster.sh start` (`.ci/run` does it). Without a
cluster they are skipped, unless SHARDFORGE_REQUIRE_SLURM=1 (set by `.ci/run`) makes that a
failure, so CI can never pass by skipping them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from train.config.loading import RecipeError, load_recipe
from launch.slurm import render_sbatch
from tests.helpers import (job_info, launch_in_process, make_corpus, read_metrics, shardforge, tiny_recipe,
                           train_losses, wait_for, write_recipe)
from train.config.recipe import recipe_from_dict

GOLDEN = Path(__file__).parent / "golden"
PYTHON, CODE = "/opt/shardforge/.venv/bin/python", "/opt/shardforge"


def _render(recipe_dict: dict, run_dir: str) -> str:
    recipe = recipe_from_dict(recipe_dict)
    recipe.parallel.nproc = recipe.parallel.nproc or recipe.slurm.gpus_per_node
    return render_sbatch(recipe, Path(run_dir), PYTHON, CODE)


GOLDEN_CASES = {
    "slurm-1node.sbatch": ({"run": {"name": "tiny"}, "model": {"config": {"model_type": "llama"}},
                            "parallel": {"engine": "ddp", "nproc": 2},
                            "slurm": {"gpus_per_node": 0, "cpus_per_task": 4, "mem": "8G", "time": "30",
                                      "signal_lead_s": 60, "max_restarts": 3}}, "/scratch/runs/tiny"),
    "slurm-64x8.sbatch": ({"run": {"name": "llama-70b"}, "model": {"config": {"model_type": "llama"}},
                           "parallel": {"engine": "fsdp", "nodes": 64},
                           "slurm": {"gpus_per_node": 8, "cpus_per_task": 96, "partition": "h100",
                                     "account": "llm-team", "qos": "high", "time": "2-00:00:00",
                                     "signal_lead_s": 900, "max_restarts": 50,
                                     "extra_sbatch": ["--exclusive", "--constraint=h100"],
                                     "env": {"NCCL_IB_HCA": "mlx5", "WANDB_NOTES": "it's $HOME \"quoted\""}}},
                          "/lustre/proj/runs/llama-70b"),
    # elastic shrink: --nodes=MIN-MAX without --ntasks-per-node, and the job-start step (launch.elastic)
    "slurm-elastic-2to4.sbatch": ({"run": {"name": "elastic"}, "model": {"config": {"model_type": "llama"}},
                                   "parallel": {"engine": "zero2", "nodes": 4},
                                   "train": {"micro_batch_size": 2, "global_batch_size": 192},
                                   "slurm": {"gpus_per_node": 8, "cpus_per_task": 96, "min_nodes": 2,
                                             "time": "4:00:00", "max_restarts": 5}}, "/scratch/runs/elastic"),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_rendered_script_matches_golden_file(name):
    text = _render(*GOLDEN_CASES[name])
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, "not valid bash"
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(text)
        pytest.skip(f"regenerated tests/golden/{name}: review it with git diff, then run without UPDATE_GOLDEN")
    assert text == (GOLDEN / name).read_text(), "regenerate with UPDATE_GOLDEN=1 if the change is intended"


def test_shell_values_are_quoted_so_bash_sees_them_verbatim(tmp_path):
    value = "it's $HOME \"quoted\" `date` ; rm -rf /"
    recipe, run_dir = GOLDEN_CASES["slurm-1node.sbatch"]
    recipe = json.loads(json.dumps(recipe))
    recipe["slurm"]["env"] = {"NOTE": value}
    text = _render(recipe, run_dir)
    export = next(line for line in text.splitlines() if line.startswith("export NOTE="))
    out = subprocess.run(["bash", "-c", f"{export}; printf %s \"$NOTE\""], capture_output=True, text=True)
    assert out.stdout == value


@pytest.mark.parametrize("section,key,value,fragment", [
    ("run", "name", "my job", "run.name='my job'"),
    ("run", "name", "x$(id)", "run.name='x$(id)'"),
    ("run", "name", "it's", "run.name=\"it's\""),
    ("slurm", "partition", "gpu;rm", "slurm.partition='gpu;rm'"),
    ("slurm", "time", "forever", "slurm.time='forever'"),
    ("slurm", "extra_sbatch", ["--comment=a b"], "slurm.extra_sbatch[0]"),
    ("slurm", "env", {"BAD-NAME": "1"}, "'BAD-NAME' is not an environment variable name"),
    # a trailing newline passes re.match(r"...$") and would start a command line of its own
    ("slurm", "env", {"NAME\n": "1"}, "'NAME\\n' is not an environment variable name"),
    ("slurm", "partition", "gpu\n", "slurm.partition='gpu\\n': characters '\\n' cannot go"),
    ("slurm", "extra_sbatch", ["--constraint=h100\n"], "slurm.extra_sbatch[0]"),
    ("slurm", "time", "10\n", "slurm.time='10\\n'"),
    ("slurm", "signal_lead_s", 30, "slurm.signal_lead_s=30: Slurm checks time limits about every 30 s"),
])
def test_unsafe_values_are_refused_with_the_key(section, key, value, fragment):
    recipe, run_dir = GOLDEN_CASES["slurm-1node.sbatch"]
    recipe = json.loads(json.dumps(recipe))
    recipe.setdefault(section, {})[key] = value
    with pytest.raises(RecipeError) as err:
        _render(recipe, run_dir)
    assert fragment in str(err.value)


def test_a_save_slower_than_the_slurm_lead_warns(monkeypatch, logged):
    """Under Slurm, a save plus a step longer than ``signal_lead_s`` less the 30 s Slurm may be
    late with its USR1 prints a warning naming the setting; not outside Slurm, not when it fits."""
    from types import SimpleNamespace

    from train.loop.save_schedule import Saver

    said = logged
    saver = object.__new__(Saver)  # only the check: no checkpointer or run behind it
    saver.recipe = SimpleNamespace(slurm=SimpleNamespace(signal_lead_s=60))
    saver.counters = SimpleNamespace(elapsed_s=100.0, step=10)  # 10 s a step
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    saver._warn_if_slower_than_lead(25.0)
    assert said == []
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    saver._warn_if_slower_than_lead(15.0)  # 15 + 10 <= 60 - 30
    assert said == []
    saver._warn_if_slower_than_lead(25.0)  # 25 + 10 > 60 - 30
    assert len(said) == 1 and "a save takes 25 s and a step 10 s" in said[0] and "raise slurm.signal_lead_s" in said[0]


def test_submit_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    recipe = tiny_recipe(tmp_path / "corpus", tmp_path / "cache", tmp_path / "run",
                         slurm={"gpus_per_node": 0, "cpus_per_task": 2})
    make_corpus(tmp_path / "corpus", files=2, words_per_file=200)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = shardforge("submit", str(path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash\n#SBATCH --job-name=run\n")
    assert "--nproc_per_node=2" in proc.stdout and not (tmp_path / "run").exists()
    bad = shardforge("submit", str(path), "run.name=two words")
    assert bad.returncode == 2 and not (tmp_path / "run").exists()
    assert len(bad.stderr.strip().splitlines()) == 1 and "run.name" in bad.stderr and "'two words'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_nproc_defaults_to_gpus_per_node_for_slurm(tmp_path):
    recipe = {"run": {"name": "x", "dir": str(tmp_path / "x")}, "model": {"config": {"model_type": "llama"}},
              "parallel": {"nodes": 2}, "slurm": {"gpus_per_node": 4},
              "data": {"sources": [{"path": "hub/dataset"}], "tokenizer": {"path": "gpt2"}},
              "train": {"micro_batch_size": 1, "global_batch_size": 8}}
    path = write_recipe(tmp_path / "x.yaml", recipe)
    assert load_recipe(str(path), for_slurm=True).parallel.nproc == 4


# ---------------------------------------------------------------- a real Slurm on localhost


def _cluster_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


slurm_required = os.environ.get("SHARDFORGE_REQUIRE_SLURM") == "1"
needs_cluster = pytest.mark.skipif(not slurm_required and not _cluster_up(),
                                   reason="no local Slurm (run `bash slurm/local-cluster.sh start`)")


def submit(path: Path, *overrides: str, cli: bool = False) -> str:
    """``shardforge submit`` in this process (it checks the model through transformers: ~4 CPU-s of
    imports a job saved), or through the real CLI with ``cli``; the job id."""
    proc = (shardforge if cli else launch_in_process)("submit", str(path), *overrides)
    assert proc.returncode == 0, proc.stderr
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


STEPS = 40
"""Steps of the straight job and of every job compared with it: a stop lands after step 5."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    assert _cluster_up(), "SHARDFORGE_REQUIRE_SLURM=1 but no Slurm answers; see slurm/local-cluster.sh"
    tmp = tmp_path_factory.mktemp("slurm")
    corpus = make_corpus(tmp / "corpus")

    def recipe(name: str, **slurm):
        r = tiny_recipe(corpus, tmp / "cache", tmp / name, train={"max_steps": STEPS, "log_every": 1},
                        checkpoint={"every_steps": 0, "at_end": True},
                        slurm={"gpus_per_node": 0, "cpus_per_task": 2, "mem": "0", "time": "10",
                               "signal_lead_s": 45, "max_restarts": 2, **slurm})
        return write_recipe(tmp / f"{name}.yaml", r), tmp / name

    path, run_dir = recipe("straight")
    job = submit(path, cli=True)
    info = wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    return {"recipe": recipe, "straight": run_dir, "log": log, "info": info}


def _final_weights(run_dir: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    from launch.export import export

    export(run_dir, out)
    return load_file(str(out / "model.safetensors"))


@needs_cluster
def test_job_completes(cluster):
    assert cluster["info"]["Restarts"] == "0"
    assert "shardforge: training completed" in cluster["log"]
    assert len(train_losses(cluster["straight"])) == STEPS


@needs_cluster
def test_requeue_mid_run_checkpoints_resumes_and_ends_like_an_uninterrupted_run(cluster, tmp_path):
    path, run_dir = cluster["recipe"]("requeued")
    job = submit(path)
    deadline = time.time() + 180
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < 5:
        assert time.time() < deadline and job_info(job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job], check=True)
    info = wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "restart 1 of at most 2" in log and "resumed from" in log
    assert re.search(r"stop requested \(SIGTERM\) at step \d+", log), log[-3000:]
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl continues without gaps or duplicates"
    assert train_losses(run_dir) == train_losses(cluster["straight"])
    ours, straight = _final_weights(run_dir, tmp_path / "a"), _final_weights(cluster["straight"], tmp_path / "b")
    assert ours.keys() == straight.keys()
    assert all((ours[k] == straight[k]).all() for k in ours), "final weights differ from the uninterrupted run"


@needs_cluster
def test_time_limit_signal_checkpoints_requeues_and_honours_max_restarts(cluster):
    # 2 minute limit, USR1 90 s before it. slurmctld looks at time limits about every 30 s, on
    # whole seconds, and a look can slip on a busy machine: with a 1 minute limit and a 45 s lead
    # only one look fell in the window, and one CI run (2-core VM, DeepSpeed compiling its ops on the
    # other test worker) saw none: TERM at the limit, no USR1. From 30 s into a run to its end, two
    # or three looks can send it.
    path, run_dir = cluster["recipe"]("timelimit", time="2", signal_lead_s=90, max_restarts=1)
    job = submit(path, "train.max_steps=100000")
    info = wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=420)
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and info["Restarts"] == "1", log[-3000:]
    assert log.count("stop requested (SIGUSR1") == 2, log[-3000:]  # once per run
    # on a busy machine a run's USR1 can land before its first step (data preparation, start-up):
    # a clean stop with nothing new to save; otherwise it stops at a step with a checkpoint
    stops = re.findall(r"stop requested \(SIGUSR1(?:\) at step (\d+)| during data preparation| before the first step)",
                       log)
    assert len(stops) == 2, log[-3000:]
    at_steps = [int(s) for s in stops if s]
    assert at_steps == sorted(set(at_steps)), log[-3000:]
    if len(at_steps) == 2:
        assert f"resumed from {run_dir / 'checkpoints' / f'step-{at_steps[0]:06d}'}" in log
    assert "max restarts (1) reached" in log
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped", status
    if stops[-1]:
        assert status["step"] == int(stops[-1]), status
    else:  # data preparation (-1), or before the first step of a fresh (0) or resumed run
        assert status["step"] in (-1, 0, *at_steps), status


def _wait_for_steps(job: str, run_dir: Path, steps: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < steps:
        assert time.time() < deadline and job_info(job)["JobState"] in ("PENDING", "RUNNING"), job_info(job)
        time.sleep(0.2)


def _assert_finished_like_the_straight_run(cluster, run_dir: Path, job: str, info: dict) -> str:
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log[-3000:]
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl continues without gaps or duplicates"
    assert train_losses(run_dir) == train_losses(cluster["straight"]), "the stop changed the training"
    return log


@needs_cluster
def test_scancel_saves_a_checkpoint_and_ends_the_job_cancelled_not_requeued(cluster):
    from train.checkpoint.files import committed_checkpoints

    path, run_dir = cluster["recipe"]("cancelled")
    job = submit(path)
    _wait_for_steps(job, run_dir, 5)
    subprocess.run(["scancel", job], check=True)
    info = wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "PENDING"})
    time.sleep(5)  # a job that requeued itself would be PENDING or RUNNING again by now
    info = job_info(job)
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log[-3000:]
    assert "the job was cancelled, so it is not requeued" in log, log[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and "SIGTERM" in status["reason"], status
    saved = committed_checkpoints(run_dir / "checkpoints")
    assert saved and saved[-1].name == f"step-{status['step']:06d}", (saved, status)
    assert "Traceback" not in log, log[-3000:]


@needs_cluster
def test_scancel_signal_usr1_checkpoints_requeues_and_finishes_bit_identically(cluster):
    path, run_dir = cluster["recipe"]("usr1")
    job = submit(path)
    _wait_for_steps(job, run_dir, 5)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    info = wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = _assert_finished_like_the_straight_run(cluster, run_dir, job, info)
    assert info["Restarts"] == "1" and re.search(r"stop requested \(SIGUSR1\) at step \d+", log), log[-3000:]
    assert "requeueing (restart 1 of 2)" in log and "Traceback" not in log, log[-3000:]


@needs_cluster
def test_term_to_the_batch_shell_alone_reaches_the_trainers_and_the_job_requeues_truthfully(cluster):
    """``scancel --signal=TERM --batch``: only the batch shell gets TERM. Before, it was ignored
    while the log said "waiting for the trainers to checkpoint", and a requeue that worked could
    print "scontrol requeue failed"."""
    path, run_dir = cluster["recipe"]("batch-term")
    job = submit(path)
    _wait_for_steps(job, run_dir, 5)
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True)
    info = wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = _assert_finished_like_the_straight_run(cluster, run_dir, job, info)
    assert "batch script got SIGTERM; passed to the trainers" in log, log[-3000:]
    assert re.search(r"stop requested \(SIGTERM\) at step \d+", log) and "requeueing (restart 1 of 2)" in log, log[-3000:]
    assert "requeue failed" not in log and "Traceback" not in log, log[-3000:]


@needs_cluster
def test_usr1_one_second_into_the_job_step_requeues_and_finishes_bit_identically(cluster):
    """The signal lands while the agent and the trainers are still starting (importing torch)."""
    path, run_dir = cluster["recipe"]("early-usr1")
    job = submit(path)
    deadline = time.time() + 120
    while not subprocess.run(["squeue", "-h", "-s", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, job_info(job)
        time.sleep(0.05)  # the job step (srun) exists: its agent is starting
    time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    info = wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = _assert_finished_like_the_straight_run(cluster, run_dir, job, info)
    assert info["Restarts"] == "1" and "requeueing (restart 1 of 2)" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


@needs_cluster
def test_hang_watchdog_ends_the_run_and_the_job_requeues_and_finishes_bit_identically(cluster):
    """Rank 1 hangs in step 6 of the first run (``SHARDFORGE_HANG_AT``, only while
    ``SLURM_RESTART_COUNT`` is 0); the watchdog dumps stacks and ends the launch as ``hung``
    (exit 4), the job script requeues, the second run resumes from step 4 and ends like the
    uninterrupted job."""
    path, run_dir = cluster["recipe"]("hung", env={"SHARDFORGE_HANG_AT": "6:1", "SHARDFORGE_FAULTS_IN_RUN": "0"})
    job = submit(path, "train.step_timeout_s=15", "checkpoint.every_steps=2")
    info = wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=420)
    log = _assert_finished_like_the_straight_run(cluster, run_dir, job, info)
    assert info["Restarts"] == "1", log[-3000:]
    assert "shardforge: hung; requeueing (restart 1 of 2)" in log, log[-3000:]
    assert "resumed from" in log and "step-000004" in log, log[-3000:]
    assert (run_dir / "logs" / "hang-rank-00001.txt").exists()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
