"""How a run reads (``launch/status.py``): ``shardforge status`` on hand-made run directories (live,
dead, starting, failed, epochs), the bounded read of ``metrics.jsonl``'s tail, and the summary a
completed run prints. The same on real run directories: ``tests/test_metrics.py``."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from launch.cli import main as cli
from launch.runlock import LOCK_FILE, STALE_S
from launch.status import duration, end_lines, run_dirs, standing, status_table, tail_records
from train.rundir import write_status

NEVER_A_PID = 2**22 + 1
"""Above Linux's PID_MAX_LIMIT: no process ever has it, so a lock naming it on this host is dead."""


def _run_dir(root: Path, name: str = "run", max_steps: int = 100, metric: str = "loss", **train) -> Path:
    run_dir = root / name
    (run_dir / "logs").mkdir(parents=True)
    recipe = {"task": "causal_lm", "train": {"max_steps": max_steps, "global_batch_size": 8, "epochs": 0, **train},
              "eval": {"metric": metric}}
    (run_dir / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    return run_dir


def _lock(run_dir: Path, **holder) -> None:
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": None,
                                                 "token": "t", "heartbeat": time.time(), **holder}))


def _metrics(run_dir: Path, records: list[dict], torn: str = "") -> None:
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def _status(run_dir: Path, monkeypatch, state: str, step: int, **kwargs) -> None:
    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", "hand-made")
    write_status(run_dir, state, step, **kwargs)


def test_a_live_run_shows_its_progress_and_an_eta_from_this_launchs_pace(tmp_path, monkeypatch):
    run_dir = _run_dir(tmp_path)
    started = 1000.0
    _status(run_dir, monkeypatch, "running", 20, started=started)  # resumed at step 20
    old = [{"step": s, "time": 500.0 + s, "loss": 9.0} for s in (10, 20)]  # the previous launch: 1 s/step
    mine = [{"step": s, "time": started + 0.5 * (s - 20), "loss": 5.0 - s / 100, "step_time_s": 0.4}
            for s in range(25, 65, 5)]  # 0.5 s/step, with evaluations and logging
    evals = [{"step": 40, "time": started + 10.1, "eval_loss": 4.75}]
    _metrics(run_dir, old + mine[:4] + evals + mine[4:], torn='{"step": 65, "ti')  # being written
    _lock(run_dir)
    now = mine[-1]["time"] + 2.0
    s = standing(run_dir, now=now)
    assert (s.state, s.step, s.max_steps, s.loss, s.eval) == ("running", 60, 100, 4.4, "loss 4.7500 @40")
    assert s.eta_s == pytest.approx(40 * 0.5 - 2.0), "40 steps left at 0.5 s/step, 2 s of them gone"
    assert s.note == "0.5 s/step, last logged 2.0 s ago"

    _lock(run_dir, host="elsewhere", pid=1)  # held from another host: its fresh heartbeat says it lives
    assert standing(run_dir, now=now).state == "running"


@pytest.mark.parametrize("holder, why", [
    ({"pid": NEVER_A_PID}, f"pid {NEVER_A_PID} on {socket.gethostname()}) is gone"),      # kill -9
    ({"host": "elsewhere", "pid": 1, "heartbeat_age": STALE_S + 60}, "no heartbeat for 2 min"),  # host died
    (None, "no launch holds it (no lock.json)"),
])
def test_a_running_status_whose_launch_is_gone_is_dead(tmp_path, monkeypatch, holder, why):
    run_dir = _run_dir(tmp_path)
    _status(run_dir, monkeypatch, "running", 0, started=1000.0)
    _metrics(run_dir, [{"step": 30, "time": 1010.0, "loss": 4.0}])
    if holder is not None:  # a heartbeat's age counts from now, not from when the tests were collected
        holder = dict(holder)
        age = holder.pop("heartbeat_age", None)
        _lock(run_dir, **holder, **({"heartbeat": time.time() - age} if age is not None else {}))
    s = standing(run_dir)
    assert (s.state, s.step, s.eta_s) == ("dead", 30, None)
    assert why in s.note and s.note.endswith("run the same command again to resume"), s.note


