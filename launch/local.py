"""Write the run directory and launch the per-rank program locally through torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.recipe import recipe_yaml
from train.recipe import Recipe


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run_dir(recipe: Recipe, configs: dict[str, dict]) -> Path:
    """Create ``run.dir`` with the resolved recipe and engine configs; nothing half-written on error."""
    run_dir = Path(recipe.run.dir)
    created = not run_dir.exists()
    try:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        _write(run_dir / "recipe.yaml", recipe_yaml(recipe))
        for stale in ("deepspeed.json", "fsdp.json"):
            if stale not in configs:
                (run_dir / stale).unlink(missing_ok=True)
        for name, cfg in configs.items():
            _write(run_dir / name, json.dumps(cfg, indent=2) + "\n")
    except OSError as err:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise OSError(f"run.dir: cannot write {run_dir}: {err.strerror}; choose a writable run.dir") from None
    return run_dir


# torchrun forwards these to the trainers; USR1 is not in its default list and would kill it.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = 300  # how long torchrun lets the trainers checkpoint after a signal


def torchrun_command(run_dir: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc_per_node={nproc}", f"--signals-to-handle={FORWARDED_SIGNALS}",
            f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}", "-m", "train", str(run_dir)]


def launch_local(run_dir: Path, nproc: int, cpu: bool) -> int:
    """Run torchrun in the foreground, copying its output to ``logs/launch.log``; return the run's exit code.

    TERM or USR1 asks the trainers to stop at the next step with a checkpoint (exit 75);
    Ctrl-C interrupts them.
    """
    env = dict(os.environ)
    if cpu and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env.setdefault("PYTHONUNBUFFERED", "1")
    log_path = run_dir / "logs" / "launch.log"
    launched = time.time()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(torchrun_command(run_dir, nproc), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)

        def forward(signum, frame):  # torchrun passes it on to every trainer
            proc.send_signal(signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, forward)
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            log.write(chunk)
        code = proc.wait()
    return exit_code_from_status(run_dir, code, launched)


def exit_code_from_status(run_dir: Path, torchrun_code: int, launched: float) -> int:
    """75 when this launch stopped on request with a committed checkpoint (run again to resume).

    torchrun cannot carry the trainers' exit code (and exits non-zero after forwarding a
    signal), so rank 0's ``status.json`` from this launch decides.
    """
    from train.loop import EXIT_REQUEUE, STATUS_FILE

    try:
        status = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        status = {}
    if status.get("started", 0) < launched:  # this launch never reached its training loop
        return torchrun_code
    if status.get("state") == "stopped":
        return EXIT_REQUEUE
    if status.get("state") == "completed":
        return 0
    if status.get("state") == "hung":
        from train.watchdog import EXIT_HANG

        return EXIT_HANG
    return torchrun_code or 1
