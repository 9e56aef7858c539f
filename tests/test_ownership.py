"""A user's files are never ours to touch (issue 35): a run directory is a folder shardforge made,
never a user's folder or a part of another run; step links are not followed; pruned checkpoints
are gone when a run ends; a project's own ``train.py`` and ``launch.py`` do not take over.

The refusals come before anything is launched (exit 2, the folder untouched); the launches start
from a user's project folder through the installed ``shardforge`` script, as users run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import main as cli_main
from launch.export import ExportError, export
from launch.ownership import mark, run_dir_problems
from tests.helpers import REPO, make_corpus, read_metrics, tiny_recipe, write_recipe


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(capsys, *argv: str) -> str:
    assert cli_main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardforge: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    corpus = make_corpus(tmp_path / "corpus", files=2, words_per_file=400)
    return write_recipe(tmp_path / "tiny.yaml", tiny_recipe(corpus, tmp_path / "cache", tmp_path / "runs" / "t"))


def test_a_users_folder_is_never_adopted_as_a_run_directory(tmp_path, recipe_file, capsys):
    users = tmp_path / "my-experiments"
    (users / "checkpoints" / "step-000002").mkdir(parents=True)
    (users / "checkpoints" / "step-000002" / "weights.bin").write_bytes(b"\x00" * 64)
    (users / "checkpoints" / ".tmp-mine").mkdir()
    (users / "metrics.jsonl").write_text('{"mine": 1}\n')
    (users / "logs").mkdir()
    before = _tree(users)
    for command in ("run", "submit"):
        err = _refused(capsys, command, str(recipe_file), f"run.dir={users}", "train.max_steps=2")
        assert f"run.dir: {users} is a folder shardforge did not make (it holds checkpoints/, logs/, " \
               f"metrics.jsonl); a run directory's checkpoints and logs are pruned and rewritten" in err, err
    assert _tree(users) == before and sorted(p.name for p in users.iterdir()) == ["checkpoints", "logs",
                                                                                 "metrics.jsonl"]
    assert run_dir_problems(tmp_path / "new") == [] and run_dir_problems(tmp_path / "corpus" / "..") != []
    (tmp_path / "empty").mkdir()
    assert run_dir_problems(tmp_path / "empty") == [], "an empty folder is adopted"
    (tmp_path / "scratch").mkdir()
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "checkpoints").symlink_to(tmp_path / "scratch")
    assert run_dir_problems(tmp_path / "prepared") == [], "so is one holding only an empty checkpoints/ (a mount)"
    (tmp_path / "scratch" / "x").write_text("")
    assert run_dir_problems(tmp_path / "prepared") != []
    starting = tmp_path / "starting"  # what the nodes of a launch write before the marker lands
    (starting / "logs").mkdir(parents=True)
    for name in ("lock.json", ".lock.json.1234.tmp", "logs/launch.log", "logs/launch-node1.log"):
        (starting / name).write_text("")
    assert run_dir_problems(starting) == [], "another node of the same launch got there first"
    (starting / "logs" / "notes.txt").write_text("mine")
    assert run_dir_problems(starting) != []
    legacy = tmp_path / "made-before-the-marker"  # what an older shardforge left: adopted as a run
    (legacy / "logs").mkdir(parents=True)
    (legacy / "recipe.yaml").write_text("task: causal_lm\n")
    (legacy / "logs" / "launch.log").write_text("shardforge: completed at step 2\n")
    assert run_dir_problems(legacy) == []


def test_a_run_directory_inside_another_run_or_a_checkpoint_is_refused(tmp_path, recipe_file, capsys):
    run = tmp_path / "runs" / "a"
    step = run / "checkpoints" / "step-000006"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{}")
    (run / "recipe.yaml").write_text(recipe_file.read_text())
    mark(run)
    before = _tree(run)
    for inside, what in ((step / "sub", f"the checkpoint {step}"), (run / "nested", f"the run directory {run}")):
        err = _refused(capsys, "run", str(recipe_file), f"run.dir={inside}")
        assert f"run.dir: {inside} is inside {what}; writing there would change another run's files" in err, err
    assert _tree(run) == before and not (step / "sub").exists() and not (run / "nested").exists()
    with pytest.raises(ExportError, match="a run's checkpoints; an export there would be read as part of them"):
        export(run, run / "checkpoints" / "exported")


def test_from_a_users_project_folder_links_and_pruning(tmp_path):
    """The project holds its own train.py and launch.py; run.dir is relative, next to them. A
    linked step directory is neither pruned through nor written through, and the run ends with
    nothing half deleted."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("train.py", "launch.py"):
        (project / name).write_text(f"open({str(tmp_path / (name + '.ran'))!r}, 'w').write('ran')\n")
    corpus = make_corpus(tmp_path / "corpus", files=2, words_per_file=1200)
    recipe = tiny_recipe(corpus, tmp_path / "cache", Path("runs/t"), train={"max_steps": 4},
                         checkpoint={"every_steps": 2, "keep_last": 1, "at_end": True})
    write_recipe(project / "recipe.yaml", recipe)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    script = str(Path(sys.executable).parent / "shardforge")

    def _cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([script, *args], cwd=project, env=env, capture_output=True, text=True, timeout=600)

    first = _cli("run", "recipe.yaml")
    assert first.returncode == 0 and "shardforge: completed at step 4" in first.stdout, first.stdout + first.stderr
    assert not list(tmp_path.glob("*.ran")), "the project's own train.py / launch.py ran"
    run_dir = project / "runs" / "t"
    assert (run_dir / ".shardforge-run").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000004"], \
        "pruned checkpoints are deleted before the run ends"

    outside = tmp_path / "elsewhere"
    for step in ("step-000002", "step-000006"):  # one older than the resume point, one it will save
        (outside / step).mkdir(parents=True)
        (outside / step / "manifest.json").write_text(json.dumps({"step": 2, "files": {}}))
        (run_dir / "checkpoints" / step).symlink_to(outside / step)
    before = _tree(outside)
    again = _cli("run", "recipe.yaml", "train.max_steps=8")
    assert again.returncode == 0 and "shardforge: completed at step 8" in again.stdout, again.stdout + again.stderr
    assert _tree(outside) == before, "nothing was pruned or written through a link"
    log = (run_dir / "logs" / "launch.log").read_text()
    assert "checkpoint: ignoring 2 symbolic link(s) among the step directories of" in log and \
        f"step-000002 -> {outside / 'step-000002'}" in log, log[-3000:]
    assert f"checkpoints/step-000006 was a symbolic link to {outside / 'step-000006'}; replaced the link" in log
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000008"]
    assert (run_dir / "checkpoints" / "step-000002").is_symlink() and not (run_dir / "checkpoints" / "step-000006").exists()
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == list(range(1, 9))
    refused = _cli("export", "runs/t", "out", "--step", "2")
    assert refused.returncode == 2 and "is a symbolic link; export reads no checkpoint through a link" in refused.stderr


