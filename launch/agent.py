"""``python -m launch.agent RUN_DIR --nproc N`` (one machine) or ``python -m launch.agent RUN_DIR --
TORCHRUN_OPTIONS`` (one node of several): the trainers of one node, started stop-safe.

On one machine it starts the N trainers itself (:func:`run_ranks`: the environment torchrun
gives them, a free port on the loopback, and torchrun's rule for a failure), without importing
torch: torchrun's agent imports it before it starts a trainer, which cost each launch about
1.5 s of CPU before the first rank began. Across nodes it runs torchrun's agent in this process
(c10d rendezvous). Either way the stop signals (USR1, TERM, INT, HUP) are blocked from the
first line, so a signal can neither kill the agent during its imports nor tear the trainers
down: a thread takes each signal with ``sigwait`` and hands it to the trainers, which stop at a
step boundary with a checkpoint (see ``train.stop_signals``). Under Slurm the trainers are signalled
directly as well; they act once.

When torchrun returns, the agent settles ``status.json`` (a rank may have died before it could
write it), prints the root cause's traceback once and one line naming the ending, and exits
with the documented code (0, 2, 3, 4, 75; 1 for a crash). ``--report-only`` exits 0 for
``completed`` and ``stopped``, so ``srun --kill-on-bad-exit`` does not cut another node's
agent short; the job script reads ``status.json`` itself.

A second SIGINT kills the trainers at once (the latest committed checkpoint stands).
"""

import signal

from train.stop_signals import STOP_SIGNALS  # a light module: signal and contextlib only

signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # first: before any import can take seconds

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from launch.runlock import RunLock, RunLocked  # noqa: E402
from train.ports import free_port  # noqa: E402
from train.rundir import (AGENT_ENV, EXIT_BAD_INPUT, EXIT_OK, EXIT_REQUEUE, NODE_RANK_ENV,  # noqa: E402
                          describe, exit_code, final_status, launch_id)


class SignalForwarder:
    """Takes the blocked stop signals with ``sigwait`` and passes them to the trainer processes,
    also to trainers that start later (they inherit the block, so it waits for their handler)."""

    POLL_S = 0.2

    def __init__(self) -> None:
        self.first: Optional[str] = None
        self.interrupted = False  # a second SIGINT: the trainers were killed
        self._pending: Optional[signal.Signals] = None
        self._told: set[int] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._wait, name="stop-signals", daemon=True).start()
        threading.Thread(target=self._deliver, name="stop-delivery", daemon=True).start()

    @staticmethod
    def trainers() -> list:
        import psutil

        found = []
        for child in psutil.Process().children():
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if any(a == "-m" and b == "train" for a, b in zip(cmd, cmd[1:])):
                found.append(child)
        return found

    def _wait(self) -> None:
        while True:
            sig = signal.Signals(signal.sigwait(STOP_SIGNALS))
            with self._lock:
                if self._pending is None:
                    self.first, self._pending = sig.name, sig
                    print(f"shardforge: {sig.name}: asking the trainers to stop at the next step with a "
                          f"checkpoint (Ctrl-C again to kill them)", file=sys.stderr, flush=True)
                elif sig == signal.SIGINT and not self.interrupted:
                    self.interrupted = True
                    print("shardforge: second SIGINT: killing the trainers; the latest committed checkpoint "
                          "stands", file=sys.stderr, flush=True)
                    for proc in self.trainers():
                        try:
                            os.killpg(proc.pid, signal.SIGKILL)  # with its DataLoader workers
                        except OSError:
                            pass

    def _deliver(self) -> None:
        while True:
            time.sleep(self.POLL_S)
            with self._lock:
                if self._pending is None or self.interrupted:
                    continue
                for proc in self.trainers():
                    if proc.pid not in self._told:
                        try:
                            proc.send_signal(self._pending)
                            self._told.add(proc.pid)
                        except Exception:  # gone already
                            pass


def _how(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """Trainer ``rank``'s environment on a one-machine launch: what torchrun's agent sets, but
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` keeps torch's own default (see ``launch.local.rank_defaults``)."""
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
           "ROLE_NAME": "default", "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
           "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0"}
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # torch's default (torchrun's agent sets 1)
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, so results match a torchrun launch
    return env


