"""Where each rank's initial weights come from: rank 0 builds them, every other rank builds only
the model's structure, and the engine gives every rank rank 0's values.

One fp32 copy of the weights per job on the host, not one per rank (an 8-GPU node building a 7B
model eight times needs about 301 GB; ``python -m benchmarks.build_memory``):

* rank 0 builds the weights exactly as a single process would (seeded random init or the
  pretrained file): one copy per job on its host, so initial weights are bit-equal whatever
  the world size;
* ranks > 0 build on the meta device (``accelerate.init_empty_weights``, buffers kept real) —
  or, for ZeRO-3, every rank builds inside DeepSpeed's ``zero.Init`` and holds only its
  partition from the start;
* the engine fills them: DDP and DeepSpeed ZeRO-1/2 broadcast rank 0's parameters themselves when
  they wrap the model; FSDP2 shards the empty model and ``set_model_state_dict(...,
  broadcast_from_rank0=True)`` sends rank 0's full state to every shard; ZeRO-3 gathers one
  parameter at a time with ``GatheredParameters(modifier_rank=0)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from train.engines import capabilities

BuildFn = Callable[[Optional[contextlib.AbstractContextManager]], torch.nn.Module]


@dataclass
class InitialWeights:
    """What an engine needs to give every rank the same initial weights."""

    from_rank0: bool = False
    """Ranks > 0 hold an empty model (meta or ZeRO-3 partitions): rank 0's values must be sent."""
    state: Optional[dict] = field(default=None, repr=False)
    """Rank 0's full state dict when the engine fills a model built empty on rank 0 too (ZeRO-3)
    or shards its own (FSDP2); ``None`` elsewhere."""


def place_model(engine: str, build: BuildFn, rank: int, world_size: int,
                zero3_config: Optional[dict] = None) -> tuple[torch.nn.Module, InitialWeights]:
    """Build the model for ``engine`` on this rank; see the module docstring.

    ``build(None)`` builds the weights; ``build(ctx)`` builds the structure inside ``ctx``.
    """
    if world_size == 1:
        return build(None), InitialWeights()
    stage = capabilities(engine).zero_stage
    if stage == 3:
        source = build(None) if rank == 0 else None
        with _hf_zero3(zero3_config):  # transformers builds it inside zero.Init
            model = build(contextlib.nullcontext())
        return model, InitialWeights(True, source.state_dict() if source is not None else None)
    if rank == 0:
        model = build(None)
        return model, InitialWeights(True, model.state_dict() if engine == "fsdp" else None)
    from accelerate import init_empty_weights

    return build(init_empty_weights(include_buffers=False)), InitialWeights(True)


def is_empty(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are on the meta device (built without weights)."""
    return any(p.is_meta for p in model.parameters())


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate a meta model's parameters on ``device`` (values still undefined: the engine sends
    rank 0's), keeping its buffers, which ``init_empty_weights(include_buffers=False)`` built for
    real (rotary frequencies and position ids are not in any state dict)."""
    buffers = dict(model.named_buffers())
    shared: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # tied weights: one parameter, several owners
    for module in model.modules():
        for leaf, param in module._parameters.items():
            if param is not None:
                shared.setdefault(id(param), []).append((module, leaf))
    model.to_empty(device=device)  # allocates one tensor per owner from the meta device: re-tie them
    for (first, first_leaf), *others in shared.values():
        for module, leaf in others:
            module._parameters[leaf] = first._parameters[first_leaf]
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value.to(device)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (DeepSpeed broadcasts parameters only)."""
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def copy_into_zero3(model: torch.nn.Module, weights: InitialWeights) -> None:
    """Fill a model built under ``zero.Init`` with rank 0's values, one parameter at a time (the
    whole model is never gathered), then its buffers."""
    import deepspeed

    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if weights.state is not None:
                param.data.copy_(weights.state[name])
    broadcast_buffers(model)


@contextlib.contextmanager
def _hf_zero3(config: Optional[dict]):
    """Tell transformers a ZeRO-3 build is under way: ``from_config`` then constructs the model
    inside ``zero.Init`` (keeping rotary buffers in fp32); forgotten afterwards, so nothing else
    in the run sees a global DeepSpeed config."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(config)  # transformers holds only a weak reference
    try:
        yield keep
    finally:
        unset_hf_deepspeed_config()
