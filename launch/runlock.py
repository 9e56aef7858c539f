"""One live launch per run directory: ``lock.json`` names its holder and carries a heartbeat.

Two launches on one run directory would write the same checkpoint steps and rewrite each other's
``metrics.jsonl``. The lock is a file, not ``flock`` (which shared file systems on clusters do not
all honour): created with ``O_EXCL``, it names the holder (host, pid, Slurm job, launch id) and
the holder rewrites its ``heartbeat`` every :data:`HEARTBEAT_S`. A lock whose holder is gone is
taken over: the same host and the pid is dead (``kill -9``), the same Slurm job (a requeued run
comes back while its old lock is still there), or a heartbeat older than :data:`STALE_S` (a host
that died).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from train.rundir import process_alive

LOCK_FILE = "lock.json"
HEARTBEAT_S = 10.0
STALE_S = 90.0


class RunLocked(RuntimeError):
    """Another live launch holds the run directory; ``str()`` says who and what to do."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                   "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self) -> str:
        return json.dumps({**self.me, "heartbeat": time.time()})

    def holder(self) -> Optional[dict]:
        """The lock record; ``{"heartbeat": mtime, "unreadable": True}`` for a file that is no record
        (being replaced, a torn write, or damaged): judged by its age alone."""
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("heartbeat", 0), (int, float)):
            return record
        try:
            return {"heartbeat": self.path.stat().st_mtime, "unreadable": True}
        except FileNotFoundError:
            return None

    def gone(self, holder: dict) -> bool:
        """Whether the holder of ``holder`` (a lock record) can no longer be running."""
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int) and not process_alive(holder["pid"]):
            return True
        if holder.get("slurm_job") and holder.get("slurm_job") == self.me["slurm_job"]:
            return True  # this very job, requeued: its previous run has ended
        return time.time() - float(holder.get("heartbeat", 0)) > STALE_S

    def check(self) -> None:
        """Raise :class:`RunLocked` when a live launch holds the directory (takes nothing)."""
        holder = self.holder()
        if holder is not None and not self.gone(holder):
            raise RunLocked(self.describe(holder))

    def acquire(self) -> "RunLock":
        """Take the lock (or take over a dead holder's) and start the heartbeat; raise :class:`RunLocked`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(self._record())
        except FileExistsError:
            self.check()
            self._write()  # the holder is gone: take over
            time.sleep(0.05)  # two launches taking over at once: the last rename wins, the other sees it
            if (self.holder() or {}).get("token") != self.me["token"]:
                raise RunLocked(self.describe(self.holder() or {})) from None
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        tmp = self.path.with_name(f".{LOCK_FILE}.{self.me['token']}.tmp")
        tmp.write_text(self._record())
        os.replace(tmp, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if (self.holder() or {}).get("token") != self.me["token"]:
                return  # taken over (we were judged dead): leave it to its new holder
            try:
                self._write()
            except OSError:
                pass  # a full disk must not end the run; the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if (self.holder() or {}).get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def describe(self, holder: dict) -> str:
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("unreadable"):
            return (f"{self.path}: unreadable (not a lock record; written {age:.0f} s ago), so it may belong to a "
                    f"launch being started; it is taken over once {STALE_S:.0f} s old: wait {STALE_S - age:.0f} s, "
                    f"or delete it if no launch uses {self.path.parent}")
        where = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        stop = f"scancel {holder['slurm_job']}" if holder.get("slurm_job") else f"kill -TERM {holder.get('pid', '?')}"
        return (f"{self.path.parent}: in use by another launch ({where}{job}; alive {age:.0f} s ago); wait for it "
                f"to end or stop it ({stop}), or choose another run.dir")
