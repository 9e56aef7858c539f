"""``shardforge submit RECIPE --prepare``: the array job script (golden file) and a real 2-task array
on the local Slurm whose cache equals a one-process prepare, token for token."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from train.config.loading import RecipeError
from launch.slurm import job_dependency, render_prepare_sbatch, render_sbatch
from tests.helpers import launch_in_process, make_corpus, tiny_recipe, write_recipe
from train.config.recipe import recipe_from_dict

GOLDEN = Path(__file__).parent / "golden"
PYTHON, CODE = "/opt/shardforge/.venv/bin/python", "/opt/shardforge"
CASE = {"run": {"name": "corpus-2t"}, "model": {"config": {"model_type": "llama"}},
        "parallel": {"engine": "fsdp", "nodes": 8},
        "slurm": {"gpus_per_node": 8, "cpus_per_task": 64, "partition": "cpu", "account": "llm-team",
                  "time": "04:00:00", "mem": "200G", "extra_sbatch": ["--constraint=ib"],
                  "env": {"HF_DATASETS_OFFLINE": "1", "NOTE": "it's $HOME"}}}


def test_prepare_array_script_matches_golden_file():
    recipe = recipe_from_dict(CASE)
    text = render_prepare_sbatch(recipe, Path("/lustre/proj/runs/corpus-2t"), PYTHON, CODE, 16)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, "not valid bash"
    name = "slurm-prepare-16.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(text)
        pytest.skip(f"regenerated tests/golden/{name}: review it with git diff, then run without UPDATE_GOLDEN")
    assert text == (GOLDEN / name).read_text(), "regenerate with UPDATE_GOLDEN=1 if the change is intended"


def test_prepare_refuses_bad_task_counts_and_the_training_job_can_wait_for_it():
    recipe = recipe_from_dict(CASE)
    with pytest.raises(RecipeError, match="--tasks 0: give 1 to 1000 tasks"):
        render_prepare_sbatch(recipe, Path("/runs/x"), PYTHON, CODE, 0)
    recipe.parallel.nproc = 8
    text = render_sbatch(recipe, Path("/runs/x"), PYTHON, CODE, job_dependency("4242"))
    assert "#SBATCH --constraint=ib\n#SBATCH --dependency=afterok:4242\n" in text
    with pytest.raises(RecipeError, match="'42x' is not a Slurm job id"):
        job_dependency("42x")


# ---------------------------------------------------------------- a real Slurm on localhost


def _cluster_up() -> bool:
    return shutil.which("sbatch") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


needs_cluster = pytest.mark.skipif(os.environ.get("SHARDFORGE_REQUIRE_SLURM") != "1" and not _cluster_up(),
                                   reason="no local Slurm (run `bash slurm/local-cluster.sh start`)")


def _wait_for_array(job: str, timeout: float = 300) -> list[str]:
    """The states of the array's tasks once none is pending or running."""
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, f"prepare job {job} still queued or running after {timeout} s"
        time.sleep(0.5)
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return re.findall(r"JobState=(\w+)", out)


@needs_cluster
def test_two_array_tasks_prepare_the_cache_one_process_prepares(tmp_path):
    from train.data.prepare import prepare_data

    corpus = make_corpus(tmp_path / "corpus", files=6, words_per_file=3000)
    recipe = tiny_recipe(corpus, tmp_path / "cache", tmp_path / "run",
                         slurm={"gpus_per_node": 0, "cpus_per_task": 1, "mem": "0", "time": "10"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = launch_in_process("submit", str(path), "--prepare", "--tasks", "2")
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"submitted prepare job (\d+) \(2 tasks\)", proc.stdout).group(1)
    assert f"--after {job}" in proc.stdout
    states = _wait_for_array(job)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "run" / "logs").glob(f"prepare-{job}_*.out")))
    assert states == ["COMPLETED", "COMPLETED"], logs[-3000:]
    assert logs.count("data: joining the shards of") == 1 and "Traceback" not in logs, logs[-3000:]
    assert not list((tmp_path / "cache").glob("*.shards")), "the shards go once the cache is written"

    recipe_obj = recipe_from_dict(recipe)
    arrayed = prepare_data(recipe_obj)
    assert arrayed.stats["cache_hit"]
    (tmp_path / "one").mkdir()
    shutil.copytree(tmp_path / "cache" / "tokenizers", tmp_path / "one" / "tokenizers")
    recipe_obj.data.cache_dir = str(tmp_path / "one")
    one = prepare_data(recipe_obj)
    assert one.key == arrayed.key and not one.stats["cache_hit"]
    for a, b in ((one.train, arrayed.train), (one.val, arrayed.val)):
        assert np.array_equal(np.asarray(a.table.column("input_ids").to_pylist()),
                              np.asarray(b.table.column("input_ids").to_pylist()))
    drop = ("seconds", "cache_hit")
    assert {k: v for k, v in one.stats.items() if k not in drop} == \
        {k: v for k, v in arrayed.stats.items() if k not in drop}
