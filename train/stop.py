"""The stop flag set by SIGUSR1 / SIGTERM; installed before the heavy imports of ``python -m train``.

Slurm may signal a job while its trainers are still importing torch; without a handler the
default action of USR1 would kill them. A signal that arrives that early is remembered and
acted on at the first step boundary, like any other.
"""

from __future__ import annotations

import signal
from typing import Optional


class StopRequest:
    """Set by SIGUSR1/SIGTERM; acted on at the next step boundary that all ranks agree on."""

    _installed: Optional["StopRequest"] = None

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @classmethod
    def install(cls) -> "StopRequest":
        """The process-wide instance (created on first use)."""
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed
