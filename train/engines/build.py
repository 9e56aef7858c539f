"""Build the recipe's engine (the one place that maps an engine name to its class)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from train.engines import capabilities
from train.engines.base import Engine
from train.recipe import Recipe


def build_engine(recipe: Recipe, model: torch.nn.Module, device: torch.device, run_dir: Path) -> Engine:
    """The recipe's engine around ``model``, configured from the run directory's engine config."""
    caps = capabilities(recipe.parallel.engine)
    cfg = json.loads((run_dir / caps.config_file).read_text()) if caps.config_file else {}
    if caps.family == "deepspeed":
        from train.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(recipe, model, device, cfg)
    from train.engines.torch_engines import DDPEngine, FSDPEngine

    if recipe.parallel.engine == "fsdp":
        return FSDPEngine(recipe, model, device, cfg)
    return DDPEngine(recipe, model, device)
