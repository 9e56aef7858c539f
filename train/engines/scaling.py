"""How a step's time would change as a run grows over nodes, per engine (``shardforge plan --nodes``).

Pure arithmetic, like :mod:`train.engines.memory_plan`, whose :func:`~train.engines.memory_plan.collectives`
give the bytes (so the plan's ``comm/step`` and these times agree by construction). A prediction,
not a measurement: ``benchmarks/scaling_check.py`` holds it against published figures
(``benchmarks/RESULTS.md``).

**Weak scaling.** Each GPU keeps the recipe's micro-batch and gradient accumulation, so tokens per
GPU per step stay fixed and the global batch grows with the node count, as in the published
scaling figures. Efficiency is the tokens per second per GPU at N nodes over that at one node
(= the step time at one node over that at N).

**Compute.** FLOPs per token ``F = 6·(P − untied input embedding) + 12·layers·hidden·seq``, as
``train.metrics.flops`` counts MFU (6 per weight for forward and backward, the attention scores
and their product with V as 12·layers·hidden·seq). Compute time per step = tokens per GPU × F ×
recompute / (``mfu`` × peak), where recompute is 4/3 with full activation checkpointing (one more
forward) and 1 otherwise (``selective`` recomputes element-wise work, which F does not count).
Forward is 1/3 of the model's FLOPs, backward 2/3 plus the recomputed forward.

**Communication.** Each collective runs as NCCL's ring over the ``n`` data-parallel ranks on
``N`` nodes of ``g`` GPUs. Each rank sends ``(n−1)/n × payload`` for an all-gather or
reduce-scatter and twice that for an all-reduce. The time is ``sent / bandwidth + calls ×
latency``:

* bandwidth: ``nvlink`` on one node; on several, ``min(nvlink, g × nic)``. A ring crosses each
  node boundary once, and NCCL spreads its rings over the node's NICs (one per GPU here), so a
  node's NICs together carry one GPU's share of the traffic. NCCL's maintainers measure 192 GB/s
  all-reduce busbw across DGX A100 nodes (8 × 200 Gb/s, NVIDIA/nccl#812) and 46–48 GB/s per NDR
  400 Gb/s NIC (NVIDIA/nccl-tests#290).
* latency per call: NCCL's own ring model (``src/graph/tuning.cc``, Simple protocol):
  ``base + (steps − net steps) × nvlink hop + net steps × net hop``. The steps are ``n−1``
  (``2(n−1)`` for an all-reduce), of which ``N−1`` (``2(N−1)``) cross the network. An all-reduce
  takes NCCL's tree instead where its latency is shorter, ``base + 2 × ((g−1) × nvlink hop +
  ⌈log2 N⌉ × net hop)``, as NCCL would pick it for small calls on many nodes.

**Overlap.** A collective whose ``hidden_by`` is ``forward`` or ``backward`` overlaps that compute
of its micro-batch; those that run once per step overlap the last micro-batch's backward. The
exposed time is, per micro-batch and window, ``max(0, communication − overlap × compute)``, plus
what nothing hides (ZeRO-1/2's all-gather of the updated weights after the optimizer step). The
windows are a third (forward) and two thirds (backward, plus the recomputed forward) of the
micro-batch's compute; ``Compute.overlap`` is 1 as the engines are designed, and the table also
shows 0 (nothing hidden). Nothing models the slow-down of kernels that share the GPU with NCCL's,
the first gather and last reduce that nothing can hide, or stragglers: against published runs the
prediction is 2–3 points high where the no-overlap figure is within about 1 (``benchmarks/RESULTS.md``).

Not modelled: offload (PCIe and the CPU optimizer), the optimizer step, the data loader, the tree's
and NVLS's bandwidths, tensor and pipeline parallelism.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from train.device_peaks import PEAK_TFLOPS
from train.engines.memory_plan import GB, Collective, ModelSizes, Setup, collectives, estimate

TABLE_ORDER = ("ddp", "zero1", "zero2", "zero3", "fsdp")
"""The rows' order: DDP, the ZeRO stages, FSDP. Not :data:`train.engines.autofit.ENGINE_ORDER`,
auto-fit's preference (FSDP before ZeRO-3): the table's order is pinned by its golden files
(``tests/golden/scaling-*.txt``); tests/test_scaling.py checks both list every engine."""

H100_PEAK_TFLOPS = {precision: PEAK_TFLOPS["H100"][dtype]
                    for precision, dtype in (("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "tf32"))}
"""H100 SXM dense tensor-core peak per ``parallel.precision``; fp32 as TF32 (``parallel.tf32``, on
by default), as its matmuls run."""


@dataclass(frozen=True)
class Link:
    """The interconnect: NCCL's achieved ring bandwidths and its latency model's constants."""

    nvlink_gbs: float = 360.0
    """GB/s per GPU within a node: NCCL's ring busbw over H100 SXM NVLink 4, assumed at 80 % of its
    450 GB/s per direction (NVLS all-reduce reaches about 476, nccl-tests#290; not used here)."""
    nic_gbs: float = 47.0
    """GB/s of each GPU's own NIC: 400 Gb/s InfiniBand NDR, at the 46–48 GB/s NCCL reaches."""
    base_us: float = 8.4
    """NCCL's base latency of a ring collective (tuning.cc, Ring/Simple)."""
    nvlink_hop_us: float = 3.4
    """Per ring step over NVLink (tuning.cc, NVLink Ring/Simple)."""
    net_hop_us: float = 14.0
    """Per ring step over the network (tuning.cc, NET Ring/Simple)."""

    def bandwidth(self, gpus_per_node: int, nodes: int) -> float:
        """Bytes per second each rank's ring traffic moves at (see the module docstring)."""
        nvlink = self.nvlink_gbs * GB if gpus_per_node > 1 else math.inf
        return nvlink if nodes == 1 else min(nvlink, gpus_per_node * self.nic_gbs * GB)

    def latency(self, kind: str, n: int, nodes: int) -> float:
        """Seconds one call over ``n`` ranks on ``nodes`` nodes costs besides its bytes: the ring's
        steps; an all-reduce takes NCCL's tree instead where that is shorter (2 × the hops down a
        node's chain and up a binary tree of nodes, tuning.cc), as NCCL picks it."""
        if n == 1:
            return 0.0
        twice = 2 if kind == "all-reduce" else 1
        steps, net_steps = twice * (n - 1), twice * (nodes - 1)
        ring = self.base_us + (steps - net_steps) * self.nvlink_hop_us + net_steps * self.net_hop_us
        if kind == "all-reduce":
            chain = math.ceil(n / nodes) - 1
            tree = self.base_us + 2 * (chain * self.nvlink_hop_us + math.ceil(math.log2(nodes)) * self.net_hop_us)
            ring = min(ring, tree)
        return ring * 1e-6

    def seconds(self, c: Collective, n: int, gpus_per_node: int) -> float:
        """One run of ``c`` (all its calls) over ``n`` ranks, ``gpus_per_node`` of them per node."""
        if n == 1:
            return 0.0
        nodes = math.ceil(n / gpus_per_node)
        return c.sent(n) / self.bandwidth(gpus_per_node, nodes) + c.calls * self.latency(c.kind, n, nodes)

    def describe(self) -> str:
        return (f"NVLink {self.nvlink_gbs:g} GB/s per GPU, network {self.nic_gbs:g} GB/s per GPU (one NIC each); "
                f"latency per call {self.base_us:g} µs + {self.nvlink_hop_us:g} µs per NVLink ring step + "
                f"{self.net_hop_us:g} µs per network ring step (NCCL's ring model; all-reduce: ring or tree, the shorter)")


@dataclass(frozen=True)
class Compute:
    """How fast the GPU computes: the MFU its kernels reach with no communication exposed."""

    mfu: float = 0.40
    """About what dense training reaches on H100 when compute-bound: llm-foundry publishes 41.8 %
    for MPT-1B on 8 GPUs, torchtitan 33–39 % for Llama 3.1 8B."""
    peak_tflops: float = H100_PEAK_TFLOPS["bf16"]
    gpu: str = "H100 SXM"
    overlap: float = 1.0
    """Share of each forward and backward that communication runs under for free: 1 as the engines
    are designed (prefetch, bucketed reduction during backward), 0 when nothing overlaps (the table's
    ``no overlap`` column)."""

    @classmethod
    def h100(cls, precision: str, mfu: float = 0.40) -> "Compute":
        return cls(mfu=mfu, peak_tflops=H100_PEAK_TFLOPS[precision])

    def describe(self) -> str:
        return f"MFU {self.mfu:.0%} of {self.gpu}'s {self.peak_tflops:g} TFLOP/s dense peak"


def flops_per_token(m: ModelSizes, seq_len: int) -> float:
    """Model FLOPs per token of training, as ``train.metrics.flops.flops_per_token`` counts them."""
    return 6 * (m.params - m.untied_embedding) + 12 * m.layers * m.hidden * seq_len


def recompute_factor(s: Setup) -> float:
    """Compute done per model FLOP: full checkpointing runs every forward twice."""
    return 4 / 3 if s.activation_checkpointing is True else 1.0


@dataclass(frozen=True)
class Prediction:
    """One setup's predicted step, per GPU."""

    setup: Setup
    compute_s: float
    comm_s: float
    """All communication of the step, as if nothing overlapped it."""
    exposed_s: float
    """The communication that compute does not hide."""
    sent_bytes: float
    model_flops: float
    peak_flops: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def mfu(self) -> float:
        """Model FLOPs per second over the GPU's peak."""
        return self.model_flops / (self.step_s * self.peak_flops)


def predict(m: ModelSizes, s: Setup, link: Link = Link(), compute: Compute = Compute()) -> Prediction:
    """The step of ``s`` (its world size and GPUs per node as given) under ``link`` and ``compute``."""
    rate = compute.mfu * compute.peak_tflops * 1e12
    model_flops_mb = s.micro_batch * s.seq_len * flops_per_token(m, s.seq_len)
    forward = model_flops_mb / 3 / rate
    backward = model_flops_mb * (2 / 3 + recompute_factor(s) - 1) / rate
    n, g = s.world_size, min(s.gpus_per_node, s.world_size)
    per_mb = {"forward": 0.0, "backward": 0.0}  # communication in each window of every micro-batch
    last_backward = 0.0  # once per step, in the last micro-batch's backward
    unhidden = total = sent = 0.0
    for c in collectives(m, s):
        t = link.seconds(c, n, g)
        total += t * c.per_step(s)
        sent += c.sent(n) * c.per_step(s)
        if c.hidden_by is None:
            unhidden += t * c.per_step(s)
        elif c.every_micro_batch:
            per_mb[c.hidden_by] += t
        else:
            last_backward += t
    hide_fwd, hide_bwd = compute.overlap * forward, compute.overlap * backward
    exposed = (s.accumulation * max(0.0, per_mb["forward"] - hide_fwd)
               + (s.accumulation - 1) * max(0.0, per_mb["backward"] - hide_bwd)
               + max(0.0, per_mb["backward"] + last_backward - hide_bwd) + unhidden)
    return Prediction(s, s.accumulation * (forward + backward), total, exposed, sent,
                      s.accumulation * model_flops_mb, compute.peak_tflops * 1e12)


def at_nodes(s: Setup, nodes: int) -> Setup:
    """``s`` on ``nodes`` nodes of ``s.gpus_per_node`` GPUs, micro-batch and accumulation per GPU kept."""
    return dataclasses.replace(s, world_size=nodes * s.gpus_per_node)


def parse_nodes(text: str) -> list[int]:
    """``1,2,4`` → ``[1, 2, 4]``: distinct whole numbers ≥ 1, ascending; else ValueError in one line."""
    counts: list[int] = []
    for part in text.split(","):
        item = part.strip()
        if not (item.isascii() and item.isdigit()) or int(item) < 1:  # isdigit alone takes '²' and '٣'
            what = repr(item) if item else f"an empty entry in {text!r}"
            raise ValueError(f"{what} is not a node count (a whole number ≥ 1); give counts separated by commas, "
                             f"e.g. --nodes 1,2,4,8")
        if int(item) in counts:
            raise ValueError(f"{int(item)} is given twice in {text!r}; give each node count once, e.g. --nodes 1,2,4,8")
        counts.append(int(item))
    return sorted(counts)


def scaling_table(m: ModelSizes, setup: Setup, nodes: Sequence[int], gpu_bytes: Optional[float] = None,
                  link: Link = Link(), compute: Optional[Compute] = None) -> str:
    """What ``shardforge plan --nodes`` prints: every engine at each node count, weak scaling, with
    the efficiency as the engines are designed (communication hidden where they overlap it) and as
    it would be if nothing overlapped (each against its own one-node step)."""
    compute = compute or Compute.h100(setup.precision)
    serial = dataclasses.replace(compute, overlap=0.0)
    g = setup.gpus_per_node
    tokens = setup.micro_batch * setup.seq_len * setup.accumulation
    ckpt = {False: "no recompute", True: "full checkpointing (×4/3 compute)",
            "selective": "selective checkpointing (recompute not counted)"}[setup.activation_checkpointing]
    lines = [f"# scaling: weak, {g} GPUs per node; each GPU keeps micro-batch {setup.micro_batch} × {setup.seq_len} "
             f"tokens × accumulation {setup.accumulation} = {tokens} tokens per step (the global batch grows "
             f"with the nodes)",
             f"# compute: {flops_per_token(m, setup.seq_len) / 1e9:.3g} GFLOP per token (6 per weight + attention "
             f"12·layers·hidden·seq), {compute.describe()}, {ckpt}",
             f"# links: {link.describe()}",
             f"#   {'engine':<6} {'nodes':>5} {'GPUs':>5} {'compute s':>10} {'comm s':>9} {'exposed s':>10} "
             f"{'step s':>8} {'sent GB':>8} {'MFU':>6} {'efficiency':>10} {'no overlap':>10}  fits"]
    for engine in TABLE_ORDER:
        base = dataclasses.replace(setup, engine=engine, offload=False)
        one, one_serial = (predict(m, at_nodes(base, 1), link, c) for c in (compute, serial))
        for count in nodes:
            s = at_nodes(base, count)
            p, p_serial = (predict(m, s, link, c) for c in (compute, serial))
            fits = "-" if not gpu_bytes else ("yes" if estimate(m, s).fits(gpu_bytes) else "no")
            mark = "*" if engine == setup.engine else " "
            lines.append(f"# {mark} {engine:<6} {count:5d} {s.world_size:5d} {p.compute_s:10.3f} {p.comm_s:9.3f} "
                         f"{p.exposed_s:10.3f} {p.step_s:8.3f} {p.sent_bytes / GB:8.2f} {p.mfu:6.1%} "
                         f"{one.step_s / p.step_s:10.1%} {one_serial.step_s / p_serial.step_s:10.1%}  {fits}")
    lines.append("# (* the recipe's engine; comm s: all communication of the step; exposed s: what compute does not "
                 "hide; sent GB: per GPU per step; efficiency: tokens/s per GPU against 1 node, communication hidden "
                 "where the engine overlaps it; no overlap: the same if none were hidden; fits: the memory plan "
                 + ("at that size)" if gpu_bytes else "needs parallel.gpu_mem_gb)"))
    if setup.offload:
        lines.append("# (offload is not modelled: these rows keep everything on the GPU)")
    return "\n".join(lines)
