"""Build the model from the recipe: random init from an inline config, or pretrained weights."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import TYPE_CHECKING, Any, Optional

import torch

from train.config.recipe import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def token_ids(tokenizer) -> dict[str, Optional[int]]:
    """The tokenizer's bos/eos/pad ids: what a model trained from scratch with it must carry."""
    return {name: getattr(tokenizer, name) for name in SPECIAL_IDS}


def build_config(cfg: ModelConfig, vocab_size: int, labels: Optional[list[str]] = None,
                 special_ids: Optional[dict[str, Optional[int]]] = None):
    """The transformers config for the recipe's model (no weights loaded), with the label map.

    A model built from an inline config takes the bos/eos ids of its tokenizer (``special_ids``,
    see :func:`token_ids`), not its architecture's defaults (gpt2's eos 50256, llama's 2), so
    ``generate`` stops at the tokenizer's end of text; ids the recipe sets are kept. Its
    ``pad_token_id`` is the tokenizer's only when that is a token of its own: Llama-style
    embeddings never train the row of ``padding_idx``, and the trained tokenizers pad with their
    end-of-text token. Without ``special_ids`` (sizing a model, no tokenizer) it has none. A
    pretrained model keeps its own ids.
    """
    from transformers import AutoConfig

    label_kwargs = {}
    if labels:
        label_kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                        "label2id": {name: i for i, name in enumerate(labels)}}
    if cfg.pretrained:
        return AutoConfig.from_pretrained(cfg.pretrained, **label_kwargs)
    inline = dict(cfg.config or {})
    model_type = inline.pop("model_type")
    inline.setdefault("vocab_size", int(math.ceil(vocab_size / 64) * 64))
    ids = dict(special_ids or dict.fromkeys(SPECIAL_IDS))
    if ids["pad_token_id"] is not None and ids["pad_token_id"] in (ids["eos_token_id"], ids["bos_token_id"]):
        ids["pad_token_id"] = None
    ids = {name: value for name, value in ids.items() if name not in inline}
    return AutoConfig.for_model(model_type, **inline, **ids, **label_kwargs)


def auto_model_class(task: str):
    """``AutoModelForCausalLM`` (causal_lm, sft), ``...ForSequenceClassification`` or ``...ForTokenClassification``."""
    import transformers

    from train.tasks import TASKS

    return getattr(transformers, TASKS[task].auto_class)


def build_model(cfg: ModelConfig, vocab_size: int, seed: int, task: str = "causal_lm",
                labels: Optional[list[str]] = None,
                special_ids: Optional[dict[str, Optional[int]]] = None,
                empty_init: Optional[contextlib.AbstractContextManager] = None) -> torch.nn.Module:
    """Build on CPU in fp32 from the seed: the weights every rank starts from.

    A pretrained encoder gets a freshly initialised head for the task (seeded);
    then layers are frozen and LoRA adapters added as the recipe says. With ``empty_init`` (a
    context such as ``accelerate.init_empty_weights`` or DeepSpeed's ``zero.Init``), only the
    model's structure is built inside it, without reading pretrained weights: the engine fills it
    with the values of a rank that built the weights (see :mod:`train.engines.placement`).
    """
    auto = auto_model_class(task)
    torch.manual_seed(seed)
    config = build_config(cfg, vocab_size, labels, special_ids)
    if empty_init is not None:
        with empty_init:
            model = auto.from_config(config, attn_implementation=cfg.attn_implementation)
        model.tie_weights()  # accelerate's meta patch registers a fresh parameter where transformers tied one
    elif cfg.pretrained:
        model = auto.from_pretrained(cfg.pretrained, config=config, attn_implementation=cfg.attn_implementation,
                                     dtype=torch.float32)
    else:
        model = auto.from_config(config, attn_implementation=cfg.attn_implementation)
    freeze(model, cfg.freeze_embeddings, cfg.freeze_layers)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora, task)
    if cfg.activation_checkpointing:
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if cfg.activation_checkpointing == "selective":
            kwargs["context_fn"] = selective_checkpoint_contexts
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode (dropout off); every rank must start training in train mode
    if cfg.compile:
        for block in transformer_blocks(model):
            block.compile()
    return model


def trainable_summary(model: torch.nn.Module) -> Optional[str]:
    """``model: T of N parameters trainable (P%)`` when some are frozen (LoRA, model.freeze_*)."""
    trainable = sum(param_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(param_numel(p) for p in model.parameters())
    return f"model: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)" \
        if trainable < total else None


def param_numel(p: torch.Tensor) -> int:
    """The parameter's full size, also when ZeRO-3 holds only this rank's partition of it."""
    return int(getattr(p, "ds_numel", p.numel()))


@functools.lru_cache(maxsize=1)
def _expensive_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward", "_efficient_attention_forward")
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


def selective_checkpoint_contexts():
    """``model.activation_checkpointing: selective``: inside a checkpointed block, save what the
    matmuls and attention kernels return (costly to recompute) and recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    expensive = _expensive_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in expensive else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def layer_stack(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer layers in order: the ModuleList as long as ``num_hidden_layers``."""
    n = getattr(model.config, "num_hidden_layers", None)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    return list(stacks[0]) if stacks else []


def freeze(model: PreTrainedModel, embeddings: bool, first_layers: int) -> None:
    """Stop gradients to the input embeddings (a tied head with them) and the first ``first_layers`` layers."""
    modules = list(layer_stack(model)[:first_layers])
    if embeddings:
        modules.append(model.get_input_embeddings())
        positions = [m for name, m in model.named_modules() if name.endswith("position_embeddings")]
        modules += positions
    for module in modules:
        module.requires_grad_(False)


def frozen_digest(model: torch.nn.Module) -> Optional[str]:
    """A digest of the frozen parameters (names, dtypes, shapes and values), ``None`` when all train.

    Checkpoints of a model with frozen parameters hold only the trainable ones; the frozen rest is
    rebuilt from ``model.pretrained`` (or the seed) on resume and export, and must be the same."""
    import xxhash

    frozen = sorted((name, p) for name, p in model.named_parameters() if not p.requires_grad)
    if not frozen:
        return None
    h = xxhash.xxh3_128()
    for name, p in frozen:
        value = p.detach().cpu().contiguous()
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().data)
    return f"xxh3_128:{len(frozen)}:{h.hexdigest()}"


def add_lora(model: torch.nn.Module, lora, task: str) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters; only they (and a classification head) train."""
    from peft import LoraConfig, get_peft_model

    from train.tasks import TASKS

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, modules_to_save=lora.modules_to_save,
                        task_type=TASKS[task].peft_task_type)
    return get_peft_model(model, config)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks named by the model's ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What FSDP shards one by one: the blocks that the model's class names in ``_no_split_modules``,
    or (a class that names none) the layers of its layer stack. A LoRA model: its base model's."""
    # nn.Module.__getattr__ is typed Tensor | Module; hasattr found peft's get_base_model method
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    names = set(getattr(type(base), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names] or layer_stack(base)
