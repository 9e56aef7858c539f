"""Hang watchdog: a step or save that runs past ``train.step_timeout_s`` ends the job loudly.

Each rank's watchdog thread writes a small heartbeat file (``heartbeat/rank-N.json``: step,
phase, time) about once a second. When this rank's current phase has run past the timeout,
the thread dumps every thread's Python stack (to stderr and ``logs/hang-rank-N.txt``), names
the ranks whose heartbeat is behind (the ones that did not arrive), records ``hung`` in
``status.json`` (rank 0) and exits with :data:`EXIT_HANG`, so Slurm's job script requeues
and the run resumes from its last committed checkpoint. A rank blocked in a collective
still runs this thread: the GIL is released while it waits.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from train.rundir import EXIT_HANG


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, world: int, timeout_s: float,
                 on_fire: Optional[Callable[[str], None]] = None):
        self.run_dir, self.rank, self.world, self.timeout_s = run_dir, rank, world, timeout_s
        self.on_fire = on_fire
        self.dir = run_dir / "heartbeat"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._step, self._phase, self._since = 0, "start", time.monotonic()
        self._first_step: Optional[int] = None
        self._armed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    FIRST_STEP_FACTOR = 10
    """The first step of a launch (compilation, allocator and communicator warm-up) may take this
    many times the timeout before the watchdog fires."""

    PHASES = ("data", "forward-backward", "optimizer")
    """Phases of one training step, in order: at the same step, a rank in an earlier one is behind."""

    def beat(self, step: int, phase: str, restart: bool = False) -> None:
        """Called by the loop at phase changes (a few assignments). The clock restarts with each
        new step, or when ``restart`` (saves and evaluations get their own allowance)."""
        if step != self._step or restart:
            self._since = time.monotonic()
        if self._first_step is None:
            self._first_step = step
        self._step, self._phase = step, phase
        self._armed = True

    @property
    def limit_s(self) -> float:
        first = self._step == self._first_step
        return self.timeout_s * (self.FIRST_STEP_FACTOR if first else 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _write_heartbeat(self) -> None:
        path = self.dir / f"rank-{self.rank:05d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": self.rank, "step": self._step, "phase": self._phase,
                                   "time": time.time()}))
        os.replace(tmp, path)

    def _run(self) -> None:
        interval = max(0.1, min(1.0, self.timeout_s / 4))
        while not self._stop.wait(interval):
            try:
                self._write_heartbeat()
            except OSError:
                pass  # a full or flaky disk must not kill training from here
            if self._armed and time.monotonic() - self._since > self.limit_s:
                self._fire()

    def laggards(self) -> str:
        """Which ranks are behind, from their heartbeat files."""
        beats = {}
        for r in range(self.world):
            try:
                beats[r] = json.loads((self.dir / f"rank-{r:05d}.json").read_text())
            except (OSError, ValueError):
                beats[r] = None
        missing = [r for r, b in beats.items() if b is None]
        known = {r: b for r, b in beats.items() if b is not None}
        lead = max((b["step"] for b in known.values()), default=0)
        behind = sorted(r for r, b in known.items() if b["step"] < lead)
        at_lead = {r: self.PHASES.index(b["phase"]) for r, b in known.items()
                   if b["step"] == lead and b["phase"] in self.PHASES}
        if not behind and len(set(at_lead.values())) > 1:  # same step: the earliest phase is behind
            first = min(at_lead.values())
            behind = sorted(r for r, order in at_lead.items() if order == first)
        parts = []
        if behind:
            parts.append("ranks " + ", ".join(f"{r} (step {known[r]['step']}, {known[r]['phase']})" for r in behind)
                         + " did not arrive; the others wait for them")
        if missing:
            parts.append(f"ranks {missing} never wrote a heartbeat")
        if not parts:
            parts.append("every rank is at step " + str(lead) + " ("
                         + ", ".join(sorted({b['phase'] for b in known.values()})) + "): a collective or I/O stalled")
        return "; ".join(parts)

    def _fire(self) -> None:
        message = (f"watchdog: rank {self.rank} spent more than {self.limit_s:.0f} s in step {self._step} "
                   f"({self._phase}); {self.laggards()}. Python stacks follow; exiting with code {EXIT_HANG} "
                   f"(resume from the last committed checkpoint)")
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            (self.run_dir / "logs").mkdir(exist_ok=True)
            with open(self.run_dir / "logs" / f"hang-rank-{self.rank:05d}.txt", "w") as f:
                f.write(message + "\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            if self.on_fire:
                self.on_fire(message)
            # Give the other ranks' watchdogs time to dump too: once one rank exits, torchrun
            # tears the rest down, and their stacks are the ones that show where they wait.
            deadline = time.monotonic() + min(15.0, self.timeout_s)
            while time.monotonic() < deadline and not all(
                    (self.run_dir / "logs" / f"hang-rank-{r:05d}.txt").exists() for r in range(self.world)):
                time.sleep(0.2)
        finally:
            os._exit(EXIT_HANG)


class NoWatchdog:
    """``train.step_timeout_s: 0``: the same calls, doing nothing."""

    def beat(self, step: int, phase: str, restart: bool = False) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


def start_watchdog(run_dir: Path, rank: int, world: int, timeout_s: float,
                   on_fire: Optional[Callable[[str], None]] = None) -> "Watchdog | NoWatchdog":
    """A running :class:`Watchdog`, or a :class:`NoWatchdog` when ``timeout_s`` is 0 (off)."""
    return Watchdog(run_dir, rank, world, timeout_s, on_fire) if timeout_s > 0 else NoWatchdog()
