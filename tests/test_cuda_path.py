"""The CUDA-only branches, checked on a CPU machine through fakes at the narrowest seam (issue 37).

This machine has no GPU, NCCL or NVIDIA driver. Each test replaces the one thing a GPU node would
answer (``torch.cuda``'s queries, ``init_process_group``'s arguments) and checks the decision
shardforge takes from it; its docstring names the real behaviour it stands in for. None launches
training. NVML and the CPUs each rank gets: ``tests/test_cuda_devices.py``.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.distributed as dist

from train.config.recipe import recipe_from_dict

# ---------------------------------------------------------------- the process group (items 1, 5)


@pytest.fixture
def fake_gpus(monkeypatch):
    """``torch.cuda`` says there are GPUs; ``init_process_group`` (and DeepSpeed's) only record."""
    calls: dict[str, list] = {"init": [], "ds": [], "set_device": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls["init"].append((a, k)))
    fake_ds = types.ModuleType("deepspeed")
    fake_ds.init_distributed = lambda **k: calls["ds"].append(k)
    monkeypatch.setitem(sys.modules, "deepspeed", fake_ds)

    def join(rank: int, local_rank: int, world: int, **kwargs):
        from train.distributed import init_distributed

        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        for key in calls:
            calls[key].clear()
        return init_distributed(**kwargs)

    return join, calls


def test_fsdp_offload_on_gpus_gets_gloo_for_cpu_tensors_beside_nccl(fake_gpus):
    """Stands in for FSDP2 with CPUOffloadPolicy on NCCL: sharded gradients are CPU DTensors, so
    clip_grad_norm_'s reduction, ``full_tensor()`` and the full-state gather all-reduce CPU tensors,
    which NCCL rejects (pytorch#148532). The default group is then ``cpu:gloo,cuda:nccl`` (as
    torchtitan and torchtune do for CPU offload), and torch parses that into both backends."""
    join, calls = fake_gpus
    d = join(3, 3, 8, cpu_collectives=True)
    (args, kwargs), = calls["init"]
    assert args == ("cpu:gloo,cuda:nccl",) and kwargs["device_id"] == torch.device("cuda", 3)
    assert d.device == torch.device("cuda", 3) and calls["set_device"] == [torch.device("cuda", 3)]
    join(3, 3, 8)  # no offload: NCCL alone (a gloo group costs a full mesh of connections at start-up)
    assert calls["init"][0][0] == ("nccl",)
    config = dist.distributed_c10d.BackendConfig(dist.Backend("cpu:gloo,cuda:nccl"))
    assert config.get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}


def test_the_trainer_asks_for_cpu_collectives_exactly_when_fsdp_offloads(monkeypatch):
    """Stands in for ``train.loop.trainer.join_process_group`` on a GPU node: which recipes get
    the ``cpu:gloo,cuda:nccl`` group (FSDP with offload; DDP cannot offload; DeepSpeed offloads
    through its own CPU optimizer and makes its own group)."""
    import train.loop.trainer as trainer

    asked = []
    monkeypatch.setattr(trainer, "init_distributed", lambda **k: asked.append(k))
    monkeypatch.setitem(sys.modules, "train.engines.deepspeed_engine",
                        types.SimpleNamespace(load_ops=lambda offload: None))
    for engine, offload in (("fsdp", True), ("fsdp", False), ("ddp", False), ("zero3", True)):
        trainer.join_process_group(recipe_from_dict({"parallel": {"engine": engine, "offload": offload}}))
    assert asked == [{"cpu_collectives": True}, {"cpu_collectives": False}, {"cpu_collectives": False},
                     {"deepspeed": True}]


def test_one_gpu_binds_no_device_and_deepspeed_keeps_plain_nccl(fake_gpus):
    """Stands in for a one-GPU run: binding ``device_id`` with no peer makes later groups split
    from an eagerly initialised NCCL communicator, which DeepSpeed deliberately skips at world size
    1 (deepspeed#8248, CUDA error 600). DeepSpeed's engines get plain NCCL (it binds the device
    itself); a CPU machine gets gloo and no device."""
    join, calls = fake_gpus
    join(0, 0, 1, cpu_collectives=True)
    assert calls["init"][0][1]["device_id"] is None
    join(1, 1, 2, deepspeed=True, cpu_collectives=True)
    assert calls["init"] == [] and calls["ds"][0]["dist_backend"] == "nccl"
    from train.distributed import process_group_args

    assert process_group_args(8, torch.device("cpu"), cpu_collectives=True) == ("gloo", None)


# ---------------------------------------------------------------- CUDA RNG state (item 2)


