"""The recipe's ``checkpoint`` and ``logging`` sections (what a run writes), beside :mod:`train.config.recipe`'s other sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N steps (0: off)."""
    every_minutes: float = 0.0
    """Save every N minutes of wall clock (0: off)."""
    at_end: bool = True
    """Save when training finishes."""
    keep_last: int = 2
    """Keep the newest N committed checkpoints."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of N (0: none)."""
    resume: str = "auto"
    """``auto`` (latest committed checkpoint), ``never``, or a checkpoint path."""
    async_save: bool = False
    """ddp / fsdp: periodic saves copy the state to CPU memory and write it in a background thread
    while training goes on; the checkpoint commits (manifest) once every rank's write is done.
    The end-of-run, signal and best-checkpoint saves stay synchronous."""
    on_error: Literal["stop", "continue"] = "stop"
    """A save that fails (disk full, I/O error) leaves the previous checkpoint as the latest; then
    ``stop`` ends the run with the error (exit 2), ``continue`` logs it and trains on (a failed
    end-of-run or stop save still ends the run with exit 2: nothing else would hold its end)."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files under ``<run dir>/tensorboard``."""
    console: bool = True
    """Show a progress line on rank 0."""
    peak_tflops: Optional[float] = None
    """Per-device peak TFLOP/s for MFU; ``None`` looks the device up in a table."""
    telemetry_interval_s: float = 1.0
    """Seconds between NVML (or host) telemetry samples."""
