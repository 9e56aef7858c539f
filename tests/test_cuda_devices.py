"""Which GPU and how many CPUs a rank gets, checked on a CPU machine through fakes (issue 37; the
rest of the CUDA path is in ``tests/test_cuda_path.py``), and the deterministic-kernels setting.

There is no NVIDIA driver here: each test replaces the ``pynvml`` module or ``torch.cuda``'s device
properties, and its docstring names the real behaviour it stands in for. None launches training.
"""

from __future__ import annotations

import os
import sys
import types

import torch


# ---------------------------------------------------------------- NVML (item 4)


class FakeNVML(types.ModuleType):
    """The ``pynvml`` module of a node with four GPUs (NVML numbers them by PCI bus). Looking one
    up by index, or calling a deprecated reader while the current one exists, fails the test."""

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 0, 1
    UUIDS = [f"GPU-{i}{i}{i}{i}{i}{i}{i}{i}-1111-2222-3333-444444444444" for i in range(4)]

    def __init__(self, broken: tuple[str, ...] = ()):
        super().__init__("pynvml")
        self.broken, self.lost = set(broken), False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, i):  # only visible_nvml_handles may enumerate
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.UUIDS:
            raise RuntimeError("NVMLError_NotFound")
        return self.UUIDS.index(uuid)

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        buses = [f"00000000:{0x18 + 0x10 * i:02x}:00.0" for i in range(4)]
        if bus not in buses:
            raise RuntimeError("NVMLError_NotFound")
        return buses.index(bus)

    def nvmlDeviceGetUUID(self, h):
        return self.UUIDS[h]

    def _read(self, field, value):
        if self.lost or field in self.broken:
            raise RuntimeError("NVMLError_GpuIsLost" if self.lost else "NVMLError_NotSupported")
        return value

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=self._read("util", 10 * h))

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=self._read("mem", h * 2**30), total=(80 - h) * 10**9)

    def nvmlDeviceGetPowerUsage(self, h):
        return self._read("power", 100_000 * h)

    def nvmlDeviceGetTemperatureV(self, h, sensor):
        return self._read("temp", 40 + h)

    def nvmlDeviceGetClockInfo(self, h, kind):
        return self._read("clock", 1000 + h)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._read("reasons", 4)

    def nvmlDeviceGetTemperature(self, h, sensor):
        raise AssertionError("deprecated: nvmlDeviceGetTemperatureV exists")

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        raise AssertionError("deprecated: nvmlDeviceGetCurrentClocksEventReasons exists")


def cuda_device_props(monkeypatch, uuid: str, bus: int) -> None:
    """``torch.cuda.get_device_properties``: the UUID as torch prints it (no ``GPU-``) and the PCI location."""
    props = types.SimpleNamespace(uuid=uuid.removeprefix("GPU-"), pci_bus_id=bus, pci_device_id=0, pci_domain_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)


def sample(telemetry) -> dict:
    import time

    time.sleep(0.1)
    return telemetry.drain()


def test_telemetry_finds_the_ranks_gpu_by_uuid_not_by_index(monkeypatch):
    """Stands in for CUDA_VISIBLE_DEVICES=2,3 (a Slurm allocation): a rank's cuda:0 is the node's
    third GPU, so NVML index 0 (its local rank) would report another job's GPU. The handle comes
    from the device's UUID as torch reports it; with no UUID NVML knows, from its PCI bus id."""
    from train.metrics.telemetry import Telemetry, nvml_ids

    nvml = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    cuda_device_props(monkeypatch, FakeNVML.UUIDS[2], bus=0x38)
    assert nvml_ids(torch.device("cuda", 0)) == [FakeNVML.UUIDS[2], "MIG-" + FakeNVML.UUIDS[2][4:],
                                                 "00000000:38:00.0"]
    with Telemetry(torch.device("cuda", 0), 0.01) as t:
        got = sample(t)
    assert got["gpu_util"] == 20 and got["gpu_temp_c"] == 42 and t.source == "nvml"
    cuda_device_props(monkeypatch, "", bus=0x48)  # a torch without the UUID: the PCI bus id
    with Telemetry(torch.device("cuda", 0), 0.01) as t:
        assert sample(t)["gpu_util"] == 30


