"""Model FLOPs per token, the devices' peak TFLOP/s, and MFU."""

from __future__ import annotations

import re
from typing import Optional

import torch

from train.model import param_numel

# Dense (not sparse) peak TFLOP/s per device by compute dtype: fp32 is true FP32 (CUDA cores),
# tf32 the TF32 tensor cores that fp32 matmuls use with ``parallel.tf32`` (half the bf16 peak).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.8, "fp32": 60.0},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.8, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Look a device name (as CUDA reports it) up in :data:`PEAK_TFLOPS`; ``None`` if unknown."""
    name = device_name.upper()
    if "H100" in name:
        key = "H100 PCIe" if "PCIE" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
    else:
        key = next((k for k in sorted(PEAK_TFLOPS, key=len, reverse=True)  # whole words: an L40 is no L4
                    if re.search(rf"\b{re.escape(k.upper())}\b", name)), None)
    return PEAK_TFLOPS.get(key, {}).get(precision) if key else None


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6 × non-embedding parameters (LM head counted even when tied) + attention 12·L·H·d·T.

    Call on the unsharded model. Embedding tables (token and learned positions) do
    no matmul work, so they are excluded; a tied LM head does, so it is added back.
    """
    cfg = model.config
    params = {id(p): param_numel(p) for p in model.parameters()}
    embeddings = {id(m.weight): param_numel(m.weight) for m in model.modules()
                  if isinstance(m, torch.nn.Embedding)}
    n = sum(params.values()) - sum(embeddings.values())
    head = model.get_output_embeddings()
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
