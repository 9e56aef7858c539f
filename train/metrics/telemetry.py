"""GPU telemetry through NVML in a background thread (host CPU and RSS where there is no GPU)."""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger("shardforge")


def nvml_ids(device) -> list[str]:
    """What NVML knows ``device`` (a CUDA ``torch.device``) by, most precise first: its UUID (``GPU-``,
    or ``MIG-`` for a MIG slice) and its PCI bus id (``domain:bus:device.0``). CUDA numbers devices
    after ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` (fastest first by default), NVML all of
    them by PCI bus: a rank's CUDA index is no NVML index."""
    import torch

    props = torch.cuda.get_device_properties(device)
    ids = []
    uuid = str(getattr(props, "uuid", "") or "")  # torch prints it bare: 8-4-4-4-12 hex digits
    if uuid:
        ids += [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        ids.append(f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0")
    return ids


def nvml_handle(nvml, ids: list[str]):
    """The NVML handle of the first of ``ids`` (see :func:`nvml_ids`) that NVML finds."""
    for ident in ids:
        try:
            if ident.startswith(("GPU-", "MIG-")):
                return nvml.nvmlDeviceGetHandleByUUID(ident)
            return nvml.nvmlDeviceGetHandleByPciBusId(ident)
        except Exception:  # noqa: BLE001 - NVMLError_NotFound and friends: try the next name
            continue
    raise LookupError(f"NVML finds no device named {' or '.join(ids) or '(no UUID or PCI id from CUDA)'}")


def _gpu_readers(n, h) -> dict:
    """One reader per GPU field, each called on its own. The temperature and the clock-event
    reasons use the current calls where the library has them (``nvmlDeviceGetTemperatureV``,
    ``nvmlDeviceGetCurrentClocksEventReasons``), the deprecated ones before that."""
    use_v = [getattr(n, "nvmlDeviceGetTemperatureV", None) is not None]  # until the driver refuses it once

    def temperature() -> float:
        if use_v[0]:
            try:
                return float(n.nvmlDeviceGetTemperatureV(h, n.NVML_TEMPERATURE_GPU))
            except Exception:  # noqa: BLE001 - a driver older than the v2 call: the old one from now on
                use_v[0] = False
        return float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))

    reasons = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        n.nvmlDeviceGetCurrentClocksThrottleReasons
    return {"gpu_util": lambda: float(n.nvmlDeviceGetUtilizationRates(h).gpu),
            "gpu_mem_used_gb": lambda: n.nvmlDeviceGetMemoryInfo(h).used / 2**30,
            "gpu_power_w": lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "gpu_temp_c": temperature,
            "gpu_sm_clock_mhz": lambda: float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
            "gpu_throttle": lambda: float(reasons(h))}


class Telemetry:
    """Samples GPU state through NVML in a background thread, or host CPU/RSS without NVML."""

    GPU_FIELDS = ("gpu_util", "gpu_mem_used_gb", "gpu_power_w", "gpu_temp_c", "gpu_sm_clock_mhz",
                  "gpu_throttle")

    def __init__(self, device, interval_s: float):
        """``device``: this rank's CUDA ``torch.device``, found in NVML by UUID or PCI bus id
        (:func:`nvml_ids`); ``None`` without a GPU."""
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._readers: dict = {}
        self.source = "host"
        if device is not None:
            try:
                import pynvml

                ids = nvml_ids(device)
                pynvml.nvmlInit()
                self._readers = _gpu_readers(pynvml, nvml_handle(pynvml, ids))
                self.source = "nvml"
            except Exception as err:  # no driver, no library, no device
                logger.warning(f"telemetry: GPU metrics off ({type(err).__name__}: {err}); logging host CPU and RSS")
        else:
            logger.info("telemetry: no GPU; logging host CPU utilisation and RSS instead of GPU metrics")
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._psutil = psutil
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def _read_gpu(self) -> dict:
        """Every field that reads; a field that fails is said once and left out from then on (a
        board without power readings keeps its other fields). When none reads, the device is gone."""
        out, failed = {}, {}
        for key, read in list(self._readers.items()):
            try:
                out[key] = read()
            except Exception as exc:  # noqa: BLE001 - NVMLError_NotSupported, GPU lost, ...
                failed[key] = exc
        if failed and not out:
            key, err = next(iter(failed.items()))
            raise RuntimeError(f"{type(err).__name__}: {err}")
        for key, err in failed.items():
            logger.warning(f"telemetry: NVML cannot read {key} ({type(err).__name__}: {err}); left out")
            del self._readers[key]
        return out

    def _read_host(self) -> dict:
        return {"host_cpu_util": self._psutil.cpu_percent(interval=None),
                "host_rss_gb": self._proc.memory_info().rss / 2**30}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample = self._read_host()
            if self._readers:
                try:
                    sample.update(self._read_gpu())
                except Exception as err:  # device lost mid-run: say so once, keep training
                    logger.warning(f"telemetry: NVML read failed ({err}); GPU metrics off")
                    self._readers, self.source = {}, "host"
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
