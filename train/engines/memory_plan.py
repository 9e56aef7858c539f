"""What one training step holds in each GPU's memory, per engine, worked out before anything launches.

Pure arithmetic on the model's sizes (:class:`ModelSizes`, counted from a meta-device build in
``train.config.model_checks.model_sizes``): no torch import here. Byte counts per GPU, with ``P``
parameters, ``T`` of them trainable, ``N`` data-parallel ranks and ``w`` bytes per value in the
compute precision (2 for bf16/fp16, 4 for fp32); master weights and Adam's two moments are fp32:

==========  ===============================  ==========================  ====================
engine      parameters                       gradients                   optimizer
==========  ===============================  ==========================  ====================
ddp         4P (fp32, autocast computes w)   4T                          8T
fsdp        4P/N + w·(2 blocks + root)       4T/N + w·block              8T/N
zero1       w·P                              w·T + 4T/N (mixed)          (4 + 8)T/N (mixed)
zero2       w·P                              (w + 4)T/N (mixed)          (4 + 8)T/N (mixed)
zero3       w·P/N + 4·largest layer          (w + 4)T/N (mixed)          (4 + 8)T/N (mixed)
==========  ===============================  ==========================  ====================

ZeRO-2 equals DeepSpeed's own ``estimate_zero2_model_states_mem_needs`` in mixed precision; ZeRO-3
is DeepSpeed's ``estimate_zero3_model_states_mem_needs`` plus ``2P/N``: its estimator counts 18
bytes per partitioned parameter, but the optimizer step also makes an fp32 copy of the gradient
partition (one sub-group of up to 10⁹ elements at a time: for 7B on 32 GPUs, all of it), which
makes 20 (tests/test_memory_plan.py checks both). In fp32 DeepSpeed keeps no separate master copy
(the 4-byte gradient and master terms drop). With offload, ZeRO-2 keeps only the 16-bit weights
on the GPU, ZeRO-3 and FSDP only what is gathered at a time; the rest sits in host memory.

Activations per micro-batch are bytes per token, fitted to what autograd saves for backward in
transformers' Llama and GPT-2 (``torch.autograd.graph.saved_tensors_hooks``, tests check the
fit): per layer ``40h + 18I`` in fp32, ``33h + 10I`` in mixed precision (``h`` hidden, ``I``
MLP width), ``+ 12·heads·seq`` when attention probabilities are kept (eager attention or
attention dropout), and ``4V + 12h`` for the logits and loss. Autocast (DDP in bf16/fp16) also
keeps a 16-bit copy of each weight it casts until backward (``+2P``, less an untied input
embedding). ``activation_checkpointing: true`` keeps each block's input (``4h`` per token and
layer) plus one block being recomputed; ``selective`` keeps the matmul and attention outputs,
``w·(6h + 2I)`` (both from the formula, not measured: autograd's hooks do not see inside a
checkpoint). The fit is on CPU.

On a GPU more comes on top, counted as ``runtime``: the CUDA context (about 0.6 GB with torch's lazily
loaded kernels), NCCL's buffers once there are peers (4 MiB per channel, direction and ring
neighbour at up to 32 channels: about 0.5 GB), and what each engine communicates through:
DeepSpeed's reduce bucket, twice with ``overlap_comm`` (on), plus its all-gather bucket (ZeRO-1/2)
or ZeRO-3's prefetch bucket, at ``parallel.reduce_bucket_mb`` each; FSDP's copy of one block's
gradients in the reduce dtype when that differs from the compute dtype. The allocator's cached but
unused blocks are the 10 % a plan leaves free: it fits when its total is within 90 % of the GPU.
These GPU terms come from the libraries' documented defaults, not from a measurement on a GPU yet
(``bash benchmarks/gpu.sh`` records the plan beside ``max_memory_reserved``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

ENGINES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
OFFLOADABLE = ("fsdp", "zero1", "zero2", "zero3")
HEADROOM = 0.9
"""A plan fits when its total is at most this share of the GPU's memory."""
GB = 1e9
CUDA_CONTEXT_BYTES = 0.6e9
"""The CUDA context and torch's loaded kernels on each GPU."""
NCCL_BYTES = 0.5e9
"""NCCL's communication buffers of one process group with peers (see the module docstring)."""


