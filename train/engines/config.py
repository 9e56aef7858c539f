"""The engine configs of a recipe (deepspeed.json, fsdp.json), built in this one place: the
launcher writes them into the run directory as a record, and each rank builds them again from the
``recipe.yaml`` it reads and refuses a run directory whose record says otherwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from train.engines import capabilities
from train.config.recipe import Recipe, grad_accum_steps, micro_batch, offloaded, world_size
from train.config.typed import RecipeError

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""``parallel.precision`` → the torch dtype's name (the one map; ``train.engines.base.DTYPES`` is
built from it). Importing this module needs no torch."""


def fsdp_config(recipe: Recipe) -> dict:
    """FSDP2: mixed-precision policy, resharding and offload. ``shard_modules: null``: each rank
    shards the model's own transformer blocks (``train.model.shard_units``; `shardforge plan`
    names them), so writing this file needs no transformers import."""
    return {
        "param_dtype": DTYPE_NAMES[recipe.parallel.precision],
        "reduce_dtype": DTYPE_NAMES[recipe.parallel.reduce_dtype or "fp32"],  # fp32 unless the recipe says
        "reshard_after_forward": True,
        "cpu_offload": offloaded(recipe),
        "shard_modules": None,
    }


def deepspeed_config(recipe: Recipe) -> dict:
    """DeepSpeed ZeRO config; ``train_batch_size`` = micro × accumulation × world size."""
    par, o = recipe.parallel, recipe.optim
    stage = capabilities(par.engine).zero_stage
    if stage is None:  # only the ZeRO engines write deepspeed.json (engine_configs)
        raise ValueError(f"deepspeed_config: {par.engine} is not a DeepSpeed ZeRO engine")
    bucket = par.reduce_bucket_mb * 2**20 // (4 if par.precision == "fp32" else 2)  # DeepSpeed counts elements
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": bucket}
    if stage < 3:
        zero.update(allgather_bucket_size=bucket, reduce_scatter=True)
    else:
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=100_000,
                    stage3_gather_16bit_weights_on_model_save=False)
    if offloaded(recipe):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg: dict = {
        "train_batch_size": micro_batch(recipe) * grad_accum_steps(recipe) * world_size(recipe),
        "train_micro_batch_size_per_gpu": micro_batch(recipe),
        "gradient_accumulation_steps": grad_accum_steps(recipe),
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": par.precision == "bf16"},
        "fp16": {"enabled": par.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if par.reduce_dtype is not None:
        cfg["communication_data_type"] = par.reduce_dtype  # DeepSpeed's names are the recipe's
    if offloaded(recipe):  # offloaded optimizer state needs DeepSpeed's CPU AdamW
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas),
                                                        "eps": o.eps, "weight_decay": o.weight_decay}}
    return cfg


def engine_configs(recipe: Recipe) -> dict[str, dict]:
    """File name → config for the recipe's engine (empty for DDP)."""
    name = capabilities(recipe.parallel.engine).config_file
    if name == "fsdp.json":
        return {name: fsdp_config(recipe)}
    if name == "deepspeed.json":
        return {name: deepspeed_config(recipe)}
    return {}


def describe(configs: dict[str, dict]) -> Optional[str]:
    import json

    return "\n".join(f"# {name}\n{json.dumps(cfg, indent=2)}" for name, cfg in configs.items()) or None


class EngineConfigMismatch(RecipeError):
    """The run directory's engine config is not the one its recipe.yaml gives."""

    def __init__(self, problem: str):
        super().__init__(None, [problem])


def checked_engine_config(recipe: Recipe, run_dir: Path) -> dict:
    """The engine config for ``recipe`` (``{}`` for DDP), checked against the record the launcher
    wrote into ``run_dir``: an edited or stale file is refused, naming the first key that differs."""
    configs = engine_configs(recipe)
    if not configs:
        return {}
    (name, cfg), = configs.items()
    path = run_dir / name
    try:
        written = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EngineConfigMismatch(f"{path}: unreadable ({str(err).splitlines()[0][:120]}); start the run with "
                                   f"`shardforge run`, which writes it from the recipe") from None
    if written != cfg:
        key = next(iter(_differences(written, cfg)), "?")
        raise EngineConfigMismatch(
            f"{path}: {key} is {_lookup(written, key)!r} there, but recipe.yaml gives {_lookup(cfg, key)!r}; the "
            f"engine config is built from the recipe (change the recipe, not this file), and `shardforge run` "
            f"writes it anew")
    return cfg


def _differences(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from _differences(a.get(key, _MISSING), b.get(key, _MISSING), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip(".")


def _lookup(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part, _MISSING) if isinstance(cfg, dict) else _MISSING
    return "(absent)" if cfg is _MISSING else cfg


_MISSING = object()
