"""Build the recipe's model and engine (the one place that maps an engine name to its class)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from train.engines import capabilities
from train.engines.base import Engine
from train.engines.placement import InitialWeights
from train.recipe import Recipe


def engine_config(recipe: Recipe, run_dir: Path) -> dict:
    """The engine config the launcher wrote into the run directory (``{}`` for DDP)."""
    caps = capabilities(recipe.parallel.engine)
    return json.loads((run_dir / caps.config_file).read_text()) if caps.config_file else {}


def build_engine(recipe: Recipe, model: torch.nn.Module, device: torch.device, cfg: Optional[dict] = None,
                 weights: Optional[InitialWeights] = None) -> Engine:
    """The recipe's engine around ``model``, configured from ``cfg`` (the run directory's engine config)."""
    weights = weights or InitialWeights()
    cfg = cfg or {}
    if capabilities(recipe.parallel.engine).family == "deepspeed":
        from train.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(recipe, model, device, cfg, weights)
    from train.engines.torch_engines import DDPEngine, FSDPEngine

    if recipe.parallel.engine == "fsdp":
        return FSDPEngine(recipe, model, device, cfg, weights)
    return DDPEngine(recipe, model, device, weights)
