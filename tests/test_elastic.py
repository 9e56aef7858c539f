"""Elastic shrink (``slurm.min_nodes``) without a cluster: the job-start step that fits a run
directory to the nodes Slurm gave (``launch.elastic``), its refusal, and ``submit``'s checks of the
node range. The job on the two-node cluster is in tests/test_slurm_nodes.py."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import yaml

from launch.elastic import main as elastic
from launch.local import write_run_dir
from launch.slurm import render_sbatch
from launch.status import standing
from tests.helpers import make_corpus, shardforge, tiny_recipe, write_recipe
from train.engines.config import engine_configs
from train.config.recipe import recipe_from_dict, resolve_defaults
from train.rundir import read_status, write_status
from train.config.typed import RecipeError

LAUNCH = "4242.1"


def run_dir_for(tmp_path: Path, nodes: int, nproc: int = 2, engine: str = "zero2", global_batch: int = 8,
                micro: int = 1) -> Path:
    """A run directory as ``submit`` writes it (recipe.yaml and the engine configs)."""
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "corpus", tmp_path / "cache", tmp_path / "run",
                                          parallel={"engine": engine, "nproc": nproc, "nodes": nodes},
                                          train={"micro_batch_size": micro, "global_batch_size": global_batch},
                                          slurm={"min_nodes": 1}))
    resolve_defaults(recipe)
    return write_run_dir(recipe, engine_configs(recipe))


def files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


@pytest.fixture(autouse=True)
def launch_id(monkeypatch):
    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", LAUNCH)  # the job script exports it before the step


def test_fewer_nodes_rewrite_recipe_and_engine_configs_keeping_the_global_batch(tmp_path, capsys, monkeypatch):
    run_dir = run_dir_for(tmp_path, nodes=2)
    recipe_before = (run_dir / "recipe.yaml").read_text()
    assert json.loads((run_dir / "deepspeed.json").read_text())["gradient_accumulation_steps"] == 2

    assert elastic([str(run_dir), "1", "--max-nodes=2"]) == 0
    line = "shardforge: starting on 1 node of 2 (world 4 → 2, accumulation 2 → 4, global batch 8 kept)"
    assert capsys.readouterr().out == line + "\n"  # "resuming" once a checkpoint is committed
    # only parallel.nodes changed in recipe.yaml; DeepSpeed's record follows it
    assert (run_dir / "recipe.yaml").read_text() == recipe_before.replace("  nodes: 2\n", "  nodes: 1\n")
    ds = json.loads((run_dir / "deepspeed.json").read_text())
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) == (8, 4, 1)
    record = json.loads((run_dir / "logs" / "resized.json").read_text())
    assert {k: record[k] for k in ("launch_id", "from_nodes", "to_nodes", "from_world", "to_world",
                                   "from_accumulation", "to_accumulation")} == {
        "launch_id": LAUNCH, "from_nodes": 2, "to_nodes": 1, "from_world": 4, "to_world": 2,
        "from_accumulation": 2, "to_accumulation": 4}

    # status.json of this launch carries it (the ranks write it), and `shardforge status` shows it
    write_status(run_dir, "running", -1)
    assert read_status(run_dir)["resized"]["line"] == line.removeprefix("shardforge: ")
    assert "starting on 1 node of 2" in standing(run_dir).note
    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", "4242.2")  # a later launch that did not resize: not carried
    write_status(run_dir, "running", -1)
    assert "resized" not in read_status(run_dir)

    # given its nodes back on a later requeue, the run grows again
    assert elastic([str(run_dir), "2", "--max-nodes=2"]) == 0
    assert "on 2 nodes of 2 (world 2 → 4, accumulation 4 → 2, global batch 8 kept)" in capsys.readouterr().out
    assert (run_dir / "recipe.yaml").read_text() == recipe_before
    assert json.loads((run_dir / "deepspeed.json").read_text())["gradient_accumulation_steps"] == 2


def test_the_planned_node_count_changes_nothing(tmp_path, capsys):
    run_dir = run_dir_for(tmp_path, nodes=2, engine="fsdp")
    before = files(run_dir)
    assert elastic([str(run_dir), "2", "--max-nodes=2"]) == 0
    assert capsys.readouterr().out == "" and files(run_dir) == before
    assert not (run_dir / "logs" / "resized.json").exists()


def test_a_global_batch_that_does_not_divide_is_refused_in_one_line_and_nothing_changes(tmp_path, capsys):
    """8 samples on 3 nodes × 2 ranks × micro 1: 6 does not divide 8. Exit 2 (the job script ends
    the job FAILED, no requeue), recipe.yaml and deepspeed.json as they were, status.json failed."""
    run_dir = run_dir_for(tmp_path, nodes=4)
    before = files(run_dir)
    assert elastic([str(run_dir), "3", "--max-nodes=4"]) == 2
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1, out
    assert out.startswith("shardforge: cannot run on 3 nodes of 4: train.global_batch_size: 8 is not divisible by "
                          "micro_batch_size × world size = 1 × 6 = 6;"), out
    assert "not requeued" in out and "slurm.min_nodes" in out
    assert files(run_dir) == {**before, "status.json": files(run_dir)["status.json"]}
    status = read_status(run_dir, LAUNCH)
    assert status["state"] == "failed" and status["exit_code"] == 2 and "1 × 6 = 6" in status["reason"]
    assert not (run_dir / "logs" / "resized.json").exists()


def test_a_live_launch_holding_the_run_directory_is_not_rewritten_under(tmp_path, capsys):
    run_dir = run_dir_for(tmp_path, nodes=2)
    (run_dir / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                   "slurm_job": None, "token": "x", "heartbeat": 1e12}))
    before = files(run_dir)
    assert elastic([str(run_dir), "1", "--max-nodes=2"]) == 2
    assert "in use by another launch" in capsys.readouterr().out and files(run_dir) == before


def _render(nodes: int, min_nodes: int, global_batch: int = 8, nproc: int = 1) -> str:
    recipe = recipe_from_dict({"run": {"name": "e"}, "model": {"config": {"model_type": "llama"}},
                               "parallel": {"engine": "fsdp", "nodes": nodes, "nproc": nproc},
                               "train": {"micro_batch_size": 2, "global_batch_size": global_batch},
                               "slurm": {"gpus_per_node": 0, "cpus_per_task": 2, "min_nodes": min_nodes}})
    return render_sbatch(recipe, Path("/runs/e"), "/py", "/code")


def test_submit_renders_a_node_range_and_the_job_start_step():
    text = _render(nodes=2, min_nodes=1)
    assert "#SBATCH --nodes=1-2\n" in text and "#SBATCH --ntasks-per-node" not in text
    assert '"$PYTHON" -m launch.elastic "$RUN_DIR" "$SLURM_NNODES" --max-nodes=2 || exit $?' in text
    # the step runs after the launch id is exported (status.json ties to it) and before srun
    assert text.index("export SHARDFORGE_LAUNCH_ID") < text.index("launch.elastic") < text.index("\nsrun ")
    for same in (_render(nodes=2, min_nodes=2), _render(nodes=1, min_nodes=1)):  # no range: no shrink
        assert "launch.elastic" not in same and "#SBATCH --ntasks-per-node=1\n" in same


@pytest.mark.parametrize("nodes,min_nodes,global_batch,lines", [
    (2, 0, 8, ["slurm.min_nodes=0: must be between 1 and parallel.nodes=2"]),
    (2, 3, 8, ["slurm.min_nodes=3: must be between 1 and parallel.nodes=2"]),
    # 2 × 1 × 3 = 6 does not divide 8; lcm(2, 4, 6, 8) = 24
    (4, 1, 8, ["slurm.min_nodes=1: on 3 nodes, train.global_batch_size 8 is not divisible by micro_batch_size × "
               "nproc × nodes = 2 × 1 × 3 = 6; set train.global_batch_size=24 (divisible on 1..4 nodes) or "
               "slurm.min_nodes=4"]),
    (5, 2, 20, ["on 3 nodes, train.global_batch_size 20 is not divisible by micro_batch_size × nproc × nodes = "
                "2 × 1 × 3 = 6", "on 4 nodes, train.global_batch_size 20 is not divisible by micro_batch_size × "
                "nproc × nodes = 2 × 1 × 4 = 8; set slurm.min_nodes=5"]),  # lcm 120 > 4 × 20: no batch offered
])
def test_submit_refuses_a_node_range_it_cannot_keep_the_global_batch_on(nodes, min_nodes, global_batch, lines):
    with pytest.raises(RecipeError) as err:
        _render(nodes, min_nodes, global_batch)
    assert len(err.value.problems) == len(lines), err.value.problems
    for problem, fragment in zip(err.value.problems, lines):
        assert fragment in problem, problem


def test_shardforge_submit_refuses_before_writing_anything(tmp_path):
    make_corpus(tmp_path / "corpus", files=2, words_per_file=200)
    recipe = tiny_recipe(tmp_path / "corpus", tmp_path / "cache", tmp_path / "run",
                         parallel={"engine": "ddp", "nproc": 1, "nodes": 4},
                         slurm={"gpus_per_node": 0, "cpus_per_task": 2, "min_nodes": 1})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = shardforge("submit", str(path), env={"SLURM_CONF": str(tmp_path / "none")})  # no job if it were not
    assert proc.returncode == 2 and not (tmp_path / "run").exists(), (proc.stdout, proc.stderr)
    assert "on 3 nodes, train.global_batch_size 8 is not divisible" in proc.stderr and "Traceback" not in proc.stderr
    assert yaml.safe_load(path.read_text())["slurm"]["min_nodes"] == 1


def test_settings_auto_chose_are_chosen_again_for_the_nodes_slurm_gave(tmp_path, capsys):
    """recipe.yaml as `submit` writes it with ``train.micro_batch_size: auto`` (chose 2 of the 16 per
    step on 2 × 4 ranks): on one node the micro-batch doubles and the line says so; a config
    left from a resize that died between its renames is mended on the next start."""
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "corpus", tmp_path / "cache", tmp_path / "run",
                                          parallel={"engine": "ddp", "nproc": 4, "nodes": 2, "gpu_mem_gb": 80,
                                                    "fitted": ["train.micro_batch_size"]},
                                          train={"micro_batch_size": 2, "global_batch_size": 16},
                                          slurm={"min_nodes": 1}))
    resolve_defaults(recipe)
    run_dir = write_run_dir(recipe, engine_configs(recipe))
    assert elastic([str(run_dir), "1", "--max-nodes=2"]) == 0
    assert capsys.readouterr().out == ("shardforge: starting on 1 node of 2 (world 8 → 4, accumulation 1 → 1, "
                                       "train.micro_batch_size 2 → 4, global batch 16 kept)\n")
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["train"]["micro_batch_size"] == 4 and saved["parallel"]["fitted"] == ["train.micro_batch_size"]

    zero = run_dir_for(tmp_path / "z", nodes=2)
    stale = (zero / "deepspeed.json").read_text()
    assert elastic([str(zero), "1", "--max-nodes=2"]) == 0
    (zero / "deepspeed.json").write_text(stale)  # the rename of recipe.yaml happened, this one did not
    assert elastic([str(zero), "1", "--max-nodes=2"]) == 0
    assert json.loads((zero / "deepspeed.json").read_text())["gradient_accumulation_steps"] == 4


def test_submit_checks_the_memory_plan_on_every_node_count_the_job_may_get(tmp_path):
    """A 7B FSDP job on 4 × 8 GPUs of 50 GB fits; on 1 node each GPU holds 4× the sharded state and
    it does not: `submit` says so before the job can come back on one node and fail there."""
    from launch.elastic import shrink_problems
    from train.config.loading import load_recipe

    def recipe(gpu_gb: int):
        return load_recipe("llama-7b-fsdp", [f"run.dir={tmp_path / 'job'}", "slurm.min_nodes=1",
                                             f"parallel.gpu_mem_gb={gpu_gb}"], for_slurm=True)

    (problem,) = shrink_problems(recipe(50), tmp_path / "job")  # 2 nodes fit 50 GB; 3 do not divide the batch
    assert problem.startswith("slurm.min_nodes=1: on 1 node, memory: fsdp, micro-batch 2, selective checkpointing "
                              "needs 45.0 GB per GPU") and "more than 90% of the GPU's 50 GB" in problem
    assert shrink_problems(recipe(60), tmp_path / "job") == []


def test_a_fitted_micro_batch_needs_only_the_ranks_to_divide_the_global_batch(tmp_path):
    """96 samples on 4 ranks per node, nodes 2..4, micro-batch 6 chosen by auto for 4 nodes: on 3
    nodes a fixed 6 would not divide (6 × 4 × 3 = 72), but auto chooses again there (8, 4, 2 or 1)."""
    def problems(fitted: list) -> list:
        r = tiny_recipe(tmp_path / "corpus", tmp_path / "cache", tmp_path / "run",
                        parallel={"engine": "ddp", "nproc": 4, "nodes": 4, "fitted": fitted},
                        train={"micro_batch_size": 6, "global_batch_size": 96}, slurm={"min_nodes": 2})
        recipe = resolve_defaults(recipe_from_dict(r))
        try:
            render_sbatch(recipe, tmp_path / "run", "python", ".")
        except RecipeError as err:
            return err.problems
        return []

    assert problems(["train.micro_batch_size"]) == []
    (problem,) = problems([])
    assert "on 3 nodes, train.global_batch_size 96 is not divisible by micro_batch_size × nproc × nodes = " \
           "6 × 4 × 3 = 72" in problem


def test_ranks_wait_for_rank0s_universal_conversion_past_the_process_group_timeout(tmp_path, monkeypatch):
    """A ZeRO run resumed on another world size: rank 0 converts the checkpoint to DeepSpeed's
    universal format while the others wait. The wait is a barrier of a gloo group made with
    CONVERSION_TIMEOUT_S, not the default group's 30 minutes. torch.distributed and DeepSpeed's
    engine are fakes at the narrowest seam (a real 70B conversion cannot run here); the 1↔2-rank
    resumes of tests/test_training.py run the real path."""
    from datetime import timedelta
    from types import SimpleNamespace

    import train.engines.deepspeed_engine as ds_engine

    calls = []
    fake_dist = SimpleNamespace(
        get_world_size=lambda: 2, get_rank=lambda: 0,
        new_group=lambda backend, timeout: calls.append(("new_group", backend, timeout)) or "waiting",
        barrier=lambda group=None: calls.append(("barrier", group)),
        destroy_process_group=lambda group: calls.append(("destroy", group)))
    monkeypatch.setattr(ds_engine, "dist", fake_dist)
    monkeypatch.setattr(ds_engine, "to_universal", lambda d, tag, out: calls.append(("convert", tag, out)))
    engine = object.__new__(ds_engine.DeepSpeedEngine)
    engine.engine = SimpleNamespace(
        optimizer=SimpleNamespace(param_groups=[{"weight_decay": 0.1}]), _config=SimpleNamespace(),
        load_checkpoint=lambda path, tag, **_: calls.append(("load", tag)) or (path, None))
    engine.load(tmp_path, saved_world_size=1)
    assert calls == [("new_group", "gloo", timedelta(seconds=ds_engine.CONVERSION_TIMEOUT_S)),
                     ("convert", "state", "state_universal"), ("barrier", "waiting"), ("destroy", "waiting"),
                     ("load", "state_universal")]
    assert ds_engine.CONVERSION_TIMEOUT_S > 1800  # longer than the process group's own
