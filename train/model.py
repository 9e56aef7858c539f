"""Build the model from the recipe: random init from an inline config, or pretrained weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from train.recipe import ModelConfig


def build_config(cfg: ModelConfig, vocab_size: int):
    """The transformers config for the recipe's model (no weights loaded)."""
    from transformers import AutoConfig

    if cfg.pretrained:
        return AutoConfig.from_pretrained(cfg.pretrained)
    inline = dict(cfg.config or {})
    model_type = inline.pop("model_type")
    inline.setdefault("vocab_size", int(math.ceil(vocab_size / 64) * 64))
    return AutoConfig.for_model(model_type, **inline)


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    """Build on CPU in fp32 with the same seed on every rank (identical init before sharding)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if cfg.pretrained:
        model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, attn_implementation=cfg.attn_implementation,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(build_config(cfg, vocab_size),
                                                 attn_implementation=cfg.attn_implementation)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.compile:
        for block in transformer_blocks(model):
            block.compile()
    return model


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks named by the model's ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of the packed batch."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
