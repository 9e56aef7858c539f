"""This machine's GPUs as the launcher sees them: through NVML, not torch (importing torch costs
seconds), narrowed by ``CUDA_VISIBLE_DEVICES`` as CUDA narrows them."""

from __future__ import annotations

import os
from typing import Optional


def nvml_query(query, default):
    """``query(pynvml)`` between NVML's init and shutdown; ``default`` without a driver or library
    (a CPU machine) or when the query fails."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return query(pynvml)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return default


def local_gpus() -> int:
    """GPUs this process may use, from NVML and CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    count = nvml_query(lambda nvml: nvml.nvmlDeviceGetCount(), 0)
    return min(count, len(visible.split(","))) if visible else count


def visible_nvml_handles(nvml, visible: Optional[str]) -> list:
    """NVML handles of the GPUs ``CUDA_VISIBLE_DEVICES`` (``visible``) leaves: entries by UUID
    (``GPU-…``/``MIG-…``, or a unique prefix of a GPU's, as CUDA accepts) or by index, up to the
    first CUDA would stop at. An index is taken as NVML's, which numbers by PCI bus: CUDA's
    default order (fastest first) can differ on a node of mixed GPUs."""
    count = nvml.nvmlDeviceGetCount()
    gpus = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    if visible is None:
        return gpus
    out = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit() and int(entry) < count:
            out.append(gpus[int(entry)])
            continue
        if not entry.startswith(("GPU-", "MIG-")):
            break
        try:
            out.append(nvml.nvmlDeviceGetHandleByUUID(entry))
            continue
        except Exception:  # noqa: BLE001 - not a whole UUID: a prefix of one
            matches = [h for h in gpus if str(nvml.nvmlDeviceGetUUID(h)).startswith(entry)]
        if len(matches) != 1:
            break
        out.append(matches[0])
    return out


def local_gpu_bytes() -> Optional[float]:
    """Memory of the smallest GPU this machine lets this process use, ``None`` without one."""
    if local_gpus() == 0:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return nvml_query(lambda nvml: float(min(usable_bytes(nvml, h) for h in visible_nvml_handles(nvml, visible))), None)


def usable_bytes(nvml, handle) -> int:
    """A GPU's memory as CUDA (and the ranks' check, through torch) counts it: NVML's total less
    what the driver reserves (NVML's v2 memory info; about 0.5 GB on an H100), else the total."""
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        return int(info.total - info.reserved)
    except Exception:  # noqa: BLE001 - an older driver or nvidia-ml-py without v2
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
