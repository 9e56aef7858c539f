"""The run directory's shared vocabulary: file names, exit codes, ``status.json`` and the
per-rank error reports.

The launcher (``launch/``), the torchrun agent and the Slurm job script read what the ranks
write here, so this module imports nothing heavy (no torch): ``launch`` may import it freely.

How a launch ends is decided in one place, :func:`final_status`: the ranks write
``status.json`` for the endings they control (``running``, ``completed``, ``stopped``, and the
watchdog's ``hung``), and each failing rank writes ``logs/error-rank-NNNNN.json``. The agent
that ran torchrun then picks the root cause among those reports (the first one that is not a
collective error caused by another rank's exit) and records ``failed``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

RECIPE_FILE = "recipe.yaml"
RUN_MARKER = ".shardforge-run"  # written by the launcher: shardforge made this directory (launch/ownership.py)
STATUS_FILE = "status.json"
LABELS_FILE = "labels.json"
BEST_FILE = "best.json"  # in checkpoints/: {"step", "metric", "value"} of the best evaluation
LOST_FILE = "lost.json"  # in logs/: the newest checkpoint when a Slurm launch was last lost
RESIZED_FILE = "resized.json"  # in logs/: an elastic Slurm job's launch on another node count (launch/elastic.py)
LAUNCH_ID_ENV = "SHARDFORGE_LAUNCH_ID"
"""Set by whoever starts a launch (the local launcher, the Slurm job script, else the agent):
ties ``status.json`` and error reports to the launch that wrote them."""
AGENT_ENV = "SHARDFORGE_AGENT"
"""Set to 1 for the trainers started by ``launch.agent``: it settles and prints how they ended."""
NODE_RANK_ENV = "SHARDFORGE_NODE_RANK"
"""This machine's node in a multi-node ``shardforge run`` (Slurm jobs have ``SLURM_NODEID``)."""

EXIT_OK = 0
EXIT_CRASH = 1  # an unexpected error (a bug, an OOM, a killed process)
EXIT_BAD_INPUT = 2  # bad recipe, data or checkpoint; a save that failed with checkpoint.on_error=stop
EXIT_NONFINITE = 3  # train.on_nonfinite=stop fired; nothing was saved after the bad step
EXIT_HANG = 4  # the hang watchdog ended a stalled step
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on request with a committed checkpoint; run again to resume
EXIT_INTERRUPTED = 130  # interrupted twice: the trainers were killed without a final checkpoint

STATE_EXIT = {"completed": EXIT_OK, "stopped": EXIT_REQUEUE, "hung": EXIT_HANG}
"""Exit codes of the states that carry no code of their own (``failed`` records its code)."""

KIND_EXIT = {"bad_input": EXIT_BAD_INPUT, "save_failed": EXIT_BAD_INPUT, "nonfinite": EXIT_NONFINITE,
             "crash": EXIT_CRASH, "collective": EXIT_CRASH, "interrupted": EXIT_INTERRUPTED}
"""Exit code of each kind of error report. ``collective``: a collective failed because another
rank went away; it is reported only when no rank says why."""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def launch_id() -> str:
    """This launch's id, from the environment (a new one when nobody set it)."""
    value = os.environ.get(LAUNCH_ID_ENV)
    if not value:
        value = os.environ[LAUNCH_ID_ENV] = uuid.uuid4().hex[:12]
    return value