def test_ended_and_starting_runs(tmp_path, monkeypatch):
    run_dir = _run_dir(tmp_path, metric="accuracy")
    _metrics(run_dir, [{"step": 50, "time": 1.0, "loss": 0.5}, {"step": 50, "time": 1.0, "eval_loss": 0.6,
                                                                 "eval_accuracy": 0.8}])
    _status(run_dir, monkeypatch, "failed", 41, reason="RuntimeError: boom", rank=3, exit_code=1)
    s = standing(run_dir)
    assert (s.state, s.step, s.eval) == ("failed", 41, "accuracy 0.8000 @50")
    assert s.note == "failed after step 41: rank 3: RuntimeError: boom (exit 1)"
    _status(run_dir, monkeypatch, "stopped", 50, reason="SIGTERM; saved step-000050")
    assert standing(run_dir).note.startswith("stopped at step 50 (SIGTERM; saved step-000050); run the same command")
    _status(run_dir, monkeypatch, "completed", 50,
            summary={"tokens": 1, "best": {"metric": "accuracy", "value": 0.81, "step": 40}})
    s = standing(run_dir, now=time.time() + 3 * 3600)
    assert s.state == "completed" and s.note.startswith("best accuracy 0.8100 at step 40; ended 3 h 00 min ago")
    _lock(run_dir)  # the next launch holds it before its ranks write status.json
    assert standing(run_dir).state == "starting"
    assert standing(_run_dir(tmp_path, "never")).state == "new"


def test_under_epochs_the_step_count_comes_from_the_logged_epoch(tmp_path, monkeypatch):
    # 2.5 epochs of 1000 samples / 8 per step = 125 steps per epoch → 313 steps (train.config.recipe.resolve_epochs)
    run_dir = _run_dir(tmp_path, max_steps=100, epochs=2.5)
    _metrics(run_dir, [{"step": 10, "time": 1.0, "loss": 1.0, "epoch": 10 * 8 / 1000}])
    _status(run_dir, monkeypatch, "running", 0, started=0.0)
    _lock(run_dir)
    assert standing(run_dir).max_steps == 313


def test_the_tail_of_metrics_jsonl_is_read_not_the_whole_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _metrics(tmp_path, [{"step": 0, "eval_loss": 1.0}] + [{"step": i, "loss": 2.0, "pad": "x" * 100}
                                                          for i in range(1, 1001)])
    assert path.stat().st_size > 100_000
    seen = tail_records(path, lambda records: any("eval_loss" in r for r in records), first=1000, limit=16_000)
    assert seen and 0 < len(seen) <= 16_000 // 100 and "eval_loss" not in seen[0], "stopped at the limit"
    assert seen[-1]["step"] == 1000 and all(seen[i]["step"] + 1 == seen[i + 1]["step"] for i in range(len(seen) - 1))
    whole = tail_records(path, lambda records: any("eval_loss" in r for r in records), first=1000,
                         limit=path.stat().st_size * 4)
    assert whole[0] == {"step": 0, "eval_loss": 1.0} and len(whole) == 1001, "grows until found"
    assert tail_records(tmp_path / "none.jsonl", lambda r: True) == []


