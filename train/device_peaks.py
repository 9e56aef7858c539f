"""The devices' dense peak TFLOP/s, from NVIDIA's datasheets: pure data, no torch.

A core module (not ``train.metrics``) because two rooms read it: ``train.metrics.flops`` for
MFU and ``train.engines.scaling`` for its predictions, and ``tests/test_layout.py`` lets
neither of those rooms import the other."""

from __future__ import annotations

import re
from typing import Optional

# Dense (not sparse) peak TFLOP/s per device by compute dtype, from NVIDIA's datasheets, which print
# the tensor-core figures with sparsity (twice these) and footnote it: fp32 is true FP32 (CUDA cores),
# tf32 the TF32 tensor cores that fp32 matmuls use with ``parallel.tf32`` (half the bf16 peak).
# Most specific first: a device takes the first entry whose every word is a word of its CUDA name.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "GB200": {"bf16": 2500.0, "fp16": 2500.0, "tf32": 1250.0, "fp32": 80.0},   # GB200 NVL72, per GPU
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},    # HGX B200, per GPU
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},      # its GPU is an H100/H200 SXM
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.8, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},       # SXM
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.8, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},       # SXM ("H100 80GB HBM3")
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},       # SXM and PCIe alike
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},  # AWS-only part: no NVIDIA datasheet; unverified
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "V100S": {"fp16": 130.0, "fp32": 16.4},
    "V100 PCIe": {"fp16": 112.0, "fp32": 14.0},
    "V100": {"fp16": 125.0, "fp32": 15.7},                                      # SXM2
}


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Look a device name (as CUDA reports it: ``NVIDIA H100 80GB HBM3``, ``NVIDIA GH200 480GB``,
    ``Tesla V100-PCIE-32GB``) up in :data:`PEAK_TFLOPS`; ``None`` if unknown. Whole words only: an
    L40 is no L4, a GH200 no H200 SXM."""
    words = set(re.findall(r"[A-Z0-9]+", device_name.upper()))
    key = next((k for k in PEAK_TFLOPS if set(k.upper().split()) <= words), None)
    return PEAK_TFLOPS[key].get(precision) if key else None
