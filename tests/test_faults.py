"""Faults: NaN/inf steps (skip and stop), the hang watchdog, run-directory permissions, fuzzed bad input.

NaNs and hangs are injected at a narrow seam in the trainer (``SHARDFORGE_NAN_AT`` multiplies
one rank's loss by NaN at one step; ``SHARDFORGE_HANG_AT`` sleeps in one rank's data phase),
because a real divergence or deadlock cannot be produced on cue.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from train.config.loading import RecipeError, load_recipe
from tests.helpers import REPO, launch_in_process, read_metrics, tiny_recipe, write_recipe
from train.checkpoint.files import committed_checkpoints


def launch(world, name: str, env: dict, umask: int = 0o022, **sections) -> tuple[subprocess.CompletedProcess, Path]:
    r = world.recipe(name, **sections)
    path = write_recipe(world.tmp / f"{name}.yaml", r)
    old_umask = os.umask(umask)  # the launcher and the trainers it starts inherit it
    try:
        proc = launch_in_process("run", str(path), env=env)
    finally:
        os.umask(old_umask)
    return proc, Path(r["run"]["dir"])


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])  # the engines that can skip (ZeRO cannot: see below)
def test_nan_skip_skips_the_step_on_every_rank_and_training_goes_on(world, engine):
    """Rank 1's loss is NaN at step 3: both ranks skip that update; the run completes; private umask kept."""
    proc, run_dir = launch(world, f"nan-skip-{engine}", {"SHARDFORGE_NAN_AT": "3:1"}, umask=0o077,
                           train={"on_nonfinite": "skip"}, checkpoint={"every_steps": 2, "at_end": True},
                           parallel={"engine": engine, "precision": "fp32", "nproc": 2})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6]
    assert [m["nonfinite_steps"] for m in records] == [0, 0, 1, 1, 1, 1]
    assert [m["skipped_steps"] for m in records] == [0, 0, 1, 1, 1, 1], "a skipped update is counted"
    skipped_lines = [line for line in proc.stdout.splitlines() if "its update was skipped" in line]
    assert skipped_lines == ["warning: step 3: non-finite loss or gradient norm on some rank; its update was skipped on every "
                             "rank (train.on_nonfinite=skip)"], proc.stdout[-3000:]
    assert all(math.isfinite(m["loss"]) for m in records), "NaN must not reach the logged mean"
    # step 3's loss is rank 0's alone: rank 1's NaN micro-batches are left out, not averaged in as 0
    assert records[2]["loss"] > 0.8 * records[1]["loss"], [m["loss"] for m in records]
    evals = [m["eval_loss"] for m in read_metrics(run_dir) if "eval_loss" in m]
    assert evals and all(math.isfinite(e) for e in evals), "weights stayed finite: the update was skipped"
    # run-directory permissions follow the umask (0o077 here): nothing readable by others
    for path in [run_dir, *run_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} has mode {oct(mode)} under umask 077"


def test_bad_data_found_by_rank_0_is_one_line_and_rank_1_does_not_claim_a_timeout(world):
    empty = world.tmp / "empty.txt"
    empty.write_text("")
    proc, run_dir = launch(world, "empty", {}, data={"sources": [{"path": str(empty)}]})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert f"rank 0: data.sources[0]: '{empty}' is empty; point it at non-empty data (exit 2)" in out, out[-3000:]
    symptom = json.loads((run_dir / "logs" / "error-rank-00001.json").read_text())
    assert symptom["kind"] == "collective" and "rank 0 ended while preparing the data" in symptom["message"]


