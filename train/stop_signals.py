"""Stop requests: SIGUSR1 (Slurm's time-limit warning), SIGTERM (preemption, requeue, scancel),
SIGINT (Ctrl-C) and SIGHUP ask every rank to stop at the next step boundary with a checkpoint.

No stop signal may kill a process of the job before it can act on it, so they travel blocked:
the agent that runs torchrun blocks them first thing, every trainer inherits the mask and
unblocks them only once :meth:`StopRequest.install` has put its handler in place (a signal
sent meanwhile stays pending, then sets the flag). DataLoader workers are forked with the
signals blocked and ignore them: under torchrun and Slurm they are signalled with their
trainer, and a worker killed mid-step used to take its rank down with it.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator, Optional

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopRequest:
    """Set by a stop signal; acted on at the next step boundary that all ranks agree on."""

    _installed: Optional["StopRequest"] = None

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # pending signals arrive now

    def _handler(self, signum, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @classmethod
    def install(cls) -> "StopRequest":
        """The process-wide instance (created on first use)."""
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread, so processes forked or started inside inherit the
    mask; a signal that arrives meanwhile is delivered when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the DataLoader: its trainer decides when to stop, not the worker.

    torch installs a SIGTERM handler in each worker that kills it unless the parent sent it; the
    worker is forked with the signals blocked (:func:`stop_signals_blocked`), so none can land
    before this replaces that handler. The trainer shuts its workers down through their queues.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