def run_ranks(nproc: int, run_dir: Path, poll_s: float = 0.1, grace_s: float = 30.0,
              program: Optional[list[str]] = None) -> list[tuple[int, str]]:
    """Start ``nproc`` trainers on this machine and wait for them; return (rank, how it ended) for
    those that failed. Torchrun's rule: when one fails, the others get SIGTERM (they are then
    failing in a collective, which they report as such) and SIGKILL after ``grace_s``.
    ``program``: the command of each rank (default ``python -u -m train RUN_DIR``)."""
    program = program or [sys.executable, "-u", "-m", "train", str(run_dir)]
    port = free_port()  # rank 0's store binds it a moment later
    procs = [subprocess.Popen(program, env=rank_env(rank, nproc, port),
                              start_new_session=True)  # its own group: a second Ctrl-C kills it with its workers
             for rank in range(nproc)]
    while not (failed := [(rank, proc.returncode) for rank, proc in enumerate(procs) if proc.poll()]):
        if all(proc.returncode == 0 for proc in procs):
            return []
        time.sleep(poll_s)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return [(rank, _how(code)) for rank, code in failed]


def run_torchrun(torchrun_args: list[str], run_dir: Path) -> list[tuple[int, str]]:
    """Run torchrun's agent here; return (rank, how it ended) for the trainers that failed."""
    from train import startup_gc

    startup_gc.pause()  # as in the trainers: ~0.3 CPU-s less for torch's imports
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    startup_gc.resume()

    if os.environ.get("SHARDFORGE_TORCHRUN_LOG") is None:  # torchrun's own failure log repeats ours
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args([*torchrun_args, "-m", "train", str(run_dir)]))
    except ChildFailedError as err:
        failures = sorted(err.failures.items(), key=lambda kv: kv[1].timestamp)
        return [(rank, _how(f.exitcode)) for rank, f in failures]
    return []


def report(run_dir: Path, status: dict, launched: Optional[float] = None) -> None:
    """The root cause's traceback once (for a crash; a lost peer's collective error is no cause),
    then the one line; under a completed run's line, its summary (``launch.status.end_lines``).
    ``launched``: when this launch began."""
    from train.rundir import read_error_reports

    reports = read_error_reports(run_dir, status.get("launch_id", ""))
    if status.get("state") == "failed" and not status.get("lost") and reports and reports[0].get("traceback"):
        print(f"shardforge: rank {reports[0]['rank']} raised:\n{reports[0]['traceback'].rstrip()}",
              file=sys.stderr, flush=True)
    print(f"shardforge: {describe(status)}", file=sys.stderr if status.get("state") == "failed" else sys.stdout,
          flush=True)
    if status.get("state") != "completed":
        return
    from launch.status import end_lines

    try:
        lines = end_lines(run_dir, status, launched)
    except Exception as err:  # the run is over and its exit code decided: a summary must not change it
        lines = [f"(no summary: {type(err).__name__}: {err})"]
    print("".join(f"  {line}\n" for line in lines), end="", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.agent", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--report-only", action="store_true",
                        help="exit 0 for completed and stopped (the Slurm job script reads status.json)")
    parser.add_argument("--lock", action="store_true",
                        help="hold the run directory's lock (launch.runlock) on node 0 while training")
    parser.add_argument("--nproc", type=int, help="start this many trainers on this machine (no torchrun)")
    parser.epilog = "-- then torchrun's options: one node of several"
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, torchrun_args = parser.parse_args(argv[:split]), argv[split + 1:]
    if (args.nproc is None) == (not torchrun_args):
        parser.error("give either --nproc N or -- and torchrun's options")
    launched = time.time()
    launch = launch_id()  # exported: the trainers tag status.json and their reports with it
    os.environ[AGENT_ENV] = "1"
    forwarder = SignalForwarder()
    node_rank = int(os.environ.get("SLURM_NODEID", os.environ.get(NODE_RANK_ENV, "0")) or 0)
    lock = RunLock(args.run_dir) if args.lock and node_rank == 0 else None
    if lock is not None:
        try:
            lock.acquire()
        except RunLocked as err:
            print(f"shardforge: {err}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
    try:
        failures = run_ranks(args.nproc, args.run_dir) if args.nproc else run_torchrun(torchrun_args, args.run_dir)
    finally:
        if lock is not None:
            lock.release()
    status = final_status(args.run_dir, launch, failures, interrupted=forwarder.interrupted)
    if node_rank == 0:
        report(args.run_dir, status, launched)
    code = exit_code(status)
    if args.report_only and code in (EXIT_OK, EXIT_REQUEUE):
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