@pytest.mark.timeout(300)  # it used to wait forever
def test_a_stale_deepspeed_build_lock_does_not_hang_the_next_run(world):
    """A job killed while DeepSpeed held torch's build baton (a plain ``lock`` file, taken even when
    nothing is rebuilt) leaves it behind; every later DeepSpeed run used to wait on it forever (the
    kill harness hit it). The ranks now load ops under an flock and clear such batons, in the build
    folder keyed by this environment (``TORCH_EXTENSIONS_DIR``/<op>/lock: torch's layout there)."""
    import fcntl

    from train.engines.deepspeed_engine import extensions_root

    root = extensions_root()
    build_dirs = [root / "deepspeed_shm_comm"]
    for build_dir in build_dirs:
        build_dir.mkdir(parents=True, exist_ok=True)
        (build_dir / "lock").touch()  # what the killed job left
    proc, _ = launch(world, "stale-baton", {}, train={"max_steps": 2},
                     parallel={"engine": "zero1", "precision": "fp32", "nproc": 2})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with open(root / "shardforge-build.lock", "a") as held:  # a DeepSpeed run of the other test worker
        fcntl.flock(held, fcntl.LOCK_EX)                     # may hold a live baton: wait for it
        assert not any((d / "lock").exists() for d in build_dirs)


def test_nan_stop_exits_without_saving_and_names_the_step(world):
    """ZeRO-2 (policy auto = stop): the NaN step ends the run; the last good checkpoint stays the latest."""
    proc, run_dir = launch(world, "nan-stop", {"SHARDFORGE_NAN_AT": "3:0"},
                           parallel={"engine": "zero2", "precision": "fp32", "nproc": 2},
                           checkpoint={"every_steps": 2, "at_end": True})
    out = proc.stdout + proc.stderr  # the launcher tees the trainers' stderr into its stdout
    assert proc.returncode == 3, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "non-finite loss or gradient norm at step 3 (batch fingerprint " in out, out[-3000:]
    assert [p.name for p in committed_checkpoints(run_dir / "checkpoints")] == ["step-000002"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "step 3" in status["reason"] and status["exit_code"] == 3, status
    assert out.strip().splitlines()[-1].startswith("shardforge: failed after step "), out[-1000:]


def test_zero_cannot_skip_nonfinite_steps(world, tmp_path):
    r = tiny_recipe(world.corpus, world.cache, tmp_path / "z", train={"on_nonfinite": "skip"},
                    parallel={"engine": "zero3", "precision": "fp32", "nproc": 2})
    with pytest.raises(RecipeError, match="train.on_nonfinite: skip needs parallel.engine ddp or fsdp"):
        load_recipe(str(write_recipe(tmp_path / "z.yaml", r)))


def test_hang_watchdog_dumps_stacks_names_the_late_rank_and_exits(world):
    proc, run_dir = launch(world, "hang", {"SHARDFORGE_HANG_AT": "4:1"},
                           train={"step_timeout_s": 4, "max_steps": 8}, checkpoint={"every_steps": 2})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-3000:]
    assert "watchdog: rank 0 spent more than 4 s in step 4 (forward-backward)" in out, out[-3000:]
    assert "ranks 1 (step 4, data) did not arrive" in out, out[-3000:]
    for rank in (0, 1):
        dump = (run_dir / "logs" / f"hang-rank-{rank:05d}.txt").read_text()
        assert "Thread" in dump or "File" in dump, dump[:500]
    late = (run_dir / "logs" / "hang-rank-00001.txt").read_text()
    assert "faulty_next_batch" in late and "step.py" in late, late  # stuck where the fault sleeps: its data phase
    assert "forward_backward" in (run_dir / "logs" / "hang-rank-00000.txt").read_text()  # waiting for rank 1
    assert json.loads((run_dir / "status.json").read_text())["state"] == "hung"
    assert [p.name for p in committed_checkpoints(run_dir / "checkpoints")] == ["step-000002"]


def test_watchdog_covers_the_first_step_with_a_warm_up_allowance(tmp_path):
    from train.loop.watchdog import Watchdog

    dog = Watchdog(tmp_path, rank=0, world=1, timeout_s=2.0)
    try:
        dog.beat(5, "data")  # the first step this launch runs (resumed at step 4)
        assert dog.limit_s == 2.0 * Watchdog.FIRST_STEP_FACTOR
        dog.beat(5, "optimizer")
        assert dog.limit_s == 2.0 * Watchdog.FIRST_STEP_FACTOR
        dog.beat(6, "data")
        assert dog.limit_s == 2.0
    finally:
        dog.close()