class FakeCudaRNG:
    """Per-device CUDA generators; asking for every device's is the bug."""

    def __init__(self, monkeypatch, devices: int, current: int):
        self.devices, self.current, self.set = devices, current, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.devices)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.put)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.everything)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.everything)

    def get(self, device="cuda"):
        return torch.full((4,), self.current, dtype=torch.uint8)

    def put(self, state, device="cuda"):
        if self.current >= self.devices:
            raise RuntimeError("invalid device ordinal")
        self.set.append((self.current, state.tolist()))

    def everything(self, *args):
        raise AssertionError("every visible device's generator: a resume on another layout indexes missing ones")


def test_cuda_rng_saves_and_restores_only_this_ranks_device(monkeypatch, tmp_path):
    """Stands in for a job saved on 1 node × 8 GPUs and resumed on 2 nodes × 4 (same world size,
    so each global rank gets its own rank file back): rank 5 drew from cuda:5, now runs on cuda:1
    of a node with 4 devices. Before, it saved all 8 generators and set_rng_state_all indexed
    devices 4..7 that do not exist. A rank file of the old format (a list) restores this device's entry."""
    from train.checkpoint.state import RNGState

    rng = FakeCudaRNG(monkeypatch, devices=8, current=5)
    torch.save(RNGState().state_dict(), tmp_path / "rank-00005.pt")
    rng.devices, rng.current = 4, 1
    RNGState().load_state_dict(torch.load(tmp_path / "rank-00005.pt", weights_only=True))
    assert rng.set == [(1, [5] * 4)]  # cuda:5's stream continues on this rank's device
    old = RNGState().state_dict() | {"cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]}
    rng.set.clear()
    RNGState().load_state_dict(old)
    assert rng.set == [(1, [1] * 4)]


def test_rng_state_without_cuda_round_trips_through_a_weights_only_load(tmp_path):
    """The CPU path of the same file: no CUDA entry, and the file stays loadable with ``weights_only``."""
    from train.checkpoint.state import RNGState

    torch.save(RNGState().state_dict(), tmp_path / "rank.pt")
    expected = torch.rand(3)
    state = torch.load(tmp_path / "rank.pt", weights_only=True)
    assert state["cuda"] is None
    RNGState().load_state_dict(state)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- fp16 steps without host syncs (item 9)


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Records the tensor calls that copy a value to the host: on a GPU each waits for the device."""

    SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "numpy"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SYNCS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_an_fp16_step_waits_for_no_host_read_and_skipped_steps_are_counted_at_log_steps(one_rank_group):
    """Stands in for DDP/FSDP with fp16 on a GPU: each step read the loss scale twice
    (``GradScaler.get_scale()``, two ``.item()`` host syncs, stalling the CPU's queue of kernels).
    The comparison now stays on the device; ``skipped_steps`` reads the count once, at log steps.
    The scaler, its found_inf and fused AdamW's device-side skip are the real ones, on the CPU."""
    from train.engines.torch_engines import DDPEngine

    recipe = recipe_from_dict({"parallel": {"engine": "ddp", "precision": "fp16", "nproc": 1},
                               "train": {"micro_batch_size": 2, "global_batch_size": 2}})
    torch.manual_seed(0)
    engine = DDPEngine(recipe, torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)),
                       torch.device("cpu"), accum=1)
    calls, scales = [], []
    for factor in (1e-3, 1.0, float("inf"), 1.0):  # the third step overflows
        loss = engine.forward_backward({"x": torch.randn(2, 8), "k": torch.tensor(factor)},
                                       lambda m, b: m(b["x"]).pow(2).mean() * b["k"], True)
        with HostSyncs() as mode:
            engine.optimizer_step((~torch.isfinite(loss)).float())
        calls += mode.calls
        scales.append(engine.scaler.get_scale())
    assert calls == [], calls
    with HostSyncs() as control:
        engine.scaler.get_scale()
    assert control.calls == ["item"], "the mode sees what get_scale() did twice a step before"
    skipped = sum(b < a for a, b in zip([65536.0, *scales], scales))  # each skip halves the scale
    with HostSyncs() as mode:
        assert engine.skipped_steps == skipped >= 1
    assert mode.calls == ["item"]
    assert engine.skipped_steps == skipped and engine._extra_state()["skipped"] == skipped  # read twice: no loss


# ---------------------------------------------------------------- the Slurm job script (item 12)


def _render(**slurm) -> str:
    from launch.slurm import render_sbatch
    from pathlib import Path

    recipe = recipe_from_dict({"run": {"name": "gpu"}, "parallel": {"engine": "fsdp", "nodes": 2, "nproc": 8},
                               "slurm": {"gpus_per_node": 8, "cpus_per_task": 96, **slurm}})
    return render_sbatch(recipe, Path("/scratch/runs/gpu"), "/opt/venv/bin/python", "/opt/shardforge")


