"""Build the engine configs the launcher writes into the run directory: deepspeed.json, fsdp.json."""

from __future__ import annotations

from typing import Optional

from train.engines import capabilities
from train.recipe import Recipe, grad_accum_steps, world_size

_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def fsdp_config(recipe: Recipe) -> dict:
    """FSDP2: mixed-precision policy, resharding and offload. ``shard_modules: null``: each rank
    shards the model's own transformer blocks (``train.model.shard_units``; `shardforge plan`
    names them), so writing this file needs no transformers import."""
    return {
        "param_dtype": _DTYPE_NAMES[recipe.parallel.precision],
        "reduce_dtype": "float32",  # gradients are reduced in fp32 whatever the compute dtype
        "reshard_after_forward": True,
        "cpu_offload": recipe.parallel.offload,
        "shard_modules": None,
    }


def deepspeed_config(recipe: Recipe) -> dict:
    """DeepSpeed ZeRO config; ``train_batch_size`` = micro × accumulation × world size."""
    t, par, o = recipe.train, recipe.parallel, recipe.optim
    stage = capabilities(par.engine).zero_stage
    bucket = par.reduce_bucket_mb * 2**20 // (4 if par.precision == "fp32" else 2)  # DeepSpeed counts elements
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": bucket}
    if stage < 3:
        zero.update(allgather_bucket_size=bucket, reduce_scatter=True)
    else:
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=100_000,
                    stage3_gather_16bit_weights_on_model_save=False)
    if par.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg: dict = {
        "train_batch_size": t.micro_batch_size * grad_accum_steps(recipe) * world_size(recipe),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
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
    if par.offload:  # offloaded optimizer state needs DeepSpeed's CPU AdamW
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