# ---------------------------------------------------------------- fuzzed bad input

KEYS = ["train.max_steps", "train.micro_batch_size", "train.global_batch_size", "train.log_every",
        "optim.lr", "optim.decay", "parallel.engine", "parallel.precision", "parallel.nproc",
        "data.seq_len", "data.sources.0.path", "checkpoint.keep_last", "model.config.hidden_size",
        "slurm.time", "run.name", "nonexistent.key", "train", "train.max_steps.deeper"]
VALUES = st.one_of(st.integers(-5, 10**6).map(str), st.floats(allow_nan=True).map(str),
                   st.sampled_from(["", "zero9", "fp8", "true", "null", "[1, 2]", "{a: 1}", "'x", "a b",
                                    "$(id)", "../../etc", "1e999", "-0"]),
                   st.text(max_size=12))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
def test_fuzzed_overrides_either_load_or_fail_with_named_keys(world, overrides):
    """Any override either gives a valid recipe or a RecipeError whose every line names a key: never a crash."""
    base = world.recipe("fuzz")
    path = write_recipe(world.tmp / "fuzz.yaml", base)
    args = [f"{k}={v}" for k, v in overrides]
    try:
        load_recipe(str(path), args)
    except RecipeError as err:
        lines = [line.strip(" -") for line in str(err).splitlines()[1:]] or [str(err).split(": ", 1)[1]]
        for line in lines:  # "<key>: <what is wrong and the fix>", one line each
            key, _, message = line.partition(": ")
            assert key and message and " " not in key.strip("'"), f"a problem line that names no key: {line!r}"


@settings(max_examples=40, deadline=None)
@given(doc=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
                        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                st.dictionaries(st.sampled_from(
                                                    ["run", "model", "data", "train", "parallel", "optim",
                                                     "checkpoint", "name", "config", "sources", "x"]),
                                                    inner, max_size=4)), max_leaves=12))
def test_fuzzed_recipe_documents_never_crash_the_loader(tmp_path_factory, doc):
    import yaml

    path = tmp_path_factory.mktemp("doc") / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_recipe(str(path))
    except RecipeError as err:  # refused: every problem is one line that starts with where it is
        assert str(err).startswith(f"{path}: ") and err.problems, str(err)
        assert all(problem.strip() and "\n" not in problem and "Traceback" not in problem
                   for problem in err.problems), err.problems


def test_bad_input_through_the_cli_is_one_line_and_exit_2_and_writes_nothing(world, tmp_path):
    r = tiny_recipe(world.corpus, world.cache, tmp_path / "never")
    path = write_recipe(tmp_path / "r.yaml", r)
    for args in (["train.micro_batch_size=-1"], ["parallel.engine=zero9"], ["data.seq_len=100000"],
                 ["data.sources.0.path=/nonexistent/corpus.txt"], ["nonsense"]):
        proc = subprocess.run([sys.executable, "-m", "launch", "run", str(path), *args], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("shardforge: error:"), proc.stderr
        assert not (tmp_path / "never").exists(), f"{args} left a half-written run directory"


# ---------------------------------------------------------------- disk full, random kills


def _mount_tmpfs(path: Path, size_kb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], check=True)


@pytest.fixture(scope="module")
def ckpt_size(world):
    """Bytes of one checkpoint of the tiny recipe (measured, not guessed)."""
    proc, run_dir = launch(world, "measure", {}, train={"max_steps": 2}, checkpoint={"at_end": True})
    assert proc.returncode == 0, proc.stdout[-2000:]
    ckpt = committed_checkpoints(run_dir / "checkpoints")[-1]
    return sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())


