"""Write the run directory and launch the per-rank program locally through torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional

from launch.recipe import recipe_yaml
from train.engines import ENGINE_CONFIG_FILES
from train.recipe import Recipe
from train.rundir import (EXIT_REQUEUE, LAUNCH_ID_ENV, atomic_write, describe, exit_code, final_status,
                          read_status, write_status)
from train.stop import STOP_SIGNALS, stop_signals_blocked


RESUME_KEYS = ("task", "run.seed", "model", "data.seq_len", "data.tokenizer", "train.global_batch_size")
"""Settings a run's checkpoints were trained with: a resume that changes one cannot continue them
(data sources are checked by the ranks, through the next batch's fingerprint)."""


def check_resumable(recipe: Recipe, run_dir: Path) -> list[str]:
    """Problems (one line each) that would make the ranks refuse to resume ``run_dir`` with ``recipe``:
    found here, before ``recipe.yaml`` is rewritten, so a refused launch leaves the run as it was."""
    import dataclasses

    import yaml

    from train.checkpoint_files import committed_checkpoints

    old_file = run_dir / "recipe.yaml"
    if recipe.checkpoint.resume != "auto" or not old_file.exists() or not committed_checkpoints(run_dir / "checkpoints"):
        return []
    try:
        old = yaml.safe_load(old_file.read_text()) or {}
    except yaml.YAMLError:
        return []  # the ranks' own checks still apply
    new = dataclasses.asdict(recipe)

    def leaves(tree, prefix: str) -> dict:  # {"model.config.hidden_size": 64, ...}
        if not isinstance(tree, dict) or not tree:
            return {prefix: tree}
        return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}.{key}").items()}

    def at(tree: dict, key: str):
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    problems = []
    for key in RESUME_KEYS:
        if at(old, key) is None:
            continue  # an older run directory without it: the ranks' checks still apply
        was, now = leaves(at(old, key), key), leaves(at(new, key), key)
        # a setting newer than the run directory is skipped; the model's own config is compared whole
        for name in sorted(set(was) | {n for n in now if n.startswith("model.config.")}):
            if was.get(name) != now.get(name):
                problems.append(f"{name}: {now.get(name)!r} here but {was.get(name)!r} in {old_file}, which its "
                                f"checkpoints were trained with; restore it to resume, or start over with "
                                f"checkpoint.resume=never or another run.dir")
    return problems


class RunDirBackup:
    """The run directory's recipe and engine configs as they were before a launch rewrote them,
    put back when the launch is refused (exit 2), so the run stays exportable and resumable."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.files = {name: (run_dir / name).read_bytes() for name in ("recipe.yaml", *ENGINE_CONFIG_FILES)
                      if (run_dir / name).exists()}

    def restore(self) -> None:
        if not self.files:
            return
        for name in ENGINE_CONFIG_FILES:
            if name not in self.files:
                (self.run_dir / name).unlink(missing_ok=True)
        for name, data in self.files.items():
            atomic_write(self.run_dir / name, data.decode())


def write_run_dir(recipe: Recipe, configs: dict[str, dict]) -> Path:
    """Create ``run.dir`` with the resolved recipe and engine configs; nothing half-written on error."""
    run_dir = Path(recipe.run.dir)
    created = not run_dir.exists()
    try:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "recipe.yaml", recipe_yaml(recipe))
        for stale in ENGINE_CONFIG_FILES:
            if stale not in configs:
                (run_dir / stale).unlink(missing_ok=True)
        for name, cfg in configs.items():
            atomic_write(run_dir / name, json.dumps(cfg, indent=2) + "\n")
    except OSError as err:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise OSError(f"run.dir: cannot write {run_dir}: {err.strerror}; choose a writable run.dir") from None
    return run_dir


def agent_command(run_dir: Path, nproc: int) -> list[str]:
    """The stop-safe torchrun (``launch.agent``) for one node of ``nproc`` ranks."""
    return [sys.executable, "-m", "launch.agent", str(run_dir), "--", "--standalone", "--nnodes=1",
            f"--nproc_per_node={nproc}"]


class EarlyStop:
    """Remembers a stop signal that reaches ``shardforge run`` before the trainers are launched."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held since launch/__main__.py

    def _record(self, signum, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name


def launch_local(run_dir: Path, nproc: int, cpu: bool, early: Optional[EarlyStop] = None) -> int:
    """Run the agent (torchrun) in the foreground, copying its output to ``logs/launch.log``;
    return the run's documented exit code (see ``train.rundir``).

    USR1, TERM, INT and HUP ask the trainers to stop at the next step with a checkpoint (exit 75);
    a second Ctrl-C kills them. A stop that arrived before the launch ends it without starting.
    """
    launch = os.environ[LAUNCH_ID_ENV] = uuid.uuid4().hex[:12]
    if early is not None and early.signal_name:
        write_status(run_dir, "stopped", -1, f"{early.signal_name} before the launch; nothing to save")
        print(f"shardforge: {describe(read_status(run_dir, launch))}", flush=True)
        return EXIT_REQUEUE
    env = dict(os.environ)
    if cpu and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env.setdefault("PYTHONUNBUFFERED", "1")
    log_path = run_dir / "logs" / "launch.log"
    with open(log_path, "ab") as log:
        with stop_signals_blocked():  # the agent starts with them blocked: none can kill it early
            proc = subprocess.Popen(agent_command(run_dir, nproc), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)

            def forward(signum, frame):  # the agent hands it to every trainer
                proc.send_signal(signum)

            for sig in STOP_SIGNALS:
                signal.signal(sig, forward)
            if early is not None and early.signal_name:
                proc.send_signal(signal.Signals[early.signal_name])
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            log.write(chunk)
        code = proc.wait()
    if code < 0:  # the agent itself was killed: settle status.json for it
        status = final_status(run_dir, launch, [(0, f"'s agent was killed by {signal.Signals(-code).name}")])
        print(f"shardforge: {describe(status)}", file=sys.stderr, flush=True)
        return exit_code(status)
    return code