def test_each_nvml_field_is_read_on_its_own_and_a_lost_gpu_is_said_once(monkeypatch, logged):
    """Stands in for a board without power readings (NVMLError_NotSupported): the other five
    fields are still logged and the missing one is named once; then the GPU falls off the bus
    (every call fails): one line, and host metrics from then on."""
    from train.metrics.telemetry import Telemetry

    nvml = FakeNVML(broken=("power",))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    cuda_device_props(monkeypatch, FakeNVML.UUIDS[1], bus=0x28)
    with Telemetry(torch.device("cuda", 0), 0.01) as t:
        got = sample(t)
        assert set(Telemetry.GPU_FIELDS) - set(got) == {"gpu_power_w"} and got["gpu_throttle"] == 4
        nvml.lost = True
        after = sample(t)
        sample(t)
    warnings = [line for line in logged if line.startswith("telemetry:")]
    assert [w for w in warnings if "gpu_power_w" in w] == [warnings[0]] and len(warnings) == 2
    assert "NVML read failed" in warnings[1] and t.source == "host" and "host_rss_gb" in after


def test_an_older_nvml_falls_back_to_the_deprecated_readers(monkeypatch):
    """Stands in for a pynvml (or driver) from before nvmlDeviceGetTemperatureV and
    nvmlDeviceGetCurrentClocksEventReasons: the old calls still give the temperature and reasons."""
    from train.metrics.telemetry import Telemetry

    class OldNVML(FakeNVML):
        nvmlDeviceGetTemperatureV = None
        nvmlDeviceGetCurrentClocksEventReasons = None

        def nvmlDeviceGetTemperature(self, h, sensor):
            return 50

        def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
            return 1

    monkeypatch.setitem(sys.modules, "pynvml", OldNVML())
    cuda_device_props(monkeypatch, FakeNVML.UUIDS[0], bus=0x18)
    with Telemetry(torch.device("cuda", 0), 0.01) as t:
        got = sample(t)
    assert got["gpu_temp_c"] == 50 and got["gpu_throttle"] == 1


def test_a_driver_that_refuses_the_v2_temperature_call_is_asked_once():
    """pynvml has nvmlDeviceGetTemperatureV but the driver predates it (it raises): the sampler
    falls back to the old call and does not try the new one at every sample again."""
    from train.metrics.telemetry import _gpu_readers

    class OldDriver(FakeNVML):
        v2_calls = 0

        def nvmlDeviceGetTemperatureV(self, h, sensor):
            OldDriver.v2_calls += 1
            raise RuntimeError("NVML_ERROR_FUNCTION_NOT_FOUND")

        def nvmlDeviceGetTemperature(self, h, sensor):
            return 61

    temperature = _gpu_readers(OldDriver(), 0)["gpu_temp_c"]
    assert [temperature() for _ in range(3)] == [61.0] * 3 and OldDriver.v2_calls == 1


def test_the_launcher_reads_the_gpus_cuda_visible_devices_names():
    """Stands in for ``shardforge plan`` on a node where CUDA_VISIBLE_DEVICES names GPUs by UUID
    (or a unique prefix), by index, or stops at an entry CUDA would stop at: the plan is checked
    against the smallest of those GPUs, never blindly against NVML's device 0."""
    from launch.gpus import visible_nvml_handles

    nvml = FakeNVML()
    assert visible_nvml_handles(nvml, None) == [0, 1, 2, 3]
    assert visible_nvml_handles(nvml, f"{FakeNVML.UUIDS[3]},GPU-11") == [3, 1]  # a unique prefix is enough
    assert visible_nvml_handles(nvml, f"{FakeNVML.UUIDS[3]},GPU-,2") == [3]  # an ambiguous one: CUDA stops there
    assert visible_nvml_handles(nvml, "2,0,7,1") == [2, 0]  # CUDA ignores everything from an invalid entry
    assert visible_nvml_handles(nvml, "") == []


# ---------------------------------------------------------------- threads per rank (item 7)


