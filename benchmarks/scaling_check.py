"""The scaling model (``train/engines/scaling.py``) against published scaling figures (issue 38).

    python -m benchmarks.scaling_check        # prints the table, writes benchmarks/results/scaling-check.json

Pure arithmetic, seconds on a CPU. Each case is a published run at several GPU counts, put into the
model as that run was set up (model shape, per-GPU batch, engine, GPUs per node); the model's
link constants are its defaults (NCCL's and nccl-tests' figures, not fitted here). One number per
case is taken from the publication: the compute MFU is set so that the model's first (smallest)
point reproduces the published first point ("anchored"), since the model does not know how fast
a given stack's kernels run. Efficiency is tokens per second per GPU against the first point, so
the anchor only sets the compute-to-communication ratio; the column at MFU 40 % shows how much
it matters. Published efficiency is the publication's own tokens/s per GPU (or MFU) ratio.

* llm-foundry MPT-1B, FSDP FULL_SHARD, bf16, seq 2048, 8 → 64 H100 (mosaicml/llm-foundry
  ``scripts/train/benchmarking/README.md``, "H100 80GB BF16", at 4952183): micro-batch 14 on 8
  GPUs, 20 on 16–64, accumulation 1. The H100 cluster's network is not stated there: the model's
  default (one 400 Gb/s NIC per GPU) is assumed.
* torchtitan Llama 3.1 8B, FSDP2, bf16, seq 8192, local batch 2, selective (op) checkpointing,
  8 → 128 H100 with 400 Gb/s per GPU (pytorch/torchtitan ``benchmarks/llama3_h100_202412_torchtitan.md``,
  Tables 1 and 3), without and with ``torch.compile``.
* Megatron-Core GPT-3 175B, 96 → 4,608 H100 at a fixed global batch of 1,152 sequences of 2,048
  (strong scaling), 47 % → 42 % MFU (NVIDIA/Megatron-LM ``README.md``). That run uses tensor (4)
  and pipeline (8) parallelism, which this data-parallel model does not describe: it is put in as
  data parallelism alone over replicas of 32 GPUs (each GPU one 1/32 slice of the model, its
  gradients reduce-scattered and its weights all-gathered as ZeRO-1 / Megatron's distributed
  optimizer does, 2 data-parallel ranks per node), so the prediction leaves out the pipeline
  bubble (its micro-batches per replica fall from 384 to 8) and the tensor-parallel traffic.
  Reported, not asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from train.engines.memory_plan import ModelSizes, Setup
from train.engines.scaling import Compute, Link, flops_per_token, predict

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "scaling-check.json"
DATE = "2026-12-06"
TOLERANCE = 0.05
"""How far (in efficiency, 5 percentage points) the prediction may fall from an asserted case's figure."""


@dataclass(frozen=True)
class Point:
    gpus: int
    micro_batch: int
    accumulation: int
    published: float
    """Tokens/s per GPU, or MFU where only that is published (``Case.metric``)."""


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    sizes: ModelSizes
    engine: str
    seq_len: int
    dp_ranks_per_node: int
    points: tuple[Point, ...]
    checkpointing: Union[bool, str] = False
    gpus_per_dp_rank: int = 1
    """GPUs that hold one data-parallel rank's model (Megatron's tensor × pipeline size)."""
    metric: str = "tokens/s/GPU"
    asserted: bool = True
    note: str = ""

    def setup(self, p: Point) -> Setup:
        return Setup(self.engine, "bf16", activation_checkpointing=self.checkpointing, micro_batch=p.micro_batch,
                     seq_len=self.seq_len, world_size=p.gpus // self.gpus_per_dp_rank,
                     gpus_per_node=self.dp_ranks_per_node, accumulation=p.accumulation)

    def published_mfu(self, p: Point, peak_tflops: float) -> float:
        if self.metric == "MFU":
            return p.published
        return p.published * flops_per_token(self.sizes, self.seq_len) / (peak_tflops * 1e12)


# MPT-1B (llm-foundry's mpt-1b.yaml: d_model 2048, 24 layers, expansion 4, vocab 50368, learned
# positions, biases): 1,315,950,592 parameters, the table's NumParams. Its tied embedding is counted
# once; its learned positions (2048 × 2048) do no matmul, so they stand where an untied input embedding would.
MPT_1B = ModelSizes(params=1_315_950_592, trainable=1_315_950_592, largest_layer=103_153_664, block=50_358_272,
                    root=107_352_064, layers=24, hidden=2048, intermediate=8192, heads=16, vocab=50368,
                    untied_embedding=4_194_304)
# Llama 3.1 8B: 8,030,261,248 parameters; untied input embedding 128256 × 4096.
LLAMA31_8B = ModelSizes(params=8_030_261_248, trainable=8_030_261_248, largest_layer=525_336_576,
                        block=218_112_000, root=1_050_677_248, layers=32, hidden=4096, intermediate=14336,
                        heads=32, vocab=128256, untied_embedding=525_336_576)