def test_the_job_gives_srun_its_cpus_and_names_the_network_interface():
    """Stands in for a GPU job on Slurm >= 22.05: srun no longer inherits sbatch's --cpus-per-task,
    so the node's agent and 8 ranks would share one bound CPU; and on nodes with several interfaces
    gloo and NCCL each pick one, maybe one the other nodes cannot reach (``slurm.network_interface``).
    NCCL's async error handling is torch's default (3), not the 1 torchrun's agent would set."""
    import subprocess

    from train.config.loading import RecipeError

    text = _render(network_interface="ib0,ib1")
    assert 'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1' in text
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}" in text
    exports = [line for line in text.splitlines() if "SOCKET_IFNAME" in line]
    assert exports == ["export GLOO_SOCKET_IFNAME=ib0,ib1", "export NCCL_SOCKET_IFNAME=ib0,ib1"]
    out = subprocess.run(["bash", "-c", "; ".join(exports) + '; printf %s "$GLOO_SOCKET_IFNAME"'],
                         capture_output=True, text=True)
    assert out.stdout == "ib0,ib1"
    assert "SOCKET_IFNAME" not in _render()  # unset: the libraries choose, as before
    with pytest.raises(RecipeError, match=r"slurm.network_interface='ib0; rm -rf /': give interface names"):
        _render(network_interface="ib0; rm -rf /")


def test_shipped_multi_node_recipes_end_a_job_whose_peer_is_gone_within_minutes():
    """Stands in for a node lost mid-step: the other ranks wait in a collective until the process
    group's timeout (30 min, sized for rank 0 tokenizing a corpus) unless the hang watchdog
    (``train.step_timeout_s``) ends the step first; every shipped multi-node recipe turns it on."""
    import yaml

    from train.config.loading import CONFIG_DIR

    multi = {p.stem: yaml.safe_load(p.read_text()) for p in CONFIG_DIR.glob("*.yaml")}
    multi = {k: v for k, v in multi.items() if v.get("parallel", {}).get("nodes", 1) > 1}
    assert multi and all(0 < v["train"].get("step_timeout_s", 0) <= 900 for v in multi.values()), multi.keys()


# ---------------------------------------------------------------- peak FLOPs (item 15)


def test_every_h100_and_h200_variant_resolves_to_its_dense_peak():
    """Stands in for the device names CUDA reports on each card (MFU is omitted when a name is
    unknown: a GH200 was). Dense peaks, half the sparse figures NVIDIA's datasheets print."""
    from train.device_peaks import PEAK_TFLOPS, peak_tflops

    names = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.5,
             "NVIDIA H200": 989.4, "NVIDIA H200 NVL": 835.5, "NVIDIA GH200 480GB": 989.4,
             "NVIDIA GH200 144G HBM3e": 989.4, "NVIDIA B200": 2250.0, "NVIDIA GB200": 2500.0,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L40": 181.05}
    assert {n: peak_tflops(n, "bf16") for n in names} == names
    assert peak_tflops("Tesla V100-PCIE-32GB", "fp16") == 112.0 and peak_tflops("Tesla V100S-PCIE-32GB", "fp16") == 130.0
    for key, peaks in PEAK_TFLOPS.items():  # fp16 runs as fast as bf16; TF32 at half the rate
        assert peaks.get("fp16") == peaks.get("bf16", peaks["fp16"]), key
        assert "tf32" not in peaks or abs(peaks["tf32"] - peaks["bf16"] / 2) <= 0.015 * peaks["bf16"], key


# ---------------------------------------------------------------- refused at plan (item 6)


def test_flash_attention_without_its_package_or_in_fp32_is_refused_in_one_line(monkeypatch):
    """Stands in for a node where flash-attn is not installed: transformers would fail only when
    the model is built, after data preparation, on every rank. And FlashAttention computes in
    bf16/fp16 only."""
    import importlib.util

    from train.config.model_checks import attention_problems

    def recipe(impl: str, precision: str = "bf16"):
        return recipe_from_dict({"model": {"attn_implementation": impl}, "parallel": {"precision": precision}})

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("flash_attn") else real(name, *a))
    (line,) = attention_problems(recipe("flash_attention_2"))
    assert line.startswith("model.attn_implementation: flash_attention_2 needs flash-attn") and "\n" not in line
    assert "flash_attn_interface" in attention_problems(recipe("flash_attention_3"))[0]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # installed
    assert attention_problems(recipe("flash_attention_2")) == []
    assert attention_problems(recipe("flash_attention_2", "fp32")) == [
        "model.attn_implementation: flash_attention_2 computes in bf16 or fp16 only; set parallel.precision=bf16 "
        "or model.attn_implementation=sdpa"]
    assert attention_problems(recipe("sdpa", "fp32")) == []


