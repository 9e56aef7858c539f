"""Build the recipe's model and engine (the one place that maps an engine name to its class)."""

from __future__ import annotations

from typing import Optional

import torch

from train.engines import capabilities
from train.engines.base import Engine
from train.engines.placement import InitialWeights
from train.config.recipe import Recipe


def build_engine(recipe: Recipe, model: torch.nn.Module, device: torch.device, *, accum: int,
                 cfg: Optional[dict] = None, weights: Optional[InitialWeights] = None) -> Engine:
    """The recipe's engine around ``model``, accumulating ``accum`` micro-batches per optimizer step,
    configured from ``cfg`` (:func:`train.engines.config.checked_engine_config`)."""
    weights = weights or InitialWeights()
    cfg = cfg or {}
    if capabilities(recipe.parallel.engine).family == "deepspeed":
        from train.engines.deepspeed_engine import DeepSpeedEngine

        if cfg.get("gradient_accumulation_steps") != accum:
            raise ValueError(f"deepspeed config accumulates {cfg.get('gradient_accumulation_steps')} micro-batches, "
                             f"the run {accum}")
        return DeepSpeedEngine(recipe, model, device, accum=accum, cfg=cfg, weights=weights)
    from train.engines.torch_engines import DDPEngine, FSDPEngine

    if recipe.parallel.engine == "fsdp":
        return FSDPEngine(recipe, model, device, accum=accum, cfg=cfg, weights=weights)
    return DDPEngine(recipe, model, device, accum=accum, weights=weights)