ROOT = os.geteuid() == 0


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_disk_full_keeps_the_previous_checkpoint(world, ckpt_size, policy):
    """checkpoints/ is a tmpfs with room for one checkpoint and a half, so the second save runs out
    of space (as root, like CI); without root the saves fail with an injected ENOSPC instead."""
    run_dir = world.tmp / f"full-{policy}"
    env = {} if ROOT else {"SHARDFORGE_NOSPACE_FROM": "write:4:1"}
    if ROOT:
        _mount_tmpfs(run_dir / "checkpoints", int(ckpt_size * 1.5 / 1024) + 4)
    sections = {"checkpoint": {"every_steps": 2, "at_end": True, "keep_last": 3, "on_error": policy}}
    try:
        started = time.monotonic()
        proc, _ = launch(world, f"full-{policy}", env, **sections)
        assert time.monotonic() - started < 60, "a full disk must end the run, not hang it"
        out = proc.stdout + proc.stderr
        assert [p.name for p in committed_checkpoints(run_dir / "checkpoints")] == ["step-000002"], out[-3000:]
        assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the partial save must be removed"
        assert "checkpoint step-000004 failed" in out and "MiB are free" in out and "needs about" in out, out[-3000:]
        assert "latest checkpoint is still step-000002" in out and "No space left on device" in out
        assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "failed" and status["exit_code"] == 2, status
        if policy == "stop":
            assert "step-000004" in status["reason"]
            assert max(m["step"] for m in read_metrics(run_dir)) == 4
            if ROOT:  # free the space: keep step-000002, unmount the full tmpfs
                kept = world.tmp / "kept-step-000002"
                shutil.copytree(run_dir / "checkpoints" / "step-000002", kept)
                subprocess.run(["umount", str(run_dir / "checkpoints")], check=True)
                shutil.copytree(kept, run_dir / "checkpoints" / "step-000002")
            again, _ = launch(world, f"full-{policy}", {}, **sections)
            assert again.returncode == 0 and "resumed from" in again.stdout, again.stdout[-3000:]
        else:  # training went on after step 4's failed save; the end's failed save fails the run
            assert "step-000006" in status["reason"] and "training goes on" in out
            assert max(m["step"] for m in read_metrics(run_dir)) == 6
    finally:
        if ROOT:
            subprocess.run(["umount", str(run_dir / "checkpoints")], check=False)


def test_a_full_disk_while_writing_the_manifest_fails_the_save_cleanly(world):
    """The last write of a save (rank 0's manifest, after the rename) fails: agreed by every rank,
    the uncommitted step directory removed, exit 2, the previous checkpoint intact."""
    proc, run_dir = launch(world, "full-manifest", {"SHARDFORGE_NOSPACE_FROM": "manifest:4:0"},
                           checkpoint={"every_steps": 2, "at_end": True})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "checkpoint step-000004 failed" in out and "No space left on device" in out, out[-3000:]
    assert [p.name for p in committed_checkpoints(run_dir / "checkpoints")] == ["step-000002"]
    assert not (run_dir / "checkpoints" / "step-000004").exists()


@pytest.mark.launch  # through benchmarks.kill_harness
def test_kills_at_each_compute_phase_and_of_the_whole_job_resume_bit_identically(tmp_path):
    """CI's planned version of `python -m benchmarks.kill_harness` (the long random one is in RESULTS.md)."""
    out = tmp_path / "kills.json"
    # ddp's save points are killed deterministically in test_checkpoint.py; here ZeRO-3, the most
    # involved engine, killed at each compute phase and then as a whole job (fsdp's exact resume is
    # covered in test_training.py).
    plan = "forward:1:1,backward:2:0,optimizer:3:1,job@forward:5:0"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kill_harness", "--plan", plan, "--engines",
                           "zero3", "--steps", "6", "--out", str(out)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["kills"] == 4 and result["all_bit_identical"], result
    kills = [e["kill"] for run in result["engines"][0]["runs"] for e in run["events"] if e["exit"] != 0]
    assert kills == [*plan.split(",")[:3], "whole job at forward:5:0"], kills
