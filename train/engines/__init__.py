"""The data-parallel engines and what each can do.

Callers ask an engine's :class:`Capabilities` (``capabilities(recipe.parallel.engine)``), never
its name: this table imports nothing, so the launcher's checks read it too. The engine classes
live in :mod:`train.engines.torch_engines` (DDP, FSDP2) and :mod:`train.engines.deepspeed_engine`
(ZeRO 1/2/3); :func:`train.engines.build.build_engine` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional


@dataclass(frozen=True)
class Capabilities:
    family: Literal["torch", "deepspeed"]
    """Who runs the step: torch (DDP, FSDP2, DCP checkpoints) or DeepSpeed (``deepspeed.initialize``)."""
    config_file: Optional[str]
    """The engine config the launcher writes into the run directory (``None``: none needed)."""
    skip_nonfinite: bool
    """Can skip a non-finite optimizer update on the device (DeepSpeed steps before the norm is known)."""
    async_save: bool
    """Can write a periodic checkpoint in a background thread while training goes on."""
    lora: bool
    """LoRA adapters are supported and tested."""
    offload: bool
    """Can offload optimizer state (and parameters) to CPU memory."""
    zero_stage: Optional[int]
    """DeepSpeed ZeRO stage (``None`` for the torch engines)."""
    checkpoint_format: Literal["dcp", "deepspeed"]
    """How the model state sits in a checkpoint: export reads it offline, without a process group."""


_TORCH: dict[str, Any] = dict(family="torch", skip_nonfinite=True, async_save=True, lora=True, zero_stage=None,
              checkpoint_format="dcp")
_ZERO: dict[str, Any] = dict(family="deepspeed", config_file="deepspeed.json", skip_nonfinite=False, async_save=False,
             lora=False, offload=True, checkpoint_format="deepspeed")
CAPABILITIES: dict[str, Capabilities] = {
    "ddp": Capabilities(config_file=None, offload=False, **_TORCH),
    "fsdp": Capabilities(config_file="fsdp.json", offload=True, **_TORCH),
    "zero1": Capabilities(zero_stage=1, **_ZERO),
    "zero2": Capabilities(zero_stage=2, **_ZERO),
    "zero3": Capabilities(zero_stage=3, **_ZERO),
}
"""Engine name (``parallel.engine``) → what it can do."""

ENGINE_CONFIG_FILES = tuple(sorted({c.config_file for c in CAPABILITIES.values() if c.config_file}))
"""Every engine config file name a run directory may hold."""


def capabilities(engine: str) -> Capabilities:
    return CAPABILITIES[engine]


def resumes_from(saved: str, now: str) -> Optional[str]:
    """``None`` when engine ``now`` can resume checkpoints written by ``saved``; else why not. DCP
    checkpoints move between DDP and FSDP; DeepSpeed's between ZeRO-1 and ZeRO-2, and ZeRO-3's
    only to ZeRO-3 (its files are laid out per parameter partition: DeepSpeed 0.19's load of a
    ZeRO-2 checkpoint under ZeRO-3 finds no model-state file, universal conversion or not)."""
    if saved not in CAPABILITIES or now not in CAPABILITIES:
        return None  # an unknown name: the ranks' own checks say so
    was, new = CAPABILITIES[saved], CAPABILITIES[now]
    if was.checkpoint_format != new.checkpoint_format:
        return f"{was.checkpoint_format} format, which {now!r} cannot read"
    if was.family == "deepspeed" and (was.zero_stage == 3) != (new.zero_stage == 3):
        return f"ZeRO-{was.zero_stage}'s layout, which ZeRO-{new.zero_stage} cannot load"
    return None


def engines_that(**wanted: object) -> list[str]:
    """Engine names whose capabilities match, e.g. ``engines_that(async_save=True)`` → ``['ddp', 'fsdp']``."""
    return [name for name, caps in CAPABILITIES.items()
            if all(getattr(caps, key) == value for key, value in wanted.items())]
