"""GPU telemetry through NVML in a background thread (host CPU and RSS where there is no GPU)."""

from __future__ import annotations

import os
import threading
from typing import Optional


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
