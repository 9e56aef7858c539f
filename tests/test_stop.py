"""Stops never lose work: a stop signal at any point ends the launch with a committed checkpoint
(exit 75) or cleanly before step 1, and the run resumes bit-exactly; every ending writes
``status.json`` and prints one line.

Signals are real (sent to the launcher, or to every process of the job as slurmstepd does).
To land them at an exact point, the rank program pauses there (``SHARDFORGE_PAUSE_AT``, see
``train/faults.py``) until the signal has arrived: without that seam a test could not know it
hit "during a save" rather than just before or after it. Both DataLoader settings run: the
shipped default (one worker process per rank) and 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO, launch_in_process, make_corpus, read_metrics, tiny_recipe, train_losses, write_recipe
from train.checkpoint.files import committed_checkpoints
from train.rundir import (EXIT_BAD_INPUT, EXIT_CRASH, EXIT_HANG, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_REQUEUE,
                          describe, exit_code, final_status, job_ending, read_status, write_error_report,
                          write_status)

STEPS = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("stop-corpus"))


# GPT-2 as the seeds train it, with its default dropout 0.1: every stop must keep the masks exact
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}


def _recipe(corpus: Path, tmp: Path, name: str, workers) -> Path:
    data = {} if workers == "default" else {"num_workers": workers}
    r = tiny_recipe(corpus, tmp / "cache", tmp / name, data=data, train={"max_steps": STEPS},
                    checkpoint={"every_steps": 4, "at_end": True}, model={"config": GPT2})
    if workers == "default":
        assert "num_workers" not in r["data"], "the default-workers case must run the shipped default"
    return write_recipe(tmp / f"{name}.yaml", r)


def _job_processes() -> list[psutil.Process]:
    """The agent, trainers and DataLoader workers under this (launcher) process."""
    return psutil.Process().children(recursive=True)


def _send_when_paused(cue: Path, sig: signal.Signals, tree: bool, sent: list) -> threading.Thread:
    """Once a rank pauses (writes ``cue``), send ``sig`` to the launcher (this process, as `kill`
    or Ctrl-C does) or, with ``tree``, to every process of the job at once (as slurmstepd does)."""
    def watch():
        deadline = time.time() + 300
        while not cue.exists():
            if time.time() > deadline:
                return
            time.sleep(0.05)
        targets = _job_processes() if tree else [psutil.Process()]
        for proc in targets:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        sent.append((cue.read_text(), len(targets)))
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# (pause point, signal, to the whole job?, step it stops at, phrase in the reason). Ranks agree
# on a stop one step late (the agreement rides on a non-blocking all-reduce), so a signal that
# lands in step N's forward stops the run after step N + 1, with that step's checkpoint.
CHAIN = [
    ("prepare:0", signal.SIGTERM, False, -1, "SIGTERM during data preparation; nothing new to save"),
    ("forward:1", signal.SIGINT, False, 2, "SIGINT"),
    ("write:4", signal.SIGUSR1, True, None, "SIGUSR1"),  # the step-4 save is in flight
    ("forward:7", signal.SIGTERM, True, 8, "SIGTERM"),
]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    """The uninterrupted run (shipped default workers) that every chain of stops must reproduce."""
    tmp = tmp_path_factory.mktemp("straight")
    proc = launch_in_process("run", str(_recipe(corpus, tmp, "straight", "default")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "straight"


@pytest.mark.parametrize("workers", ["default", 2])  # read-ahead thread or worker processes: the same training
def test_stops_at_every_phase_save_and_resume_bit_exactly(corpus, straight, tmp_path, workers):
    chained = _recipe(corpus, tmp_path, "chained", workers)
    run_dir = tmp_path / "chained"
    cue = tmp_path / "paused"
    for point, sig, tree, stop_step, phrase in CHAIN:
        cue.unlink(missing_ok=True)
        sent: list = []
        watcher = _send_when_paused(cue, sig, tree, sent)
        started = time.time()
        proc = launch_in_process("run", str(chained), env={"SHARDFORGE_PAUSE_AT": point,
                                                           "SHARDFORGE_PAUSE_FILE": str(cue)})
        watcher.join(timeout=5)
        out = proc.stdout + proc.stderr
        where = f"{point} {sig.name} (tree={tree}): sent {sent}, exit {proc.returncode}\n{out[-3000:]}"
        assert sent, f"never paused at {point}\n{where}"
        assert proc.returncode == EXIT_REQUEUE, where
        assert time.time() - started < 200, f"the stop took too long: {where}"
        assert "Traceback" not in out and "SignalException" not in out and "killed by signal" not in out, where
        status = read_status(run_dir)
        assert status["state"] == "stopped" and phrase in status["reason"], (status, where)
        saved = [int(p.name.split("-")[1]) for p in committed_checkpoints(run_dir / "checkpoints")]
        if stop_step == -1:
            assert saved == [] and status["step"] == -1, (saved, status, where)
        elif stop_step is not None:
            assert saved[-1] == stop_step and status["step"] == stop_step, (saved, status, where)
        else:  # the save the signal interrupted is committed, then the stop's own (the background
            # write lets the steps go on, so the stop lands one or two steps after it)
            save_step = int(point.split(":")[1])
            assert save_step in saved and saved[-1] == status["step"] in (save_step, save_step + 1, save_step + 2), \
                (saved, status, where)
            assert not list((run_dir / "checkpoints").glob(".tmp-*")), where
        last = out.strip().splitlines()[-1]
        assert last.startswith("shardforge: stopped") and "run the same command again to resume (exit 75)" in last, where
    proc = launch_in_process("run", str(chained))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert read_status(run_dir)["state"] == "completed"
    ending = [line for line in proc.stdout.splitlines() if line.startswith("shardforge: ")][-1]
    assert ending == f"shardforge: completed at step {STEPS}"  # then the summary's indented lines
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl continues without gaps or duplicates"
    assert train_losses(run_dir) == train_losses(straight), "the stops changed the training"


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=REPO, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _blocks(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has ``sig`` blocked (``SigBlk`` in /proc). Before the interpreter
    runs a program's first line a signal's default action applies to any program; that window
    (tens of milliseconds, more on a busy machine) is the one thing no code can close."""
    try:
        mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("SigBlk:"))
    except (OSError, StopIteration):
        return False
    return bool(int(mask.split()[1], 16) >> (sig - 1) & 1)


