"""One live launch per run directory (``launch/runlock.py``): a second ``shardforge run`` is refused
with exit 2 before it writes anything; a lock whose holder is gone is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.runlock import LOCK_FILE, STALE_S, RunLock, RunLocked
from tests.helpers import REPO, make_corpus, read_metrics, shardforge, tiny_recipe, write_recipe


def _lock_file(run_dir: Path, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                 "slurm_job": None, "token": "other", "heartbeat": time.time(),
                                                 **holder}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("holder, taken", [
    ({}, False),                                               # a live process on this host
    ({"pid": "dead"}, True),                                   # kill -9: the pid is gone
    ({"host": "elsewhere", "pid": 1}, False),                  # another host, heartbeat fresh
    ({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - STALE_S - 5}, True),  # that host died
    ({"host": "elsewhere", "pid": 1, "slurm_job": "77"}, True),  # this job, requeued
])
def test_a_lock_is_taken_over_only_when_its_holder_is_gone(tmp_path, monkeypatch, holder, taken):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    if holder.get("pid") == "dead":
        holder["pid"] = _dead_pid()
    _lock_file(tmp_path, **holder)
    lock = RunLock(tmp_path)
    if taken:
        with lock:
            assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.me["token"]
        assert not (tmp_path / LOCK_FILE).exists(), "released on exit"
    else:
        with pytest.raises(RunLocked, match=r"in use by another launch \(pid"):
            lock.acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "other", "the holder's lock is kept"


def test_a_second_launch_on_a_live_run_dir_is_refused_and_changes_nothing(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus, tmp_path / "cache", run_dir,
                                                           checkpoint={"every_steps": 2, "at_end": True}))
    cue = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SHARDFORGE_PAUSE_AT": "forward:3",
           "SHARDFORGE_PAUSE_FILE": str(cue)}
    first = subprocess.Popen([sys.executable, "-m", "launch", "run", str(recipe)], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not cue.exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.1)
        before = {p: (run_dir / p).read_bytes() for p in ("recipe.yaml", "metrics.jsonl")}
        second = shardforge("run", str(recipe), "train.max_steps=99", "run.seed=7")
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by another launch (pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr, second.stderr
        assert {p: (run_dir / p).read_bytes() for p in before} == before, "the refused launch wrote nothing"
        first.send_signal(signal.SIGUSR1)  # the paused rank goes on; the run stops with a checkpoint
        assert first.wait(timeout=300) == 75, first.stdout.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert not (run_dir / LOCK_FILE).exists()
    third = shardforge("run", str(recipe))  # the lock died with its launch: this one resumes
    assert third.returncode == 0 and "resumed from" in third.stdout, third.stdout[-3000:] + third.stderr[-3000:]
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, steps[-1] + 1)), "one writer at a time: no step lost or repeated"