def test_each_local_rank_gets_its_share_of_the_cpus():
    """Stands in for ``shardforge run`` on a GPU node of 128 CPUs and 8 GPUs: torchrun would give
    each rank OMP_NUM_THREADS=1 (data loading and offloaded optimizer steps starve); it gets 16,
    as a Slurm job does, unless the user set it. NCCL's async error handling stays torch's default."""
    from launch.local import rank_defaults

    assert rank_defaults({}, 8, 128) == {"OMP_NUM_THREADS": "16", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert rank_defaults({"OMP_NUM_THREADS": "4", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, 8, 128) == {}
    assert rank_defaults({}, 8, 4)["OMP_NUM_THREADS"] == "1" and rank_defaults({}, 2, None)["OMP_NUM_THREADS"] == "1"


def test_deterministic_setting_switches_torchs_kernel_choice_and_keeps_a_users_cublas_workspace(monkeypatch):
    """Stands in for ``train.deterministic: true`` on a GPU: torch then refuses nondeterministic CUDA
    kernels (cuBLAS split-K atomics, the attention and embedding backward's atomics) and cuBLAS reads
    its workspace setting when the rank's first handle is made. The flags are torch's own, switched
    on this CPU; that the kernels then repeat bit for bit is for the GPU proof (benchmarks/gpu.sh's
    ``resume`` row turns it on)."""
    import torch

    from train.engines.base import CUBLAS_DETERMINISTIC_WORKSPACE, set_deterministic
    from train.config.recipe import recipe_from_dict

    assert recipe_from_dict({}).train.deterministic is False
    assert recipe_from_dict({"train": {"deterministic": True}}).train.deterministic is True
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        torch.backends.cudnn.benchmark = True
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC_WORKSPACE
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's choice is kept
        set_deterministic(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def test_deepspeed_probes_only_the_ops_a_run_loads(monkeypatch):
    """``deepspeed.ops.__compatible_ops__``, read by DeepSpeed's torch backend at start-up, would
    probe every op on every rank (nvcc subprocesses on a CUDA machine). ``probe_only`` seeds it with
    the ops the run loads; DeepSpeed's own all-op probe is made to fail here, so a read that
    still reached it would raise."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    from train.engines.deepspeed_engine import probe_only

    monkeypatch.delitem(vars(deepspeed.ops), "__compatible_ops__", raising=False)
    monkeypatch.setattr(deepspeed.ops, "_probe_compatible_ops",
                        lambda: (_ for _ in ()).throw(AssertionError("probed every op")))
    probed = []

    class Builder:
        NAME = get_accelerator().create_op_builder("ShareMemCommBuilder").NAME  # deepspeed_shm_comm

        def is_compatible(self, verbose):
            probed.append(self.NAME)
            return False  # nothing is built here: build_shm_op then returns None without building

    compatible = probe_only(deepspeed.ops, {"ShareMemCommBuilder": Builder(), "Missing": None})
    assert probed == [Builder.NAME] and compatible[Builder.NAME] is False
    assert not any(compatible.values()) and len(compatible) > 5  # every other op: not needed, not probed
    assert build_shm_op() is None  # DeepSpeed's own read takes the seeded dict
    assert probe_only(deepspeed.ops, {"ShareMemCommBuilder": Builder()}) is compatible and probed == [Builder.NAME]


def test_on_a_cuda_accelerator_only_cpu_adam_is_probed_and_only_with_offload(monkeypatch):
    """DeepSpeed's CUDA accelerator (its builder table needs no GPU): no shared-memory op there, so a
    run without offload probes no op at all, and one with offload probes CPU Adam alone."""
    import types

    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    from train.engines.deepspeed_engine import ops_to_load, probe_only

    cuda = CUDA_Accelerator()
    assert ops_to_load(cuda, offload=False) == {"ShareMemCommBuilder": None}
    builders = ops_to_load(cuda, offload=True)
    assert builders["ShareMemCommBuilder"] is None and builders["CPUAdamBuilder"].NAME == "cpu_adam"
    probed = []
    monkeypatch.setattr(type(builders["CPUAdamBuilder"]), "is_compatible",
                        lambda self, verbose=False: probed.append(self.NAME) or True)
    ops = types.SimpleNamespace()  # a fresh deepspeed.ops: nothing probed yet
    compatible = probe_only(ops, builders)
    assert probed == ["cpu_adam"] and compatible["cpu_adam"] is True and ops.__compatible_ops__ is compatible
    assert probe_only(types.SimpleNamespace(), ops_to_load(cuda, offload=False)) == \
        dict.fromkeys(compatible, False)  # nothing probed, nothing claimed