def atomic_write(path: Path, text: str, fsync: bool = False) -> None:
    """Replace ``path`` with ``text`` in one rename; readers see the old or the new file, never half.
    With ``fsync`` the file and the rename are on disk when this returns (a commit marker)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # several processes may write one file
    with open(tmp, "w") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_path(path.parent)


def first_line(err: BaseException) -> str:
    """An error's first line (at most 200 characters), or its type when it has no text."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') changes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_status(run_dir: Path, state: str, step: int, reason: str = "", rank: Optional[int] = None,
                 exit_code: Optional[int] = None, started: Optional[float] = None, lost: bool = False,
                 summary: Optional[dict] = None) -> None:
    """Record how this launch stands or ended (``running|completed|stopped|failed|hung``).

    ``started``: when this launch's training loop began; kept from the previous write of the
    same launch when not given (``None`` while the loop has not begun). ``lost``: a ``failed``
    launch in which no rank holds a cause (see :func:`final_status`). ``summary``: what the ranks
    alone know at the end (tokens, the best evaluation; see ``train.loop.trainer.end_summary``), for
    the lines the launcher prints and ``shardforge status``. A launch that the Slurm job script
    resized (``logs/resized.json`` of this launch) carries it as ``resized``.
    """
    code = exit_code if exit_code is not None else STATE_EXIT.get(state)
    launch = launch_id()
    if started is None:
        started = read_status(run_dir, launch).get("started")
    resized = read_resized(run_dir, launch)
    atomic_write(run_dir / STATUS_FILE, json.dumps(
        {"state": state, "step": step, "reason": reason, "rank": rank, "exit_code": code,
         "launch_id": launch, "time": time.time(), "started": started, "lost": lost, "summary": summary,
         **({"resized": resized} if resized else {})}),
        fsync=state != "running")


def read_status(run_dir: Path, launch: Optional[str] = None) -> dict:
    """``status.json``, or ``{}`` when missing, unreadable or (given ``launch``) from another launch."""
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(status, dict) or (launch is not None and status.get("launch_id") != launch):
        return {}
    return status


