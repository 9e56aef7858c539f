"""Data-parallel engines behind one small interface, so the training loop never branches on them.

* DDP: ``no_sync`` on every micro-batch but the last; autocast for bf16/fp16, a
  GradScaler for fp16.
* FSDP2: ``fully_shard`` on each transformer block, then the root, with the
  MixedPrecisionPolicy from ``fsdp.json``; ``set_requires_gradient_sync`` for accumulation.
* DeepSpeed ZeRO 1/2/3: ``deepspeed.initialize`` with ``deepspeed.json``;
  ``engine.backward`` / ``engine.step`` on every micro-batch (DeepSpeed accumulates).

Each engine saves and loads model + optimizer + LR schedule (+ loss scale) itself;
the checkpointer adds the rest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from train.optim import build_adamw, build_scheduler, lr_factor, param_groups
from train.recipe import Recipe, grad_accum_steps

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Engine:
    """What the loop needs: a micro-step, an optimizer step, eval forward, save and load."""

    name = "engine"
    model: torch.nn.Module

    def forward_backward(self, batch: dict, loss_fn: LossFn, last_micro: bool) -> torch.Tensor:
        """Forward and backward one micro-batch; return the (detached) unscaled loss."""
        raise NotImplementedError

    def optimizer_step(self, nonfinite_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, step the optimizer and the LR schedule, zero grads; return (grad norm, skipped).

        ``nonfinite_loss`` > 0 when this rank saw a NaN/inf loss in the step. Every rank agrees
        (an all-reduce, no host sync) on ``skipped`` = 1.0 when any rank saw a non-finite loss
        or the gradient norm is non-finite; engines that can, skip the update on the device.
        """
        raise NotImplementedError

    def eval_forward(self, batch: dict, fn: LossFn) -> torch.Tensor:
        """``fn(model, batch)`` without gradients, in the engine's compute precision."""
        with torch.no_grad(), self.autocast():
            return fn(self.model, batch).detach()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def lr(self) -> float:
        raise NotImplementedError

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped by the fp16 loss scaler."""
        return 0

    def save(self, path: Path, background: bool = False, digests: Optional[dict] = None):
        """Write model + optimizer + schedule state into ``path``. With ``background`` (DDP/FSDP),
        copy it to CPU memory, start the write in a thread and return its future. An engine that
        hashes files as it writes them records ``absolute path → sha256`` in ``digests``."""
        raise NotImplementedError

    def load(self, path: Path, saved_world_size: int) -> None:
        """Restore from ``path``, saved by ``saved_world_size`` ranks (resharding when it differs)."""
        raise NotImplementedError

    def full_model_state(self) -> Optional[dict]:
        """The unsharded model state dict on rank 0 (``None`` elsewhere); a collective."""
        raise NotImplementedError

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()


class _TorchEngine(Engine):
    """Shared by DDP and FSDP2: torch AdamW, LambdaLR, DCP checkpoints."""

    def __init__(self, recipe: Recipe, device: torch.device):
        self.recipe, self.device = recipe, device
        self.accum = grad_accum_steps(recipe)
        self.clip = recipe.optim.grad_clip
        self._skipped = 0
        self._scale_before: Optional[float] = None
        self._save_group = None

    def _setup_optim(self, params_model: torch.nn.Module) -> None:
        self.optimizer = build_adamw(params_model, self.recipe.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, self.recipe.optim, self.recipe.train.max_steps)

    def _backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def optimizer_step(self, nonfinite_loss):
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else math.inf,
                                              foreach=self.device.type == "cuda" or None)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        found = (nonfinite_loss > 0).float()
        if not self.scaler:  # with fp16 the scaler owns overflowing gradients: not an error
            found = torch.maximum(found, (~torch.isfinite(norm)).float())
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._skipped += int(self.scaler.get_scale() < scale)  # a skipped step lowers the scale
        else:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, found  # fused AdamW skips on it
            self.optimizer.step()
            self.optimizer.found_inf = None
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, found

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def skipped_steps(self) -> int:
        return self._skipped

    def _extra_state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "skipped": self._skipped,
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def save(self, path: Path, background: bool = False, digests: Optional[dict] = None):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from train.checkpoint import dcp_writer

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        if dist.get_rank() == 0:
            torch.save(self._extra_state(), path / "engine_extra.pt")
        writer = dcp_writer(path / "dcp", digests if digests is not None else {})
        if not background:
            dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
            return None
        if self._save_group is None:  # the writer thread's collectives must not interleave with training's
            self._save_group = dist.new_group(backend="gloo")
        return dcp.async_save({"model": model_sd, "optim": optim_sd}, storage_writer=writer,
                              process_group=self._save_group)

    def load(self, path: Path, saved_world_size: int) -> None:  # DCP reshards by itself
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        extra = torch.load(path / "engine_extra.pt", weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        self._skipped = extra["skipped"]
        if self.scaler and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])

    def full_model_state(self) -> Optional[dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
        return sd if dist.get_rank() == 0 else None


class DDPEngine(_TorchEngine):
    name = "ddp"

    def __init__(self, recipe: Recipe, model: torch.nn.Module, device: torch.device):
        super().__init__(recipe, device)
        from torch.nn.parallel import DistributedDataParallel

        model.to(device)
        self.precision = recipe.parallel.precision
        # One process has nothing to synchronise: skip the wrapper's bucket copies and hooks.
        self.model = model if dist.get_world_size() == 1 else DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        self._setup_optim(self.model)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def forward_backward(self, batch, loss_fn, last_micro):
        wrapped = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        sync = self.model.no_sync() if wrapped and not last_micro else contextlib.nullcontext()
        with sync:
            with self.autocast():
                loss = loss_fn(self.model, batch)
            self._backward(loss)
        return loss.detach().float()


class FSDPEngine(_TorchEngine):
    name = "fsdp"

    def __init__(self, recipe: Recipe, model: torch.nn.Module, device: torch.device, cfg: dict):
        super().__init__(recipe, device)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg["param_dtype"]],
                                  reduce_dtype=DTYPES[cfg["reduce_dtype"]])
        kwargs = {"mesh": mesh, "mp_policy": mp}
        if cfg.get("cpu_offload"):
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        else:
            model.to(device)
        blocks = [m for m in model.modules() if type(m).__name__ in set(cfg["shard_modules"])]
        if not blocks:
            raise RuntimeError(f"fsdp.json shard_modules {cfg['shard_modules']} match no module of "
                               f"{type(model).__name__}; regenerate fsdp.json with `shardforge plan`")
        for block in blocks:
            fully_shard(block, reshard_after_forward=cfg["reshard_after_forward"], **kwargs)
        fully_shard(model, reshard_after_forward=cfg["reshard_after_forward"], **kwargs)
        self.model = model
        self._setup_optim(model)
        self.scaler = None
        if recipe.parallel.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.scaler = ShardedGradScaler(device.type)

    def forward_backward(self, batch, loss_fn, last_micro):
        self.model.set_requires_gradient_sync(last_micro)
        loss = loss_fn(self.model, batch)
        self._backward(loss)
        return loss.detach().float()


class DeepSpeedEngine(Engine):
    def __init__(self, recipe: Recipe, model: torch.nn.Module, device: torch.device, cfg: dict):
        import deepspeed

        self.name = recipe.parallel.engine
        self.recipe, self.device = recipe, device
        # With offload the config names DeepSpeed's CPU AdamW; otherwise torch's AdamW is the client.
        client_optimizer, params = None, param_groups(model, recipe.optim.weight_decay)
        if "optimizer" not in cfg:
            client_optimizer, params = build_adamw(model, recipe.optim, device), None
        factor = lr_factor(recipe.optim, recipe.train.max_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=client_optimizer, model_parameters=params, config=cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
        self.model = self.engine

    def forward_backward(self, batch, loss_fn, last_micro):
        loss = loss_fn(self.engine, batch)
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed only updates at the accumulation boundary
        return loss.detach().float()

    def optimizer_step(self, nonfinite_loss):
        # DeepSpeed already stepped (inside engine.step()); a non-finite step can only be reported.
        value = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(0.0 if value is None else float(value), device=self.device)
        found = (nonfinite_loss > 0).float()
        if self.recipe.parallel.precision != "fp16":  # fp16 overflow is the loss scaler's business
            found = torch.maximum(found, (~torch.isfinite(norm)).float())
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return norm, found

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
            if dist.get_rank() == 0:
                to_universal(path / "deepspeed", "state", tag)
            dist.barrier()
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


def to_universal(ds_dir: Path, tag: str, universal_tag: str) -> Path:
    """Convert ``ds_dir/tag`` into ``ds_dir/universal_tag`` once (atomically), with ``ds_to_universal``.

    ``--inject_missing_state`` adds the parameter-shape metadata that ZeRO-1/2 checkpoints
    written without Megatron lack. The converted copy lives inside the checkpoint directory,
    so pruning removes it with the checkpoint; it is not in the manifest.
    """
    import subprocess
    import sys

    out = ds_dir / universal_tag
    if (out / ".converted").exists():
        return out
    tmp = ds_dir / f".tmp-{universal_tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
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


def read_engine_config(run_dir: Path, engine: str) -> dict:
    name = "fsdp.json" if engine == "fsdp" else "deepspeed.json" if engine.startswith("zero") else None
    return json.loads((run_dir / name).read_text()) if name else {}


def build_engine(recipe: Recipe, model: torch.nn.Module, device: torch.device, run_dir: Path) -> Engine:
    engine = recipe.parallel.engine
    cfg = read_engine_config(run_dir, engine)
    if engine == "ddp":
        return DDPEngine(recipe, model, device)
    if engine == "fsdp":
        return FSDPEngine(recipe, model, device, cfg)
    return DeepSpeedEngine(recipe, model, device, cfg)