def test_resuming_with_another_checkpoint_format_or_a_replaced_recipe_is_one_line(tmp_path, recipe_file):
    """Before, the ranks died on a missing dcp/.metadata (a ZeRO-2 run resumed with ddp), and a
    recipe.yaml replaced by a YAML list skipped the changed-recipe check."""
    from train.config.resume import check_resumable
    from train.config.loading import load_recipe, recipe_yaml

    run_dir = tmp_path / "runs" / "t"
    (run_dir / "checkpoints" / "step-000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000002" / "manifest.json").write_text('{"engine": "zero2", "world_size": 2}')
    zero2 = load_recipe(str(recipe_file), ["parallel.engine=zero2"], check_model=False)
    (run_dir / "recipe.yaml").write_text(recipe_yaml(zero2))
    assert check_resumable(zero2, run_dir) == []
    assert check_resumable(load_recipe(str(recipe_file), ["parallel.engine=zero1"], check_model=False), run_dir) == []
    (problem,) = check_resumable(load_recipe(str(recipe_file), ["parallel.engine=zero3"], check_model=False), run_dir)
    assert "written by 'zero2' (ZeRO-2's layout, which ZeRO-3 cannot load); resume with parallel.engine=zero2" in problem
    ddp = load_recipe(str(recipe_file), ["parallel.engine=ddp"], check_model=False)
    (problem,) = check_resumable(ddp, run_dir)
    assert problem == (f"parallel.engine: 'ddp' here, but the checkpoints in {run_dir} were written by 'zero2' "
                       f"(deepspeed format, which 'ddp' cannot read); resume with parallel.engine=zero2, or start "
                       f"over with checkpoint.resume=never or another run.dir")
    (run_dir / "recipe.yaml").write_text("- a\n- list\n")
    (problem,) = check_resumable(ddp, run_dir)
    assert problem.startswith(f"{run_dir / 'recipe.yaml'}: holds a YAML list, not the recipe its checkpoints"), problem
    # the ranks refuse it too when the launcher's check is skipped (checkpoint.resume=PATH of another run)
    from train.checkpoint.manager import CheckpointError, Checkpointer

    ranks = Checkpointer(run_dir / "checkpoints", None, {}, 0, 1, meta={"engine": "ddp"})
    with pytest.raises(CheckpointError, match=r"^resume: step-000002 was written by parallel.engine=zero2 \(deepspeed "
                                              r"format, which 'ddp' cannot read\); resume with"):
        ranks.load(run_dir / "checkpoints" / "step-000002")


def test_a_lock_file_that_is_no_record_is_reported_as_such_and_taken_over_only_when_stale(tmp_path):
    """A garbage lock.json was reported as a live holder "pid ? on ?"."""
    from launch.runlock import STALE_S, RunLock, RunLocked

    (tmp_path / "lock.json").write_text("[not, a, record")
    with pytest.raises(RunLocked) as err:
        RunLock(tmp_path).check()
    assert str(err.value).startswith(f"{tmp_path / 'lock.json'}: unreadable (not a lock record; written 0 s ago)") \
        and "pid ?" not in str(err.value), str(err.value)
    old = time.time() - STALE_S - 5
    os.utime(tmp_path / "lock.json", (old, old))
    RunLock(tmp_path).check()  # stale: a launch may take it over
    (tmp_path / "lock.json").write_text('["a list"]')
    assert RunLock(tmp_path).holder()["unreadable"] is True
