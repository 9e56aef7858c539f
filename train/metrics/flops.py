"""Model FLOPs per token and MFU (the devices' peak TFLOP/s: :mod:`train.device_peaks`)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from train.model import param_numel


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6 × non-embedding parameters (LM head counted even when tied) + attention 12·L·H·d·T.

    Call on the unsharded model. Embedding tables (token and learned positions) do
    no matmul work, so they are excluded; a tied LM head does, so it is added back.
    """
    cfg: Any = model.config  # a transformers config: its fields depend on the architecture
    params = {id(p): param_numel(p) for p in model.parameters()}
    embeddings = {id(m.weight): param_numel(m.weight) for m in model.modules()
                  if isinstance(m, torch.nn.Embedding)}
    n = sum(params.values()) - sum(embeddings.values())
    head = model.get_output_embeddings()  # type: ignore[operator]  # nn.Module.__getattr__ stub: Tensor | Module
    if head is not None and id(head.weight) in embeddings:
        n += param_numel(head.weight)
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 6 * n + 12 * layers * heads * head_dim * seq_len


def mfu(tokens_per_s_per_device: float, flops_token: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1]; ``None`` when the peak is unknown or the value impossible."""
    if not peak:
        return None
    value = tokens_per_s_per_device * flops_token / (peak * 1e12)
    return value if 0 <= value <= 1 else None
