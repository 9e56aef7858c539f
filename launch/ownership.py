"""Whose folder is this: a run directory is one shardforge made, never a user's folder or a part
of another run.

A run directory is pruned and rewritten (checkpoint steps, ``.tmp-*`` folders, ``metrics.jsonl``),
so ``run`` and ``submit`` adopt only a new or empty folder, or one that carries the marker
(:data:`train.rundir.RUN_MARKER`) the launcher writes into every run directory it makes. Run
directories made before the marker existed are recognised by what only a launch leaves (its
``recipe.yaml`` with a launch log, a job script or a status) and marked when next launched. A run
directory inside another run, or inside a checkpoint, would make that run's newest checkpoint
stop verifying; an export into a run's checkpoints would do the same.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Optional

from launch.runlock import LOCK_FILE
from train.checkpoint.files import MANIFEST, STEP_DIR
from train.rundir import RECIPE_FILE, RUN_MARKER, STATUS_FILE

SHOWN_ENTRIES = 6


def shardforge_made(path: Path) -> bool:
    """Whether ``path`` is a run directory shardforge made (marked, or made before the marker)."""
    if (path / RUN_MARKER).is_file():
        return True
    return (path / RECIPE_FILE).is_file() and any((path / name).exists()
                                                   for name in ("logs/launch.log", "job.sbatch", STATUS_FILE))


def is_checkpoint(path: Path) -> bool:
    """A committed step directory, or one being written."""
    return bool(STEP_DIR.match(path.name)) and (path / MANIFEST).exists() or path.name.startswith(".tmp-step-")


def enclosing_run(path: Path) -> Optional[tuple[str, Path]]:
    """(what, where) of the run directory or checkpoint that holds ``path``, if any."""
    for parent in path.resolve().parents:
        if is_checkpoint(parent):
            return "the checkpoint", parent
        if shardforge_made(parent):
            return "the run directory", parent
    return None


def run_dir_problems(run_dir: Path) -> list[str]:
    """Why ``run_dir`` cannot be a run directory (``run.dir: ...`` lines; none when it can)."""
    problems = []
    if (inside := enclosing_run(run_dir)) is not None:
        what, where = inside
        problems.append(f"run.dir: {run_dir} is inside {what} {where}; writing there would change another run's "
                        f"files (its newest checkpoint would stop verifying); choose a run.dir outside it")
    if run_dir.is_symlink() and not run_dir.exists():
        problems.append(f"run.dir: {run_dir} is a symbolic link to a missing {run_dir.readlink()}; fix or remove the "
                        f"link, or choose another run.dir")
    elif run_dir.is_dir() and not shardforge_made(run_dir):
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir())
        if entries and not prepared_for_checkpoints(run_dir):
            shown = ", ".join(entries[:SHOWN_ENTRIES]) + (f", ... ({len(entries)} entries)"
                                                          if len(entries) > SHOWN_ENTRIES else "")
            problems.append(f"run.dir: {run_dir} is a folder shardforge did not make (it holds {shown}); a run "
                            f"directory's checkpoints and logs are pruned and rewritten, so shardforge adopts "
                            f"only a new or empty folder: choose another run.dir")
    elif run_dir.exists() and not run_dir.is_dir():
        problems.append(f"run.dir: {run_dir} is a file; choose a folder that does not exist yet")
    return problems


def prepared_for_checkpoints(run_dir: Path) -> bool:
    """A folder holding only an empty ``checkpoints/`` (a mount or a link to scratch storage, made
    ready before the first launch), or what the nodes of a launch starting right now write before
    the marker (``lock.json``, the marker's temporary file, ``logs/launch*.log``): nothing in it
    can be lost, so it is adopted."""
    for entry in run_dir.iterdir():
        if entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()):
            continue
        if entry.name in (LOCK_FILE, RUN_MARKER) or re.fullmatch(rf"\.{re.escape(LOCK_FILE)}\.\d+\.tmp", entry.name):
            continue  # the lock, or its heartbeat being rewritten
        if entry.name == "logs" and entry.is_dir() and all(re.fullmatch(r"launch(-node\d+)?\.log", f.name)
                                                          for f in entry.iterdir()):
            continue
        return False
    return True


def export_dir_problems(out_dir: Path) -> list[str]:
    """Why ``out_dir`` cannot receive an export: inside a run's checkpoints or in a checkpoint."""
    for parent in [out_dir.resolve(), *out_dir.resolve().parents]:
        if is_checkpoint(parent) or (parent.name == "checkpoints" and shardforge_made(parent.parent)):
            return [f"{out_dir}: inside {parent}, a run's checkpoints; an export there would be read as part of "
                    f"them; choose a folder outside checkpoints/ (e.g. RUN_DIR/export)"]
    return []


def mark(run_dir: Path) -> None:
    """Record that shardforge made (or adopted) ``run_dir``; kept once written."""
    record = json.dumps({"made_by": "shardforge", "host": socket.gethostname(), "time": time.time()}) + "\n"
    try:  # created in place, no temporary file: another node of the launch may be checking the folder now
        fd = os.open(run_dir / RUN_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(record)