def test_shardforge_status_lists_runs_and_refuses_bad_paths(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    a, b = _run_dir(runs, "a"), _run_dir(runs, "b")
    (runs / "not-a-run").mkdir()
    _status(a, monkeypatch, "completed", 100)
    _status(b, monkeypatch, "running", 5, started=1.0)
    monkeypatch.chdir(tmp_path)
    assert cli(["status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["RUN", "STATE", "STEP", "LOSS", "EVAL", "ETA", "NOTE"]
    assert [line.split()[:3] for line in out[1:]] == [["runs/a", "completed", "100/100"], ["runs/b", "dead", "5/100"]]
    assert run_dirs(["runs"]) == [Path("runs/a"), Path("runs/b")], "a folder of runs stands for them"
    for argv, message in ((["status", "runs/nope"], "runs/nope: no such directory; give a run directory"),
                          (["status", "runs/not-a-run"], "runs/not-a-run: not a run directory (no recipe.yaml")):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"shardforge: error: {message}") and err.count("\n") == 1, err
    monkeypatch.chdir(runs)
    assert cli(["status"]) == 2
    assert f"runs: no such directory in {runs}; give the run directories" in capsys.readouterr().err


def test_the_end_summary_names_the_checkpoint_export_picks(tmp_path, monkeypatch):
    run_dir = _run_dir(tmp_path, metric="accuracy", max_steps=30)
    (run_dir / "recipe.yaml").write_text(json.dumps({"task": "sequence_classification", "train": {"max_steps": 30},
                                                     "eval": {"metric": "accuracy"}}))
    for step in (20, 30):
        (run_dir / "checkpoints" / f"step-0000{step}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step-0000{step}" / "manifest.json").write_text("{}")
    (run_dir / "checkpoints" / "best.json").write_text(json.dumps({"step": 20, "checkpoint": "step-000020"}))
    (run_dir / "test_results.json").write_text(json.dumps(
        {"step": 30, "checkpoint": "step-000020 (best accuracy)", "samples": 268,
         "metrics": {"loss": 1.25, "accuracy": 0.875, "macro_f1": 0.5, "f1/hamlet": 0.1, "micro_f1": 0.875}}))
    _status(run_dir, monkeypatch, "completed", 30, started=1000.0,
            summary={"tokens": 123456, "best": {"metric": "accuracy", "value": 0.9, "step": 20}})
    status = json.loads((run_dir / "status.json").read_text())
    lines = end_lines(run_dir, {**status, "time": 1100.0}, launched=990.0)
    assert lines == [
        "duration    1 min 50 s for this launch (1 min 40 s training loop)",
        "trained     30 steps, 123,456 tokens",
        "best eval   accuracy 0.9000 at step 20",
        f"test        accuracy 0.8750, loss 1.2500, macro_f1 0.5000, micro_f1 0.8750 (268 samples, "
        f"step-000020 (best accuracy); {run_dir / 'test_results.md'})",
        f"checkpoint  {run_dir}/checkpoints/step-000030 (last); best: {run_dir}/checkpoints/step-000020",
        f"export      shardforge export {run_dir} {run_dir}/export   # the best; --step 30 for the last"]
    (run_dir / "export").mkdir()  # exported already: another name, not an error
    assert end_lines(run_dir, status)[-1].startswith(f"export      shardforge export {run_dir} "
                                                     f"{run_dir}/export-step-000020   #")
    (run_dir / "checkpoints" / "step-000030" / "manifest.json").unlink()
    assert end_lines(run_dir, status)[-2:] == [f"checkpoint  {run_dir}/checkpoints/step-000020",
                                               f"export      shardforge export {run_dir} {run_dir}/export-step-000020"]
    (run_dir / "checkpoints" / "step-000020" / "manifest.json").unlink()
    assert end_lines(run_dir, {**status, "step": 29})[-1].startswith("checkpoint  none committed"), \
        "no checkpoint: no export; and test results of another step are not this run's"
    assert not any(line.startswith("test") for line in end_lines(run_dir, {**status, "step": 29}))


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (4.25, 41, 184, 7500, 3 * 86400 + 7 * 3600)] == \
        ["4.2 s", "41 s", "3 min 04 s", "2 h 05 min", "3 d 07 h"]


def test_status_table_pads_all_but_the_note():
    from launch.status import Standing

    table = status_table([Standing(Path("runs/x"), "running", 5, 10, 1.5, None, 61.0, "a note"),
                          Standing(Path("runs/long-name"), "new", None, None, None, None, None, "")])
    assert table.splitlines() == [
        "RUN             STATE    STEP  LOSS    EVAL  ETA         NOTE",
        "runs/x          running  5/10  1.5000  -     1 min 01 s  a note",
        "runs/long-name  new      -     -       -     -"]