@dataclass(frozen=True)
class ModelSizes:
    """The numbers of the model that memory depends on."""

    params: int
    """All parameters (tied weights counted once)."""
    trainable: int
    """Parameters that get gradients and optimizer state (LoRA and frozen layers make it fewer)."""
    largest_layer: int
    """Most parameters held directly by one module: what ZeRO-3 gathers at once (DeepSpeed's term)."""
    block: int
    """Parameters of one transformer block: FSDP's unit of gathering."""
    root: int
    """Parameters outside the blocks (embeddings, head, final norm): FSDP's root stays gathered."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    untied_embedding: int = 0
    """Input-embedding parameters not shared with the output layer: looked up, never cast by autocast."""
    keeps_attention_probs: bool = False
    """Eager attention or attention dropout: the seq × seq probabilities are saved for backward."""


@dataclass(frozen=True)
class Setup:
    """How the model is trained: what changes the memory of a step."""

    engine: str
    precision: str = "bf16"
    offload: bool = False
    activation_checkpointing: Union[bool, str] = False
    micro_batch: int = 1
    seq_len: int = 2048
    world_size: int = 1
    gpus_per_node: int = 1
    accumulation: int = 1
    reduce_bucket_mb: int = 200
    reduce_dtype: Optional[str] = None
    """``parallel.reduce_dtype``: FSDP's gradient reduce dtype (unset: fp32)."""

    def describe(self) -> str:
        """E.g. ``fsdp + offload, micro-batch 2, checkpointing``."""
        ckpt = {False: "", True: ", checkpointing", "selective": ", selective checkpointing"}
        return (f"{self.engine}{' + offload' if self.offload else ''}, micro-batch {self.micro_batch}"
                f"{ckpt[self.activation_checkpointing]}")


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU (and per node of host memory) for one setup."""

    setup: Setup
    params: float
    grads: float
    optimizer: float
    activations: float
    host_per_node: float
    """Host memory the engine's offloaded state needs on one node, plus rank 0's fp32 copy of the
    weights while the model is built (``train.engines.placement``)."""
    comm_per_step: float
    """Bytes each GPU sends per optimizer step (ring collectives, gradient accumulation counted)."""
    runtime: float = 0.0
    """The CUDA context, NCCL's buffers and the engine's communication buffers."""

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.runtime

    def fits(self, gpu_bytes: float) -> bool:
        return self.total <= HEADROOM * gpu_bytes


def activation_bytes(m: ModelSizes, s: Setup) -> float:
    """Bytes autograd keeps for backward for one micro-batch (see the module docstring)."""
    mixed = s.precision != "fp32"
    w = 2 if mixed else 4
    h, inner = m.hidden, m.intermediate
    layer = (33 * h + 10 * inner) if mixed else (40 * h + 18 * inner)
    if m.keeps_attention_probs:
        layer += 12 * m.heads * s.seq_len
    if s.activation_checkpointing is True:
        kept = 4 * h * m.layers + layer  # block inputs, and the one block being recomputed
    elif s.activation_checkpointing == "selective":
        kept = w * (6 * h + 2 * inner) * m.layers + layer
    else:
        kept = layer * m.layers
    tokens = s.micro_batch * s.seq_len
    autocast_copies = 2 * (m.params - m.untied_embedding) if mixed and s.engine == "ddp" else 0
    return tokens * (kept + 4 * m.vocab + 12 * h) + autocast_copies


def estimate(m: ModelSizes, s: Setup) -> Estimate:
    """Per-GPU memory and traffic of ``s`` (see the module docstring for the terms)."""
    mixed = s.precision != "fp32"
    w = 2 if mixed else 4
    n, P, T = s.world_size, m.params, m.trainable
    master = 4 if mixed else 0  # DeepSpeed's fp32 copy of the 16-bit weights (and of their gradients)
    build_copy = 4 * P  # rank 0 builds the fp32 weights once (engines.placement)
    offloaded = 0.0
    params: float
    grads: float
    optim: float
    if s.engine == "ddp":
        params, grads, optim = 4 * P, 4 * T, 8 * T
    elif s.engine == "fsdp":
        gathered = w * (2 * m.block + m.root)
        params, grads, optim = 4 * P / n + gathered, 4 * T / n + w * m.block, 8 * T / n
        if s.offload:
            offloaded = 4 * P / n + 4 * T / n + 8 * T / n
            params, grads, optim = gathered, w * m.block, 0
    elif s.engine in ("zero1", "zero2"):
        params = w * P
        grads = (w * T + master * T / n) if s.engine == "zero1" else (w + master) * T / n
        optim = (master + 8) * T / n
        if s.offload:
            offloaded = (4 + master + 8) * T / n
            grads, optim = (w * T if s.engine == "zero1" else 0), 0
    else:
        params, grads, optim = w * P / n + 4 * m.largest_layer, (w + master) * T / n, (master + 8) * T / n
        if s.offload:
            offloaded = w * P / n + (w + master) * T / n + (master + 8) * T / n
            params, grads, optim = 4 * m.largest_layer, 0, 0
    host = offloaded * s.gpus_per_node + build_copy
    comm = sum(c.sent(n) * c.per_step(s) for c in collectives(m, s))
    return Estimate(s, params, grads, optim, activation_bytes(m, s), host, comm, runtime_bytes(m, s))


DDP_BUCKET_BYTES = 25 * 2**20
"""torch DDP's default ``bucket_cap_mb``: the gradients' all-reduce is issued in calls of this size."""


@dataclass(frozen=True)
class Collective:
    """One collective an engine runs: its payload, how often, and the compute it can hide behind
    (``train.engines.scaling`` times it; :func:`estimate` sums its bytes as ``comm_per_step``)."""

    kind: str
    """``all-reduce`` (of the gradients), ``all-gather`` (of the weights) or ``reduce-scatter`` (of the gradients)."""
    payload: float
    """Bytes of the whole tensor: what every rank holds after an all-gather, or contributes to a reduction."""
    every_micro_batch: bool
    """Once per micro-batch; else once per optimizer step, in the last micro-batch."""
    hidden_by: Optional[str]
    """``forward`` or ``backward`` (of its micro-batch): the compute it overlaps; ``None``: nothing."""
    calls: int
    """NCCL calls it is issued as (buckets, or one per block and one for the root)."""

    def sent(self, n: int) -> float:
        """Bytes each of ``n`` ranks sends for one run of it, in NCCL's ring: ``(n-1)/n`` of the
        payload for an all-gather or reduce-scatter, twice that for an all-reduce."""
        return (2 if self.kind == "all-reduce" else 1) * (n - 1) / n * self.payload

    def per_step(self, s: Setup) -> int:
        return s.accumulation if self.every_micro_batch else 1


def collectives(m: ModelSizes, s: Setup) -> list[Collective]:
    """What the engine of ``s`` communicates in one optimizer step, with ``w`` bytes per value in
    the compute precision and ``r`` in the gradients' reduction (``parallel.reduce_dtype``; unset:
    fp32 for FSDP, ``w`` for DeepSpeed):

    ==========  ===========================================================================
    ddp         all-reduce 4T (fp32 gradients) once per step, in the last backward (``no_sync``)
    zero1       reduce-scatter r·T once per step, in the last backward; all-gather w·P after the step
    zero2       reduce-scatter r·T in every backward; all-gather w·P after the step
    zero3       all-gather w·P in every forward and again in every backward; reduce-scatter r·T in
                every backward
    fsdp        as ZeRO-3, but the reduce-scatter only in the last backward
                (``set_requires_gradient_sync``), in fp32 unless ``reduce_dtype`` says otherwise
    ==========  ===========================================================================
    """
    w = 2 if s.precision != "fp32" else 4
    default_r = 4 if s.engine == "fsdp" else w  # FSDP's policy reduces in fp32 (engines.config); DeepSpeed in w
    r = {"bf16": 2, "fp32": 4}[s.reduce_dtype] if s.reduce_dtype else default_r
    P, T = m.params, m.trainable
    if s.engine == "ddp":
        return [Collective("all-reduce", 4 * T, False, "backward", math.ceil(4 * T / DDP_BUCKET_BYTES))]
    if s.engine in ("zero1", "zero2"):
        bucket = s.reduce_bucket_mb * 2**20 // w  # elements, as engines.config writes it for DeepSpeed
        return [Collective("reduce-scatter", r * T, s.engine == "zero2", "backward", math.ceil(T / bucket)),
                Collective("all-gather", w * P, False, None, math.ceil(P / bucket))]
    units = m.layers + 1  # one gather (and reduce) per transformer block, one for the root
    return [Collective("all-gather", w * P, True, "forward", units),
            Collective("all-gather", w * P, True, "backward", units),
            Collective("reduce-scatter", r * T, s.engine == "zero3", "backward", units)]


def runtime_bytes(m: ModelSizes, s: Setup) -> float:
    """What a GPU holds besides the model's tensors (see the module docstring)."""
    w = 2 if s.precision != "fp32" else 4
    buffers = 0.0
    if s.engine.startswith("zero"):
        bucket = s.reduce_bucket_mb * 2**20  # the same bytes whatever the dtype (engines.config)
        buffers = 2 * bucket + bucket  # reduce bucket, double-buffered by overlap_comm; gather/prefetch bucket
    elif s.engine == "fsdp":
        reduce_w = 2 if s.reduce_dtype == "bf16" else 4
        buffers = reduce_w * m.block if reduce_w != w else 0.0
    return CUDA_CONTEXT_BYTES + (NCCL_BYTES if s.world_size > 1 else 0.0) + buffers


