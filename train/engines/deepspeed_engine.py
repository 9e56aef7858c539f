"""DeepSpeed ZeRO 1/2/3: ``deepspeed.initialize`` with ``deepspeed.json``; ``engine.backward`` /
``engine.step`` on every micro-batch (DeepSpeed accumulates); resharding through universal
checkpoints."""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from train.engines import capabilities
from train.engines.base import Engine
from train.engines.placement import InitialWeights, broadcast_buffers, copy_into_zero3, is_empty, materialize
from train.optim import build_adamw, lr_factor, param_groups
from train.config.recipe import Recipe

CONVERSION_TIMEOUT_S = 6 * 3600.0
"""How long the other ranks wait for rank 0 to convert a ZeRO checkpoint to DeepSpeed's universal
format when a run resumes on another world size (the process group's own timeout is 30 min)."""


class DeepSpeedEngine(Engine):
    def __init__(self, recipe: Recipe, model: torch.nn.Module, device: torch.device, *, accum: int, cfg: dict,
                 weights: Optional[InitialWeights] = None):
        import deepspeed

        self.name = recipe.parallel.engine
        self.recipe, self.device = recipe, device
        weights = weights or InitialWeights()
        zero3 = capabilities(self.name).zero_stage == 3
        if weights.from_rank0 and zero3:  # built under zero.Init on every rank: fill the partitions
            copy_into_zero3(model, weights)
            weights.state = None
        elif is_empty(model):  # a rank > 0 under ZeRO-1/2: deepspeed.initialize broadcasts rank 0's parameters
            materialize(model, device)
        # With offload the config names DeepSpeed's CPU AdamW; otherwise torch's AdamW is the client.
        params: Optional[list[dict]]
        client_optimizer, params = None, param_groups(model, recipe.optim.weight_decay)
        if "optimizer" not in cfg:
            client_optimizer, params = build_adamw(model, recipe.optim, device), None
        factor = lr_factor(recipe.optim, recipe.train.max_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=client_optimizer, model_parameters=params, config=cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
        if weights.from_rank0 and not zero3:
            broadcast_buffers(self.engine.module)
        self.model = self.engine

    def forward_backward(self, batch, loss_fn, last_micro):
        loss = loss_fn(self.engine, batch)
        self.engine.backward(loss)
        if not last_micro:
            self.engine.step()  # bookkeeping only: DeepSpeed counts micro-steps to find the boundary
        return loss.detach().float()

    def optimizer_step(self, nonfinite_loss):
        # The boundary's engine.step() runs here, so the step's time is the optimizer's (phase timers),
        # in the same order as before: the last backward, then the step. DeepSpeed applies it before
        # the norm is known: a non-finite step can only be reported.
        self.engine.step()
        value = self.engine.get_global_grad_norm()  # a device tensor under ZeRO: kept there, no host sync
        norm = (value.detach().float().reshape(()).to(self.device) if torch.is_tensor(value)
                else torch.tensor(0.0 if value is None else float(value), device=self.device))
        found = (nonfinite_loss > 0).float()
        if self.recipe.parallel.precision != "fp16":  # fp16 overflow is the loss scaler's business
            invalid = ~torch.isfinite(norm) | (norm < 0)  # DeepSpeed's group norms report inf/NaN as -1
            found = torch.maximum(found, invalid.float())
        if dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return norm, found

    def local_weights(self) -> list[torch.Tensor]:
        params = list(self.engine.module.parameters())  # ZeRO-3: each rank holds a partition of each
        return [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params]

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def skipped_steps(self) -> int:
        return int(getattr(self.engine, "skipped_steps", 0))

    def save(self, path: Path, background: bool = False, digests: Optional[dict] = None):
        if background:
            raise ValueError("checkpoint.async_save is for ddp and fsdp; DeepSpeed saves synchronously")
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="state")

    def load(self, path: Path, saved_world_size: int) -> None:
        tag = "state"
        if saved_world_size != dist.get_world_size():
            # ZeRO shards are laid out per rank: go through DeepSpeed's universal checkpoint.
            tag = "state_universal"
            # Rank 0 converts while the others wait: a 70B conversion can outlast the process
            # group's timeout, so they wait in a gloo group of their own with a longer one.
            waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONVERSION_TIMEOUT_S))
            if dist.get_rank() == 0:
                to_universal(path / "deepspeed", "state", tag)
            dist.barrier(group=waiting)
            dist.destroy_process_group(waiting)
            self.engine._config.load_universal_checkpoint = True
        groups = self.engine.optimizer.param_groups
        weight_decay = [g.get("weight_decay") for g in groups]
        try:
            load_path, _ = self.engine.load_checkpoint(str(path / "deepspeed"), tag=tag,
                                                       load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if tag != "state":
            self._repair_universal_load(groups, weight_decay)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {path / 'deepspeed'}")

    def _repair_universal_load(self, groups: list, weight_decay: list) -> None:
        """Undo two side effects of DeepSpeed 0.19's ZeRO-3 universal load.

        It copies group 0's hyper-parameters onto every group (weight decay would reach
        biases and norms), and it gives every sub-group the *same* ``step`` tensor, which
        Adam increments in place once per sub-group, skewing bias correction.
        """
        for group, wd in zip(groups, weight_decay):
            group["weight_decay"] = wd
        inner = getattr(self.engine.optimizer, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def full_model_state(self) -> Optional[dict]:
        if self.engine.zero_optimization_stage() == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.engine.module.state_dict()
        if dist.get_rank() != 0:
            return None
        return {k: v.detach().float().cpu() for k, v in sd.items()}


def cpu_signature() -> str:
    """What an op compiled with ``-march=native`` depends on: the architecture and, on Linux, the
    CPU's model and instruction-set flags."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line.split(":", 1)[1].strip() for line in lines if line.startswith(("model name", "flags"))]
    return " ".join([platform.machine(), *sorted(set(wanted))]) or platform.processor()


def extensions_root(env=os.environ) -> Path:
    """Where DeepSpeed's C++ ops are built and loaded from: ``TORCH_EXTENSIONS_DIR`` when the user set
    it; else a folder of torch's default build root keyed by what a built op depends on (this Python
    environment, torch's and DeepSpeed's versions, this CPU). torch's default is one folder per
    Python and CUDA version, so two virtualenvs, or nodes of different CPUs sharing a home directory,
    rebuilt each other's ops at every launch (150-300 s each) or loaded one built for another CPU."""
    if env.get("TORCH_EXTENSIONS_DIR"):
        return Path(env["TORCH_EXTENSIONS_DIR"])
    import hashlib
    import sys

    import deepspeed
    from torch.utils.cpp_extension import get_default_build_root

    key = "\n".join([sys.prefix, torch.__version__, deepspeed.__version__, cpu_signature()])
    return Path(get_default_build_root()) / f"shardforge-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def build_tools_missing() -> list[str]:
    """What building a C++ op needs and this machine lacks, as install hints."""
    import sysconfig

    missing = []
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        missing.append("a C++ compiler (e.g. apt install g++, or module load gcc)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        missing.append("Python's headers (e.g. apt install python3-dev)")
    return missing


def load_ops(offload: bool) -> None:
    """Build or load DeepSpeed's C++ ops for this rank before the process group exists.

    DeepSpeed builds them on first use through torch's ``FileBaton``: a plain ``lock`` file in the
    op's build directory, held even when nothing needs building. A process killed while holding it
    (a preempted or ``kill -9``-ed job) leaves it behind, and every later run on the machine waits
    on it forever. Ranks load ops here under an ``flock`` instead, which the kernel releases when
    its holder dies; holding it, they remove the batons such a death left. The first rank of a node
    builds, the others load what it built; DeepSpeed caches loaded ops, so its own later loads take
    no baton. The ops live in :func:`extensions_root`.
    """
    import fcntl

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builders = ops_to_load(get_accelerator(), offload)
    compatible = probe_only(deepspeed.ops, builders)
    root = extensions_root()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)  # where torch's builder puts them (read at each load)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "shardforge-build.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        # every shardforge build runs under this flock, so nobody holds these: <op>/lock under
        # TORCH_EXTENSIONS_DIR, <python and CUDA version>/<op>/lock under torch's default root
        for baton in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
            baton.unlink(missing_ok=True)
        for name, builder in builders.items():
            if builder is None or not compatible.get(builder.NAME, False):
                continue
            try:
                builder.load(verbose=False)
            except Exception as err:
                missing = build_tools_missing()
                if not missing:
                    raise
                raise RuntimeError(f"DeepSpeed could not build its {builder.NAME} op in {root}: this machine lacks "
                                   f"{' and '.join(missing)}"
                                   + ("; or set parallel.offload=false" if name == "CPUAdamBuilder" else "")) from err


def ops_to_load(accelerator: Any, offload: bool) -> dict[str, Any]:
    """DeepSpeed's op builders a rank loads before training (``None``: the accelerator has no such
    op): the shared-memory collective op (CPU accelerator only: CUDA's table has none) and, with
    offload, CPU Adam."""
    names = ("ShareMemCommBuilder", *(("CPUAdamBuilder",) if offload else ()))
    return {name: accelerator.create_op_builder(name) for name in names}


def probe_only(ops_module: Any, builders: dict[str, Any]) -> dict[str, bool]:
    """Seed DeepSpeed's ``deepspeed.ops.__compatible_ops__`` with the ops this run loads, each
    probed once, every other op marked not needed (``False``); returns the dict.

    Its first read (``deepspeed.init_distributed``'s torch backend reads it for the shared-memory
    op) would otherwise probe every op DeepSpeed has, on every rank: on a CUDA machine each CUDA
    op's probe runs compiler subprocesses and queries the GPU, for ops no run of ours builds. Only
    that backend reads the dict (DeepSpeed 0.18); a builder's own ``load`` checks itself."""
    seeded = vars(ops_module).get("__compatible_ops__")
    if seeded is not None:  # probed already (in this process): keep DeepSpeed's answer
        return seeded
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    compatible = dict.fromkeys(ALL_OPS, False)
    for builder in builders.values():
        if builder is None:
            continue  # this accelerator has no such op (the shared-memory one is a CPU op)
        try:
            compatible[builder.NAME] = bool(builder.is_compatible(False))
        except Exception:  # a probe that fails means "cannot build", as DeepSpeed's own probe_is_compatible
            compatible[builder.NAME] = False
    ops_module.__compatible_ops__ = compatible
    return compatible


def to_universal(ds_dir: Path, tag: str, universal_tag: str) -> Path:
    """Convert ``ds_dir/tag`` into ``ds_dir/universal_tag`` (anew, atomically), with ``ds_to_universal``.

    ``--inject_missing_state`` adds the parameter-shape metadata that ZeRO-1/2 checkpoints
    written without Megatron lack. The converted copy lives inside the checkpoint directory,
    so pruning removes it with the checkpoint; it is not in the manifest.
    """
    import subprocess
    import sys

    out = ds_dir / universal_tag
    tmp = ds_dir / f".tmp-{universal_tag}"  # converted anew each time: a copy left on disk is not trusted
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "train.engines.universal", "--input_folder",
           str(ds_dir / tag), "--output_folder", str(tmp), "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {ds_dir / tag} to a DeepSpeed universal checkpoint failed "
                           f"(exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    (tmp / ".converted").touch()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
