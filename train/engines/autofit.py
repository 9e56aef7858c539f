"""Auto-fit: the engine, offload, activation checkpointing and micro-batch a run's memory plan
allows, chosen by arithmetic before anything launches (never by trial runs or out-of-memory errors).

Pure, like :mod:`train.engines.memory_plan`, whose :func:`estimate` it asks. The order of
preference is the least communication and recomputation first:

1. the engine, in the order ``ddp → zero1 → zero2 → fsdp → zero3`` (each sends more per step than
   the one before: DDP one all-reduce of the gradients; ZeRO-1/2 a reduce-scatter and an
   all-gather; FSDP and ZeRO-3 gather the weights again in forward and backward);
2. then the same engines with activation checkpointing, ``selective`` before ``true`` (more
   recomputation each);
3. then, last, the offloading engines (``fsdp``, ``zero1..3``) with ``parallel.offload`` (every
   step then crosses PCIe), again without checkpointing first.

Only the settings the recipe leaves to ``auto`` vary; the others stay as given. The first setup
whose plan fits at micro-batch 1 is chosen; with ``train.micro_batch_size: auto`` it then takes
the largest micro-batch that divides the global batch over the ranks (accumulation = global ÷
(micro × ranks), so the global batch is kept) and still fits. "Fits" is the plan's own margin:
the total at most ``HEADROOM`` (90 %) of the GPU's memory, the rest left to the allocator's cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from train.engines.memory_plan import GB, HEADROOM, OFFLOADABLE, Estimate, ModelSizes, Setup, estimate

ENGINE_ORDER = ("ddp", "zero1", "zero2", "fsdp", "zero3")
"""Least communication first (see the module docstring)."""
CHECKPOINTING_ORDER: tuple[Union[bool, str], ...] = (False, "selective", True)
"""Least recomputation first."""


@dataclass(frozen=True)
class Auto:
    """Which settings auto-fit chooses (the others are the base setup's)."""

    engine: bool = False
    offload: bool = False
    checkpointing: bool = False
    micro_batch: bool = False

    def __bool__(self) -> bool:
        return self.engine or self.offload or self.checkpointing or self.micro_batch


@dataclass(frozen=True)
class Candidate:
    """One setup auto-fit looked at, and what became of it."""

    setup: Setup
    estimate: Optional[Estimate]
    """Its plan (``None`` when a rule, not memory, ruled it out)."""
    verdict: str
    """``chosen``, or why not: the memory arithmetic, or the rule that excludes it."""

    @property
    def chosen(self) -> bool:
        return self.verdict == "chosen"


@dataclass(frozen=True)
class Fit:
    """The outcome: the chosen setup (``None`` when nothing fits) and every candidate looked at."""

    chosen: Optional[Setup]
    candidates: tuple[Candidate, ...]
    gpu_bytes: float
    params: int = 0
    """The model's parameters (for the table's header)."""

    @property
    def rejected(self) -> list[Candidate]:
        return [c for c in self.candidates if not c.chosen]


def micro_batches(global_batch: int, world: int) -> list[int]:
    """Micro-batch sizes that keep ``global_batch`` on ``world`` ranks, largest first (empty when
    the global batch does not divide over the ranks at all)."""
    if global_batch < 1 or world < 1 or global_batch % world:
        return []
    per_rank = global_batch // world
    return [mb for mb in range(per_rank, 0, -1) if per_rank % mb == 0]


def ladder(base: Setup, auto: Auto) -> list[Setup]:
    """The setups auto-fit tries, in the order of preference (see the module docstring)."""
    offloads = (False, True) if auto.offload else (base.offload,)
    ckpts = CHECKPOINTING_ORDER if auto.checkpointing else (base.activation_checkpointing,)
    engines = ENGINE_ORDER if auto.engine else (base.engine,)
    out = []
    for offload in offloads:
        for ckpt in ckpts:
            for engine in engines:
                if offload and engine not in OFFLOADABLE:
                    continue
                out.append(dataclasses.replace(base, engine=engine, offload=offload, activation_checkpointing=ckpt))
    return out


def _too_big(e: Estimate, gpu_bytes: float) -> str:
    return (f"needs {e.total / GB:.2f} GB per GPU at micro-batch {e.setup.micro_batch}, more than {HEADROOM:.0%} "
            f"of {gpu_bytes / GB:.3g} GB")


def choose(m: ModelSizes, base: Setup, auto: Auto, gpu_bytes: float, global_batch: int,
           excluded: Optional[dict[str, str]] = None, host_bytes: Optional[float] = None) -> Fit:
    """Walk :func:`ladder` and pick the first setup that fits (see the module docstring).

    ``excluded``: engine → why the recipe rules it out (LoRA, ``torch.compile``, a resume from
    another checkpoint format, DeepSpeed not installed); those are listed, not estimated.
    ``host_bytes``: one node's memory, when known: a setup whose offloaded state and rank 0's
    build copy pass :data:`HEADROOM` of it is rejected too (the OOM killer leaves no error)."""
    excluded = excluded or {}
    sizes = micro_batches(global_batch, base.world_size) if auto.micro_batch else [base.micro_batch]
    if not sizes:  # the global batch does not divide over the ranks: nothing to try
        return Fit(None, (), gpu_bytes, m.params)
    candidates: list[Candidate] = []
    for setup in ladder(base, auto):
        if setup.engine in excluded:
            candidates.append(Candidate(setup, None, excluded[setup.engine]))
            continue
        smallest = _with_micro(setup, sizes[-1], global_batch)
        first = estimate(m, smallest)
        if not first.fits(gpu_bytes):
            candidates.append(Candidate(smallest, first, _too_big(first, gpu_bytes)))
            continue
        if host_bytes and first.host_per_node > HEADROOM * host_bytes:
            candidates.append(Candidate(smallest, first, f"needs {first.host_per_node / GB:.1f} GB of host memory per "
                                                         f"node, more than {HEADROOM:.0%} of {host_bytes / GB:.3g} GB"))
            continue
        for mb in sizes:  # largest first: the first that fits is chosen; the larger ones are listed
            trial = _with_micro(setup, mb, global_batch)
            e = estimate(m, trial)
            if e.fits(gpu_bytes):
                candidates.append(Candidate(trial, e, "chosen"))
                return Fit(trial, tuple(candidates), gpu_bytes, m.params)
            candidates.append(Candidate(trial, e, _too_big(e, gpu_bytes)))
    return Fit(None, tuple(candidates), gpu_bytes, m.params)


def _with_micro(setup: Setup, micro: int, global_batch: int) -> Setup:
    """``setup`` at micro-batch ``micro``, its accumulation keeping ``global_batch``."""
    return dataclasses.replace(setup, micro_batch=micro, accumulation=max(1, global_batch // (micro * setup.world_size)))


def describe_setup(s: Setup) -> str:
    """``zero2, micro-batch 4 × accumulation 2, selective checkpointing, offload``."""
    ckpt = {False: "", True: ", checkpointing", "selective": ", selective checkpointing"}[s.activation_checkpointing]
    return f"{s.engine}, micro-batch {s.micro_batch} × accumulation {s.accumulation}{ckpt}{', offload' if s.offload else ''}"


def fit_table(fit: Fit) -> str:
    """What ``shardforge plan`` prints for auto-fit: the choice, then each candidate it rejected
    (memory per GPU, bytes each GPU sends per step, why), in the order tried."""
    world = fit.candidates[0].setup.world_size if fit.candidates else 0
    head = (f"# auto-fit on {world} GPUs of {fit.gpu_bytes / GB:.3g} GB ({fit.params / 1e9:.3g}B parameters; "
            f"fits = total ≤ {HEADROOM:.0%}; order: {', '.join(ENGINE_ORDER)}, then + checkpointing, then + offload)")
    lines = [head, "#   chosen: " + (describe_setup(fit.chosen) if fit.chosen else "nothing fits")]
    if fit.rejected:
        lines.append(f"#   {'rejected':<66} {'GB/GPU':>7} {'comm GB':>8}  why")
    for c in fit.rejected:
        mem = f"{c.estimate.total / GB:7.2f}" if c.estimate else f"{'-':>7}"
        comm = f"{c.estimate.comm_per_step / GB:8.2f}" if c.estimate else f"{'-':>8}"
        lines.append(f"#   {describe_setup(c.setup):<66} {mem} {comm}  {c.verdict}")
    return "\n".join(lines)