def alternatives(setup: Setup) -> list[Setup]:
    """Other setups, cheapest change first: checkpointing, a smaller micro-batch (more
    accumulation), another engine, offload."""
    out: list[Setup] = []
    ckpt_choices: dict[Union[bool, str], list[Union[bool, str]]] = {
        False: ["selective", True], "selective": [True], True: []}
    ckpt_options = ckpt_choices[setup.activation_checkpointing]
    out += [dataclasses.replace(setup, activation_checkpointing=c) for c in ckpt_options]
    mb = setup.micro_batch // 2
    while mb >= 1:
        out.append(dataclasses.replace(setup, micro_batch=mb, accumulation=setup.accumulation * setup.micro_batch // mb))
        mb //= 2
    for engine in ("zero2", "fsdp", "zero3"):
        if engine != setup.engine:
            out.append(dataclasses.replace(setup, engine=engine, offload=False))
    for engine in ("fsdp", "zero3"):
        out.append(dataclasses.replace(setup, engine=engine, offload=True))
    return [s for s in out if s != setup]


def setting_change(old: Setup, new: Setup) -> str:
    """The recipe overrides that turn ``old`` into ``new``."""
    parts = []
    if new.engine != old.engine:
        parts.append(f"parallel.engine={new.engine}")
    if new.offload != old.offload:
        parts.append(f"parallel.offload={str(new.offload).lower()}")
    if new.activation_checkpointing != old.activation_checkpointing:
        value = new.activation_checkpointing
        parts.append(f"model.activation_checkpointing={value if isinstance(value, str) else str(value).lower()}")
    if new.micro_batch != old.micro_batch:
        parts.append(f"train.micro_batch_size={new.micro_batch}")
    return " ".join(parts)


def fit_problem(m: ModelSizes, setup: Setup, gpu_bytes: float) -> Optional[str]:
    """``None`` when the setup fits ``gpu_bytes``; otherwise one line: what it needs, the
    arithmetic, and the first setting that would fit (or that nothing here does)."""
    e = estimate(m, setup)
    if e.fits(gpu_bytes):
        return None
    need = (f"memory: {setup.describe()} needs {e.total / GB:.1f} GB per GPU (weights {e.params / GB:.1f} + "
            f"gradients {e.grads / GB:.1f} + optimizer {e.optimizer / GB:.1f} + activations "
            f"{e.activations / GB:.1f} + CUDA/NCCL/buffers {e.runtime / GB:.1f}), more than {HEADROOM:.0%} of the "
            f"GPU's {gpu_bytes / GB:.3g} GB")
    for alt in alternatives(setup):
        other = estimate(m, alt)
        if other.fits(gpu_bytes):
            return f"{need}; set {setting_change(setup, alt)} ({other.total / GB:.1f} GB per GPU)"
    return f"{need}; no engine, offload, checkpointing or micro-batch fits: use more GPUs or GPUs with more memory"


def plan_table(m: ModelSizes, setup: Setup, gpu_bytes: Optional[float]) -> str:
    """The memory plan ``shardforge plan`` prints: the recipe's setup, then every engine with and
    without offload and checkpointing, in GB per GPU."""
    rows = [setup]
    for engine in ENGINES:
        for offload in ((False, True) if engine in OFFLOADABLE else (False,)):
            for ckpt in (False, True):
                s = dataclasses.replace(setup, engine=engine, offload=offload, activation_checkpointing=ckpt)
                if s != setup:
                    rows.append(s)
    head = (f"# memory per GPU, GB ({m.params / 1e9:.3g}B parameters, {m.trainable / 1e9:.3g}B trainable, "
            f"{setup.world_size} GPUs, {setup.precision}, micro-batch {setup.micro_batch} × {setup.seq_len} tokens; "
            + (f"GPU {gpu_bytes / GB:.0f} GB, fits = total ≤ {HEADROOM:.0%})" if gpu_bytes else
               "GPU memory unknown: set parallel.gpu_mem_gb)"))
    lines = [head, f"#   {'setup':<50} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'runtime':>7} "
                   f"{'total':>7} {'host/node':>9} {'comm/step':>9}  fits"]
    for i, s in enumerate(rows):
        e = estimate(m, s)
        fits = "-" if not gpu_bytes else ("yes" if e.fits(gpu_bytes) else "no")
        mark = "*" if i == 0 else " "
        lines.append(f"# {mark} {s.describe():<50} {e.params / GB:8.2f} {e.grads / GB:7.2f} {e.optimizer / GB:7.2f} "
                     f"{e.activations / GB:7.2f} {e.runtime / GB:7.2f} {e.total / GB:7.2f} {e.host_per_node / GB:9.1f} "
                     f"{e.comm_per_step / GB:9.2f}  {fits}")
    lines.append("# (* the recipe's setup; runtime: CUDA context, NCCL and the engine's communication buffers; "
                 "host/node: offloaded state + rank 0's fp32 copy while building; "
                 "comm/step: GB each GPU sends per optimizer step)")
    return "\n".join(lines)
