"""Model FLOPs, MFU, GPU/host telemetry, and the rank-0 metrics writer (TensorBoard, jsonl, console)."""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from pathlib import Path
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


class Telemetry:
    """Samples GPU state through NVML in a background thread, or host CPU/RSS without NVML."""

    GPU_FIELDS = ("gpu_util", "gpu_mem_used_gb", "gpu_power_w", "gpu_temp_c", "gpu_sm_clock_mhz",
                  "gpu_throttle")

    def __init__(self, device_index: Optional[int], interval_s: float, warn=print):
        self.interval_s, self.warn = interval_s, warn
        self.samples: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._handle = None
        self.source = "host"
        if device_index is not None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
                self.source = "nvml"
            except Exception as err:  # no driver, no library, no device
                self.warn(f"telemetry: GPU metrics off ({type(err).__name__}); logging host CPU and RSS")
        else:
            self.warn("telemetry: no GPU; logging host CPU utilisation and RSS instead of GPU metrics")
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._psutil = psutil
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def _read_gpu(self) -> dict:
        n, h = self._nvml, self._handle
        return {"gpu_util": float(n.nvmlDeviceGetUtilizationRates(h).gpu),
                "gpu_mem_used_gb": n.nvmlDeviceGetMemoryInfo(h).used / 2**30,
                "gpu_power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "gpu_temp_c": float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                "gpu_sm_clock_mhz": float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
                "gpu_throttle": float(n.nvmlDeviceGetCurrentClocksThrottleReasons(h))}

    def _read_host(self) -> dict:
        return {"host_cpu_util": self._psutil.cpu_percent(interval=None),
                "host_rss_gb": self._proc.memory_info().rss / 2**30}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample = self._read_host()
            if self._handle is not None:
                try:
                    sample.update(self._read_gpu())
                except Exception as err:  # device lost mid-run: say so once, keep training
                    self.warn(f"telemetry: NVML read failed ({type(err).__name__}: {err}); GPU metrics off")
                    self._handle, self.source = None, "host"
            with self._lock:
                self.samples.append(sample)

    def drain(self) -> dict:
        """Mean of the samples since the last call (the last sample's throttle reasons)."""
        with self._lock:
            samples, self.samples = self.samples, []
        if not samples:
            samples = [self._read_host()]
        keys = set().union(*samples)
        out = {k: sum(s[k] for s in samples if k in s) / sum(1 for s in samples if k in s) for k in keys}
        if "gpu_throttle" in out:
            out["gpu_throttle"] = samples[-1].get("gpu_throttle", 0.0)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 1)


def aggregate_ranks(per_rank: list[dict]) -> dict:
    """Per-rank values as ``name/rankN`` plus ``name/min|mean|max`` across ranks."""
    out: dict[str, float] = {}
    for key in sorted(set().union(*per_rank)):
        values = [r[key] for r in per_rank if key in r]
        for i, r in enumerate(per_rank):
            if key in r:
                out[f"{key}/rank{i}"] = r[key]
        out[f"{key}/min"], out[f"{key}/max"] = min(values), max(values)
        out[f"{key}/mean"] = sum(values) / len(values)
    return out


# TensorBoard tag for each metrics.jsonl key (the README lists them).
TB_TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s", "tokens_per_s_per_device": "perf/tokens_per_s_per_device",
    "samples_per_s": "perf/samples_per_s", "step_time_s": "perf/step_time_s",
    "data_wait_s": "perf/data_wait_s", "fwd_bwd_s": "perf/fwd_bwd_s", "optim_s": "perf/optim_s",
    "model_tflops": "perf/model_tflops_per_device", "mfu": "perf/mfu",
    "mem_allocated_gb": "memory/peak_allocated_gb", "mem_reserved_gb": "memory/peak_reserved_gb",
    "skipped_steps": "train/skipped_steps", "nonfinite_steps": "train/nonfinite_steps", "tokens": "train/tokens",
    "epoch": "train/epoch",
    "eval_loss": "eval/loss", "eval_ppl": "eval/perplexity",
}


def tb_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key: :data:`TB_TAGS`, ``eval_x`` → ``eval/x``, ``test_x`` → ``test/x``."""
    if key in TB_TAGS:
        return TB_TAGS[key]
    for prefix in ("eval", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return key


class MetricsWriter:
    """Rank 0's sink: one JSON object per log step in ``metrics.jsonl``, TensorBoard, a console line."""

    FLUSH_EVERY_S = 10.0

    def __init__(self, run_dir: Path, tensorboard: bool, console: bool, max_steps: int, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        self._flushed = time.monotonic()
        self._drop_after(resume_step)
        self.jsonl = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed run wrote after its last checkpoint
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
            recipe = run_dir / "recipe.yaml"
            if recipe.exists():  # the resolved recipe, as TensorBoard text (indented: a code block)
                self.tb.add_text("recipe", "".join(f"    {line}\n" for line in recipe.read_text().splitlines()),
                                 global_step=resume_step)
            # Building ~20 summary protos per log step costs milliseconds: a thread does it.
            self._queue: queue.Queue = queue.Queue()
            self._thread = threading.Thread(target=self._tb_worker, name="tensorboard", daemon=True)
            self._thread.start()
        self.bar = None
        if console:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=resume_step, dynamic_ncols=True, desc="train",
                            mininterval=1.0, smoothing=0.1)

    def _drop_after(self, step: int) -> None:
        """Remove lines past ``step`` (logged after the checkpoint we resume from)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, values: dict) -> None:
        record = {"step": step, "time": round(time.time(), 3),
                  **{k: v for k, v in values.items() if v is not None}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb:
            self._queue.put(record)

    def _tb_worker(self) -> None:
        while (record := self._queue.get()) is not None:
            for key, value in record.items():
                if key not in ("step", "time"):
                    self.tb.add_scalar(tb_tag(key), value, record["step"])
            if time.monotonic() - self._flushed >= self.FLUSH_EVERY_S:  # a flush costs a file sync
                self.tb.flush()
                self._flushed = time.monotonic()

    def progress(self, step: int, values: dict) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{values['loss']:.4f}", "tok/s": f"{values['tokens_per_s']:,.0f}",
                "samples/s": f"{values['samples_per_s']:,.{1 if values['samples_per_s'] < 100 else 0}f}"}
        if values.get("mfu") is not None:
            post["mfu"] = f"{100 * values['mfu']:.1f}%"
        self.bar.n = step
        self.bar.set_postfix(post, refresh=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb:
            self._queue.put(None)
            self._thread.join()
            self.tb.close()
        self.jsonl.close()
