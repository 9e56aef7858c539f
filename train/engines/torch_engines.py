"""The torch engines: DDP and FSDP2, with torch AdamW, LambdaLR and DCP checkpoints.

* DDP: ``no_sync`` on every micro-batch but the last; autocast for bf16/fp16, a GradScaler for fp16.
* FSDP2: ``fully_shard`` on each transformer block, then the root, with the MixedPrecisionPolicy
  from ``fsdp.json``; ``set_requires_gradient_sync`` for accumulation.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Optional, cast

import torch
import torch.distributed as dist

from train.engines.base import DTYPES, Engine
from train.engines.placement import InitialWeights, is_empty, materialize
from train.model import shard_units
from train.checkpoint.files import CheckpointError
from train.checkpoint.safe_load import safe_reader
from train.optim import build_adamw, build_scheduler
from train.config.recipe import Recipe


class _TorchEngine(Engine):
    """Shared by DDP and FSDP2: torch AdamW, LambdaLR, DCP checkpoints."""

    scaler: Optional[torch.amp.GradScaler]
    """The fp16 loss scaler (``None`` for bf16/fp32); each engine sets it."""

    def __init__(self, recipe: Recipe, device: torch.device, accum: int):
        self.recipe, self.device, self.accum = recipe, device, accum
        self.clip = recipe.optim.grad_clip
        self._skipped = 0
        self._skipped_on_device = torch.zeros((), dtype=torch.int64, device=device)
        """fp16 steps the loss scaler skipped since the last read of :attr:`skipped_steps` (a log step)."""
        self._save_group = None
        self._stager: Any = None  # the background saves' CPU copy of the state, made once and refilled

    def _setup_optim(self, params_model: torch.nn.Module) -> None:
        # With frozen parameters (LoRA, frozen layers) a checkpoint holds only what trains; the
        # frozen rest is rebuilt from model.pretrained (or the seed) and checked by its digest.
        self.trainable_only = any(not p.requires_grad for p in params_model.parameters())
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
        if dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        if self.scaler:  # no host sync: get_scale() would .item() twice per step
            scale = self.scaler._get_scale_async().clone()  # the scale tensor, updated in place below
            self.scaler.step(self.optimizer)  # fused AdamW skips on the scaler's found_inf, on the device
            self.scaler.update()
            self._skipped_on_device += self.scaler._get_scale_async() < scale  # a skipped step lowers it
        else:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, found  # fused AdamW skips on it
            self.optimizer.step()
            self.optimizer.found_inf = None
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, found

    def _state_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.trainable_only)

    @property
    def lr(self) -> float:
        return cast(float, self.scheduler.get_last_lr()[0])  # a float lr gives floats: stubs allow a Tensor

    @property
    def skipped_steps(self) -> int:
        """Read at log steps and saves: the one host sync of the count."""
        if self.scaler:
            self._skipped += int(self._skipped_on_device.item())
            self._skipped_on_device.zero_()
        return self._skipped

    def _extra_state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "skipped": self.skipped_steps,
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def save(self, path: Path, background: bool = False, digests: Optional[dict] = None):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from train.checkpoint.files import dcp_writer

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._state_options())
        writer = dcp_writer(path / "dcp", digests if digests is not None else {})
        future = None
        if not background:
            dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
        else:
            if self._save_group is None:  # the writer thread's collectives must not interleave with training's
                self._save_group = dist.new_group(backend="gloo")
            future = dcp.async_save({"model": model_sd, "optim": optim_sd}, storage_writer=writer,
                                    process_group=self._save_group, async_stager=self.stager())
        if dist.get_rank() == 0:  # after DCP's collectives: failing here (disk full) leaves no peer waiting in them
            torch.save(self._extra_state(), path / "engine_extra.pt")
        return future

    def stager(self):
        """The staging of background saves, kept for the whole run: its CPU copy of the state (pinned
        on a GPU host, for fast device-to-host copies) is allocated at the first save and refilled in
        place by the next ones, where DCP's default would allocate fresh pageable memory every save.
        Refilling is safe: the checkpointer starts a save only after the previous one is written."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._stager = DefaultStager(StagingOptions(use_pinned_memory=self.device.type == "cuda",
                                                        use_shared_memory=False, use_async_staging=False,
                                                        use_non_blocking_copy=False))
        return self._stager

    def load(self, path: Path, saved_world_size: int) -> None:  # DCP reshards by itself
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._state_options())
        _check_shapes(path, model_sd)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, storage_reader=safe_reader(path / "dcp"))
        keys = set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                              optim_state_dict=state["optim"],
                              options=StateDictOptions(strict=not self.trainable_only))
        frozen = {name.removeprefix("module.") for name, p in self.model.named_parameters() if not p.requires_grad}
        unloaded = {k.removeprefix("module.") for k in keys.missing_keys} - frozen
        if unloaded or keys.unexpected_keys:  # only frozen parameters may come from elsewhere
            raise RuntimeError(f"{path}: model state does not match (missing {sorted(unloaded)[:5]}, "
                               f"unexpected {sorted(keys.unexpected_keys)[:5]})")
        extra = torch.load(path / "engine_extra.pt", weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        self._skipped = extra["skipped"]
        self._skipped_on_device.zero_()
        if self.scaler and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])

    def full_model_state(self) -> Optional[dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
        return sd if dist.get_rank() == 0 else None


def _check_shapes(path: Path, model_sd: dict) -> None:
    """Refuse a checkpoint of another model in one line naming the shapes that differ (DCP's own
    "Size mismatch" error comes from deep inside the load, as a traceback)."""
    declared = safe_reader(path / "dcp").read_metadata().state_dict_metadata
    differ = [f"{name} is {tuple(saved.size)} there, {tuple(tensor.shape)} here" for name, tensor in model_sd.items()
              if hasattr(saved := declared.get(f"model.{name}"), "size") and tuple(saved.size) != tuple(tensor.shape)]
    if differ:
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise CheckpointError(f"resume: {path} holds another model: {differ[0]}{more}; resume with the model "
                              f"settings it was saved with, or from another checkpoint (checkpoint.resume)")


class DDPEngine(_TorchEngine):
    name = "ddp"

    def __init__(self, recipe: Recipe, model: torch.nn.Module, device: torch.device, *, accum: int,
                 weights: Optional[InitialWeights] = None):
        super().__init__(recipe, device, accum)
        from torch.nn.parallel import DistributedDataParallel

        if is_empty(model):  # a rank > 0: the wrapper broadcasts rank 0's parameters and buffers into it
            materialize(model, device)
        model.to(device)
        self.precision = recipe.parallel.precision
        # One process has nothing to synchronise: skip the wrapper's bucket copies and hooks.
        self.model = model if dist.get_world_size() == 1 else DistributedDataParallel(  # grads live in the buckets
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
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

    def __init__(self, recipe: Recipe, model: torch.nn.Module, device: torch.device, *, accum: int, cfg: dict,
                 weights: Optional[InitialWeights] = None):
        super().__init__(recipe, device, accum)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg["param_dtype"]],
                                  reduce_dtype=DTYPES[cfg["reduce_dtype"]])
        kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mp}
        if cfg.get("cpu_offload"):
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        empty = is_empty(model)  # fully_shard moves a real model's tensors to the device one block at a time
        names = cfg.get("shard_modules")  # null: the model's own blocks; a list: fsdp.json written before that
        blocks = [m for m in model.modules() if type(m).__name__ in set(names)] if names else shard_units(model)
        if not blocks:
            raise RuntimeError(f"fsdp.json shard_modules {names or 'null (the model blocks)'} match no module "
                               f"of {type(model).__name__}; set them to its transformer block class names")
        for block in blocks:
            fully_shard(block, reshard_after_forward=cfg["reshard_after_forward"], **kwargs)
        fully_shard(model, **kwargs)  # the root keeps FSDP's default: unsharded after forward, as backward needs it first
        if weights is not None and weights.from_rank0:
            self._receive_rank0_weights(model, empty, torch.device("cpu") if cfg.get("cpu_offload") else device,
                                        weights)
        self.model = model
        self._setup_optim(model)
        self.scaler = None
        if recipe.parallel.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.scaler = ShardedGradScaler(device.type)

    @staticmethod
    def _receive_rank0_weights(model: torch.nn.Module, empty: bool, device: torch.device,
                               weights: InitialWeights) -> None:
        """Every rank's shards get rank 0's values: rank 0 broadcasts its full state (it built the
        weights), the others allocate their shards of the meta model first."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if empty:
            materialize(model, device)
        set_model_state_dict(model, weights.state if weights.state is not None else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        weights.state = None  # rank 0's full copy is no longer needed

    def forward_backward(self, batch, loss_fn, last_micro):
        self.model.set_requires_gradient_sync(last_micro)
        loss = loss_fn(self.model, batch)
        self._backward(loss)
        return loss.detach().float()