def test_compiled_blocks_under_zero3_are_refused_and_the_shipped_zero3_recipe_does_not_ask():
    """Stands in for per-block torch.compile on ZeRO-3, whose hooks gather each partitioned
    parameter as it is used; DeepSpeed supports compiling ZeRO-3 through engine.compile() only."""
    from train.config.loading import RecipeError, load_recipe

    assert not load_recipe("llama-7b-zero3", check_model=False).model.compile
    with pytest.raises(RecipeError) as err:
        load_recipe("llama-7b-zero3", ["model.compile=true"], check_model=False)
    assert str(err.value).count("\n") == 0 and "model.compile: torch.compile of each block is not supported " \
        "under ZeRO-3" in str(err.value)
    assert load_recipe("llama-7b-zero3", ["model.compile=true", "parallel.engine=fsdp"], check_model=False).model.compile


# ---------------------------------------------------------------- background checkpoint staging (item 8)


def test_background_saves_refill_one_staging_copy_and_write_each_steps_state(one_rank_group, tmp_path):
    """Stands in for ``checkpoint.async_save`` on a GPU host: DCP's default staging made a fresh
    pageable host copy of the whole state at every save (a new writer each time); the engine now
    keeps one stager, whose copy (pinned on CUDA) is made at the first save and refilled by the next.
    The stager, its copy and DCP's writer are the real ones, on the CPU; the second checkpoint must
    hold the second step's weights, not the first copy's."""
    import torch.distributed.checkpoint as dcp

    from train.engines.torch_engines import DDPEngine

    recipe = recipe_from_dict({"parallel": {"engine": "ddp", "precision": "fp32", "nproc": 1},
                               "train": {"micro_batch_size": 2, "global_batch_size": 2}})
    engine = DDPEngine(recipe, torch.nn.Linear(4, 4), torch.device("cpu"), accum=1)
    copies, weights = [], []
    for step in (1, 2):
        engine.forward_backward({"x": torch.randn(2, 4)}, lambda m, b: m(b["x"]).pow(2).mean(), True)
        engine.optimizer_step(torch.zeros(()))
        (tmp_path / f"s{step}").mkdir()
        engine.save(tmp_path / f"s{step}", background=True).result()
        copies.append(dict(engine.stager()._state_dict_stager._cached_storage_mapping))
        weights.append(engine.model.weight.detach().clone())
    assert copies[0] and copies[0].keys() == copies[1].keys()  # the same storages staged...
    assert all(copies[0][k] is copies[1][k] for k in copies[0])  # ...into the same host copies
    for step, expected in zip((1, 2), weights):
        state = {"model": {"weight": torch.empty(4, 4), "bias": torch.empty(4)}}
        dcp.load(state, checkpoint_id=str(tmp_path / f"s{step}" / "dcp"), no_dist=True)
        assert torch.equal(state["model"]["weight"], expected), step
    assert not torch.equal(weights[0], weights[1])


# ---------------------------------------------------------------- DeepSpeed's C++ ops (item 11)


def test_deepspeed_ops_build_in_a_folder_keyed_by_the_environment_and_name_missing_build_tools(monkeypatch, tmp_path):
    """Stands in for a GPU node where ZeRO offload builds ``cpu_adam`` with ``-march=native``:
    torch's default build folder (one per Python and CUDA version) was shared by every virtualenv
    and by nodes of different CPUs on one home directory, which rebuilt each other's op at each
    launch. The folder is now keyed by the environment; a user's TORCH_EXTENSIONS_DIR is kept; a
    node without a compiler gets one line naming what to install (checked with a CXX that is not there)."""
    import sys

    from train.engines.deepspeed_engine import build_tools_missing, cpu_signature, extensions_root

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    here = extensions_root()
    assert here.name.startswith("shardforge-") and extensions_root() == here  # stable
    with monkeypatch.context() as m:
        m.setattr(sys, "prefix", str(tmp_path / "another-venv"))
        assert extensions_root() != here and extensions_root().parent == here.parent
    assert extensions_root() == here and cpu_signature()
    monkeypatch.setattr("train.engines.deepspeed_engine.cpu_signature", lambda: "x86_64 another CPU")
    assert extensions_root() != here
    assert extensions_root({"TORCH_EXTENSIONS_DIR": str(tmp_path / "mine")}) == tmp_path / "mine"
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert any(m.startswith("a C++ compiler") for m in build_tools_missing())