# One GPU's 1/32 slice of GPT-3 175B under tensor 4 × pipeline 8: 12 of its 96 layers, a quarter of
# each layer's width (hidden 12288 / 4), 175e9 / 32 parameters (the README's model has "slightly more").
GPT3_175B_SLICE = ModelSizes(params=175_000_000_000 // 32, trainable=175_000_000_000 // 32,
                             largest_layer=12288 * 12288, block=12 * 12288 * 12288 // 4, root=50688 * 12288 // 4,
                             layers=12, hidden=12288 // 4, intermediate=4 * 12288 // 4, heads=96 // 4, vocab=50688)

CASES = (
    Case("llm-foundry MPT-1B, FSDP", "mosaicml/llm-foundry scripts/train/benchmarking/README.md (H100 80GB BF16)",
         MPT_1B, "fsdp", 2048, 8,
         (Point(8, 14, 1, 45455), Point(16, 20, 1, 46037), Point(32, 20, 1, 45130), Point(64, 20, 1, 44402)),
         note="micro-batch 14 on 8 GPUs, 20 from 16 on: not strictly weak scaling"),
    Case("torchtitan Llama 3.1 8B, FSDP2", "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md "
         "(Tables 1, 3)", LLAMA31_8B, "fsdp", 8192, 8, (Point(8, 2, 1, 5762), Point(128, 2, 1, 5605)),
         checkpointing="selective"),
    Case("torchtitan Llama 3.1 8B, FSDP2 + compile", "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md "
         "(Tables 1, 3)", LLAMA31_8B, "fsdp", 8192, 8, (Point(8, 2, 1, 6667), Point(128, 2, 1, 6514)),
         checkpointing="selective"),
    Case("Megatron-Core GPT-3 175B (as DP only)", "NVIDIA/Megatron-LM README.md (strong scaling)",
         GPT3_175B_SLICE, "zero1", 2048, 2, (Point(96, 1, 384, 0.47), Point(4608, 1, 8, 0.42)),
         gpus_per_dp_rank=32, metric="MFU", asserted=False,
         note="TP 4 × PP 8 in the real run; this model has neither, nor the pipeline bubble"),
)


def anchored_mfu(case: Case, link: Link, base: Compute) -> float:
    """The compute MFU at which the model's first point reproduces the published first point
    (bisection: the predicted MFU grows with the compute MFU)."""
    first = case.points[0]
    target = case.published_mfu(first, base.peak_tflops)
    lo, hi = target, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if predict(case.sizes, case.setup(first), link, dataclasses.replace(base, mfu=mid)).mfu < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def efficiencies(case: Case, link: Link, compute: Compute) -> list[float]:
    """Predicted tokens/s per GPU at each point over that at the first."""
    mfus = [predict(case.sizes, case.setup(p), link, compute).mfu for p in case.points]
    return [m / mfus[0] for m in mfus]


def check(link: Optional[Link] = None) -> list[dict]:
    """One row per case and point: published against predicted efficiency (``link``: the model's default)."""
    link = link or Link()
    rows = []
    for case in CASES:
        base, no_overlap = Compute(), Compute(overlap=0.0)
        anchor = dataclasses.replace(base, mfu=anchored_mfu(case, link, base))
        predicted = efficiencies(case, link, anchor)
        serial = efficiencies(case, link, dataclasses.replace(no_overlap, mfu=anchored_mfu(case, link, no_overlap)))
        default = efficiencies(case, link, base)
        for i, p in enumerate(case.points):
            published = p.published / case.points[0].published
            prediction = predict(case.sizes, case.setup(p), link, anchor)
            rows.append({"case": case.name, "source": case.source, "engine": case.engine, "gpus": p.gpus,
                         "micro_batch": p.micro_batch, "accumulation": p.accumulation, "metric": case.metric,
                         "published": p.published, "published_efficiency": published,
                         "published_mfu": case.published_mfu(p, base.peak_tflops),
                         "anchored_mfu": anchor.mfu, "predicted_mfu": prediction.mfu,
                         "predicted_efficiency": predicted[i], "no_overlap_efficiency": serial[i],
                         "efficiency_at_mfu_40": default[i], "exposed_s": prediction.exposed_s,
                         "comm_s": prediction.comm_s, "step_s": prediction.step_s,
                         "asserted": case.asserted, "note": case.note})
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'case':<42} {'GPUs':>5} {'published':>9} {'predicted':>9} {'diff':>6} {'no overlap':>10} "
            f"{'at MFU 40%':>10} {'comm s':>7} {'step s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = (r["predicted_efficiency"] - r["published_efficiency"]) * 100
        lines.append(f"{r['case']:<42} {r['gpus']:5d} {r['published_efficiency']:9.1%} "
                     f"{r['predicted_efficiency']:9.1%} {diff:+6.1f} {r['no_overlap_efficiency']:10.1%} "
                     f"{r['efficiency_at_mfu_40']:10.1%} {r['comm_s']:7.3f} {r['step_s']:7.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="JSON output (default: %(default)s)")
    args = parser.parse_args()
    link = Link()
    rows = check(link)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": DATE, "command": "python -m benchmarks.scaling_check",
                                    "machine": "CPU VM, pure arithmetic", "link": dataclasses.asdict(link),
                                    "tolerance": TOLERANCE, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
