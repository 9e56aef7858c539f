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