def read_resized(run_dir: Path, launch: str) -> dict:
    """Launch ``launch``'s ``logs/resized.json`` (``launch.elastic`` writes it before the ranks start:
    the node counts, world sizes and accumulation before and after), or ``{}``."""
    try:
        record = json.loads((run_dir / "logs" / RESIZED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("launch_id") == launch else {}


def error_report_path(run_dir: Path, rank: int) -> Path:
    return run_dir / "logs" / f"error-rank-{rank:05d}.json"


def write_error_report(run_dir: Path, rank: int, kind: str, message: str, traceback_text: str = "",
                       step: int = -1, symptom: bool = False) -> None:
    """One failing rank's account: what kind of error, the one-line message and the traceback.
    ``symptom``: this rank failed only because another did (it holds no cause of its own)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write(error_report_path(run_dir, rank), json.dumps(
        {"rank": rank, "kind": kind, "message": message, "traceback": traceback_text, "step": step,
         "exit_code": KIND_EXIT.get(kind, EXIT_CRASH), "launch_id": launch_id(), "time": time.time(),
         "symptom": symptom or kind == "collective"}),
        fsync=True)


def read_error_reports(run_dir: Path, launch: str) -> list[dict]:
    """This launch's error reports, root cause first: causes before symptoms (collective errors, a
    save that failed on another rank), then by time."""
    reports = []
    for path in sorted((run_dir / "logs").glob("error-rank-*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and report.get("launch_id") == launch:
            reports.append(report)
    return sorted(reports, key=lambda r: (_is_symptom(r), r.get("time", 0.0)))


def _is_symptom(report: dict) -> bool:
    """The report's rank failed only because another did (a collective error, a shared save)."""
    return bool(report.get("symptom")) or report.get("kind") == "collective"


def final_status(run_dir: Path, launch: str, process_failures: Sequence[tuple[int, str]] = (),
                 interrupted: bool = False) -> dict:
    """Settle how launch ``launch`` ended, write ``status.json`` if the ranks did not, and return it.

    ``process_failures``: (rank, how it ended) for processes that exited non-zero, as the
    agent saw them, for when no rank could write a report (``kill -9``, the OOM killer).

    A failure after the training loop began in which no rank reports a cause of its own (only
    collective errors, or processes that vanished) is marked ``lost``: a process or a node went
    away from the outside, which resuming from the latest checkpoint can survive. A rank's own
    error (an exception, bad input, a non-finite loss) would recur, so it is never ``lost``.
    """
    status = read_status(run_dir, launch)
    if status.get("state") in ("completed", "stopped", "hung", "failed") and not interrupted:
        return status
    reports = read_error_reports(run_dir, launch)
    caused = bool(reports) and not _is_symptom(reports[0])
    lost = not interrupted and not caused and status.get("started") is not None
    step = status.get("step", -1)
    if interrupted:
        reason, rank, code = ("interrupted twice: the trainers were killed; the latest committed "
                              "checkpoint stands, run again to resume"), None, EXIT_INTERRUPTED
    elif reports:
        root = reports[0]
        reason, rank, code = root["message"], root["rank"], root["exit_code"]
        step = root.get("step", step) if root.get("step", -1) >= 0 else step
    elif process_failures:
        rank, how = process_failures[0]
        reason, code = f"rank {rank} {how} without reporting an error (killed? out of memory?)", EXIT_CRASH
    else:
        reason, rank, code = "the trainers exited without recording how they ended", None, EXIT_CRASH
    write_status(run_dir, "failed", step, reason, rank, code, lost=lost)
    return read_status(run_dir, launch)


def job_ending(run_dir: Path, launch: str, step_exit_code: int) -> str:
    """How a Slurm job step ended, in the one word the job script acts on: ``completed``,
    ``stopped``, ``hung``, ``lost`` (failed with no rank to blame: requeue), ``lost-again`` (lost
    as the previous launch was, with no checkpoint committed in between: it may recur, so no
    requeue), ``failed`` or ``unknown``. Settles ``status.json`` when the agents could not (srun
    killed them)."""
    status = read_status(run_dir, launch)
    if not status and step_exit_code in (128 + 10, 128 + 15):
        return "stopped"  # USR1/TERM ended the step before the agent took signals: nothing to save
    if not status:
        return "unknown"  # the trainers never started: nothing of this launch to settle
    status = final_status(run_dir, launch)
    if not (status.get("state") == "failed" and status.get("lost")):
        return status.get("state", "unknown")
    from train.checkpoint.files import committed_checkpoints

    newest = committed_checkpoints(run_dir / "checkpoints")
    checkpoint = newest[-1].name if newest else None
    record = run_dir / "logs" / LOST_FILE
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError):
        previous = {}
    if previous.get("launch_id") not in (None, launch) and previous.get("checkpoint") == checkpoint:
        return "lost-again"
    atomic_write(record, json.dumps({"launch_id": launch, "checkpoint": checkpoint}), fsync=True)
    return "lost"


def exit_code(status: dict) -> int:
    """The documented exit code for a final status."""
    if status.get("exit_code") is not None:
        return int(status["exit_code"])
    return STATE_EXIT.get(status.get("state", ""), EXIT_CRASH)


def describe(status: dict) -> str:
    """The one line the launcher prints for a final status."""
    state, step, reason = status.get("state", "failed"), status.get("step", -1), status.get("reason", "")
    at = f" at step {step}" if isinstance(step, int) and step >= 0 else ""
    code = exit_code(status)
    if state == "completed":
        return f"completed{at}"
    if state == "stopped":
        return f"stopped{at} ({reason}); run the same command again to resume (exit {code})"
    if state == "hung":
        return f"hung{at}: {reason.splitlines()[0] if reason else 'the watchdog fired'} (exit {code})"
    if isinstance(step, int) and step >= 0:
        at = f" after step {step}" if step > 0 else " before the first step"  # the last step that completed
    rank = status.get("rank")
    who = f"rank {rank}: " if rank is not None and not reason.startswith(f"rank {rank}") else ""
    hint = "; no rank reported an error of its own (a process or a node went away): run again to resume" \
        if status.get("lost") else ""
    return f"failed{at}: {who}{reason}{hint} (exit {code})"
