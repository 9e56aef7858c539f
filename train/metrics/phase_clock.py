"""Phase timing of a step (data wait, forward-backward, optimizer) that costs the loop no sync.

On CUDA a phase is a pair of events recorded on the current stream, so it measures the GPU's own
time between the two points: host-side timers would measure only how long the host took to
launch the kernels, and the wait would land in whichever phase first blocks. The events are read
once per log window (:func:`phase_seconds`, after the window's one sync), never per step.
Elsewhere the host clock is the device's clock.
"""

from __future__ import annotations

import time
from typing import Union

import torch

Mark = Union[float, "torch.cuda.Event"]
PHASES = ("data_wait_s", "fwd_bwd_s", "optim_s")


class PhaseClock:
    """Marks points of a step: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device):
        self.events = device.type == "cuda"

    def mark(self) -> Mark:
        if not self.events:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream: the GPU stamps it when it gets there
        return event


def phase_seconds(spans: list[tuple[str, Mark, Mark]]) -> dict[str, float]:
    """Seconds per phase, summed over ``spans`` ((phase, start, end) marks of one clock). On CUDA
    this waits for the last event: call it at a log step, where the loop syncs anyway."""
    totals = dict.fromkeys(PHASES, 0.0)
    if spans and not isinstance(spans[-1][2], float):
        spans[-1][2].synchronize()  # the stream runs in order: every earlier event is stamped too
    for phase, start, end in spans:
        if isinstance(start, float) or isinstance(end, float):
            totals[phase] += float(end) - float(start)  # type: ignore[arg-type]  # both host times
        else:
            totals[phase] += start.elapsed_time(end) / 1e3  # milliseconds
    return totals