def test_a_signal_before_the_launch_or_during_start_up_exits_75_and_never_hangs(corpus, tmp_path):
    """USR1 while `shardforge run` is still importing (before any handler exists), then TERM right
    as the agent starts (the trainers are importing torch): clean stops, no traceback."""
    recipe = _recipe(corpus, tmp_path, "early", "default")
    run_dir = tmp_path / "early"
    proc = _cli("run", str(recipe))
    deadline = time.time() + 60
    while not _blocks(proc.pid, signal.SIGUSR1):  # its first line ran; no handler exists yet
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.001)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, out + err
    assert "Traceback" not in out + err
    assert read_status(run_dir)["state"] == "stopped" and "before the launch" in read_status(run_dir)["reason"]
    assert out.strip().splitlines()[-1].startswith("shardforge: stopped (SIGUSR1 before the launch")

    proc = _cli("run", str(recipe))
    deadline = time.time() + 120
    while not (run_dir / "logs" / "launch.log").exists() or not any(
            "launch.agent" in " ".join(p.cmdline()) for p in psutil.Process(proc.pid).children()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.send_signal(signal.SIGTERM)  # everything at once, agent included, as soon as it exists
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == EXIT_REQUEUE, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err, out[-3000:] + err[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "stopped" and "SIGTERM" in status["reason"], status
    assert committed_checkpoints(run_dir / "checkpoints") == [], "no step ran: nothing to save"


def test_a_crash_prints_one_traceback_and_one_line_naming_the_rank(corpus, tmp_path):
    recipe = _recipe(corpus, tmp_path, "crash", "default")
    proc = _cli("run", str(recipe), env={"SHARDFORGE_RAISE_AT": "forward:2:1"})
    out, err = proc.communicate(timeout=300)
    text = out + err
    assert proc.returncode == EXIT_CRASH, text[-3000:]
    assert text.count("Traceback") == 1, text[-5000:]
    # the agent's output (stdout and stderr) reaches the console and logs/launch.log as one stream
    assert "shardforge: rank 1 raised:" in text and "RuntimeError: injected fault at forward of step 2" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("shardforge: failed after step 1: rank 1: RuntimeError: injected fault") and \
        last.endswith("(exit 1)"), text[-3000:]
    status = read_status(tmp_path / "crash")
    assert status["state"] == "failed" and status["rank"] == 1 and status["exit_code"] == 1, status


def test_a_second_ctrl_c_kills_the_trainers_and_exits_130(corpus, tmp_path):
    recipe = _recipe(corpus, tmp_path, "ctrlc", "default")
    run_dir = tmp_path / "ctrlc"
    proc = _cli("run", str(recipe), env={"SHARDFORGE_HANG_AT": "3:0"})  # rank 0 sleeps in step 3
    deadline = time.time() + 200
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < 2:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(1)
    assert proc.poll() is None, "one Ctrl-C waits for the step to end"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err
    status = read_status(run_dir)
    assert status["state"] == "failed" and "interrupted twice" in status["reason"], status
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]


# ---------------------------------------------------------------- how an ending is settled (no launch)


def test_final_status_picks_the_root_cause_and_the_documented_exit_code(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", "launch-a")
    write_status(tmp_path, "running", 5, started=123.0)
    # rank 0 fails in a collective because rank 1 went away first with the real error
    write_error_report(tmp_path, 0, "collective", "RuntimeError: Connection closed by peer", "tb0", step=6)
    write_error_report(tmp_path, 1, "bad_input", "data: cache is corrupt; delete it", "tb1", step=6)
    status = final_status(tmp_path, "launch-a")
    assert (status["state"], status["rank"], status["exit_code"], status["step"]) == ("failed", 1, 2, 6)
    assert status["started"] == 123.0, "the loop's start time is kept"
    assert describe(status) == "failed after step 6: rank 1: data: cache is corrupt; delete it (exit 2)"
    assert describe({**status, "step": 0}).startswith("failed before the first step: rank 1: data: cache")

    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", "launch-b")  # the next launch ignores launch-a's reports
    write_status(tmp_path, "running", 6)
    status = final_status(tmp_path, "launch-b", [(1, "was killed by SIGKILL")])
    assert status["rank"] == 1 and "killed by SIGKILL without reporting" in status["reason"]
    assert exit_code(status) == EXIT_CRASH
    assert read_status(tmp_path, "launch-a") == {}

    for state, code in (("completed", 0), ("stopped", EXIT_REQUEUE), ("hung", EXIT_HANG)):
        write_status(tmp_path, state, 7, "why")
        assert exit_code(final_status(tmp_path, "launch-b")) == code
    write_status(tmp_path, "running", 7)
    assert exit_code(final_status(tmp_path, "launch-b", interrupted=True)) == EXIT_INTERRUPTED
    write_error_report(tmp_path, 0, "nonfinite", "non-finite loss at step 8", step=8)
    write_status(tmp_path, "running", 7)
    assert exit_code(final_status(tmp_path, "launch-b")) == EXIT_NONFINITE
    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", "launch-c")
    write_status(tmp_path, "running", 7)
    assert final_status(tmp_path, "launch-c")["reason"].startswith("the trainers exited without recording")
    assert EXIT_BAD_INPUT == 2 and json.loads((tmp_path / "status.json").read_text())["launch_id"] == "launch-c"

    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", "launch-d")  # a save that failed on rank 0 only:
    write_status(tmp_path, "running", 4)                     # rank 1's report (written first) is a symptom
    write_error_report(tmp_path, 1, "save_failed", "checkpoint step-000004 failed (another rank failed to write)",
                       step=4, symptom=True)
    write_error_report(tmp_path, 0, "save_failed", "checkpoint step-000004 failed (rank 0: No space left)", step=4)
    status = final_status(tmp_path, "launch-d")
    assert status["rank"] == 0 and "No space left" in status["reason"], status


def test_a_failure_no_rank_caused_is_lost_and_the_job_script_requeues_it(tmp_path, monkeypatch):
    """A node or process that went away (only collective errors, or a rank killed without a
    report) once the loop ran is ``lost``: the Slurm job requeues it. A rank's own error, or a
    failure before the loop began, is not."""
    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", "lost-a")
    write_status(tmp_path, "running", 8, started=1.0)
    write_error_report(tmp_path, 0, "collective", "RuntimeError: Connection closed by peer", step=8)
    assert job_ending(tmp_path, "lost-a", 137) == "lost"  # the job script settles it: srun killed the agents
    status = read_status(tmp_path, "lost-a")
    assert status["state"] == "failed" and status["lost"] and exit_code(status) == EXIT_CRASH
    assert describe(status).endswith("(a process or a node went away): run again to resume (exit 1)"), describe(status)

    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", "lost-b")  # killed without a word (kill -9, OOM killer)
    write_status(tmp_path, "running", 8, started=1.0)
    assert final_status(tmp_path, "lost-b", [(1, "was killed by SIGKILL")])["lost"]

    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", "lost-c")  # the cause is rank 1's own: it would recur
    write_status(tmp_path, "running", 8, started=1.0)
    write_error_report(tmp_path, 0, "collective", "RuntimeError: Connection closed by peer", step=8)
    write_error_report(tmp_path, 1, "crash", "RuntimeError: shape mismatch", step=8)
    assert job_ending(tmp_path, "lost-c", 1) == "failed" and not read_status(tmp_path, "lost-c")["lost"]

    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", "lost-d")  # before the loop began: not resumable progress
    write_status(tmp_path, "running", -1)
    assert job_ending(tmp_path, "lost-d", 1) == "failed"
    assert job_ending(tmp_path, "lost-d", 1) == "failed"  # settled once, read the same again

    # lost again, with no checkpoint committed since the last lost launch: it may recur, no requeue
    for launch, ending in (("lost-a2", "lost-again"), ("lost-a3", "lost")):
        if launch == "lost-a3":  # a new checkpoint since: progress, so requeue again
            (tmp_path / "checkpoints" / "step-000010").mkdir(parents=True)
            (tmp_path / "checkpoints" / "step-000010" / "manifest.json").write_text("{}")
        monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", launch)
        write_status(tmp_path, "running", 8, started=1.0)
        assert job_ending(tmp_path, launch, 137) == ending, launch

    monkeypatch.setenv("SHARDFORGE_LAUNCH_ID", "lost-e")  # nothing of this launch was written
    assert job_ending(tmp_path, "lost-e", 143) == "stopped" and job_ending(tmp_path, "lost-e", 1) == "unknown"
    assert read_status(tmp_path, "lost-e") == {}
    for state in ("completed", "stopped", "hung"):
        write_status(tmp_path, state, 9)
        assert job_ending(tmp_path, "lost-e", 0) == state


def test_the_agent_starts_ranks_like_torchrun_and_ends_the_others_when_one_fails(tmp_path, monkeypatch):
    """``launch.agent`` starts one machine's ranks itself (no torch import): torchrun's environment;
    all exit 0 -> no failures; rank 1 exits 3 -> rank 0 gets SIGTERM, and SIGKILL after the grace
    period when it ignores it; the failure names rank 1."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    from launch.agent import run_ranks  # its first line blocks the stop signals: not in pytest's process

    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, signal, sys, time
        from pathlib import Path
        rank, mode = int(os.environ["RANK"]), sys.argv[1]
        keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
        Path(r"{tmp_path}", f"{{mode}}-{{rank}}.json").write_text(json.dumps({{k: os.environ.get(k) for k in keys}}))
        if mode == "ok":
            sys.exit(0)
        if rank == 1:
            time.sleep(0.5)
            sys.exit(3)
        def note(signum, frame):
            Path(r"{tmp_path}", "term-0").write_text("got SIGTERM")
        signal.signal(signal.SIGTERM, note)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
        time.sleep(60)
    """))
    assert run_ranks(2, tmp_path, program=[sys.executable, str(script), "ok"]) == []
    env = [json.loads((tmp_path / f"ok-{rank}.json").read_text()) for rank in (0, 1)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in env] == \
        [("0", "0", "2", "2"), ("1", "1", "2", "2")]
    assert env[0]["MASTER_ADDR"] == "127.0.0.1" and env[0]["MASTER_PORT"] == env[1]["MASTER_PORT"]
    assert env[0]["OMP_NUM_THREADS"] == "1", "torchrun's default for several ranks"
    started = time.monotonic()
    failures = run_ranks(2, tmp_path, grace_s=1.0, program=[sys.executable, str(script), "fail"])
    assert failures == [(1, "exited with code 3")]
    assert (tmp_path / "term-0").read_text() == "got SIGTERM" and time.monotonic() - started < 30
