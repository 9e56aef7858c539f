"""The scaling model (train/engines/scaling.py): each engine's bytes against hand-computed ring
traffic and the memory plan's closed forms, the link times, the overlap arithmetic, the ``plan
--nodes`` refusals, the printed table (golden file), and the check against published figures."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from train.engines.memory_plan import ENGINES, ModelSizes, Setup, collectives, estimate
from train.engines.scaling import (H100_PEAK_TFLOPS, Compute, Link, at_nodes, flops_per_token, parse_nodes, predict,
                                   scaling_table)

GOLDEN = Path(__file__).parent / "golden"
SMALL = ModelSizes(params=1000, trainable=1000, largest_layer=100, block=200, root=200, layers=1, hidden=1,
                   intermediate=4, heads=1, vocab=10)


def small(engine: str, precision: str = "bf16", accumulation: int = 2, world: int = 4, **kw) -> Setup:
    return Setup(engine, precision, micro_batch=1, seq_len=1, world_size=world, gpus_per_node=world,
                 accumulation=accumulation, **kw)


# Bytes each GPU sends per step, P = T = 1000 on 4 ranks, 2 micro-batches: a ring all-gather or
# reduce-scatter sends 3/4 of the payload, an all-reduce twice that.
HAND_BYTES = {
    ("ddp", "bf16"): 2 * 3 / 4 * 4 * 1000,                        # fp32 gradients all-reduced once: 6000
    ("zero1", "bf16"): 3 / 4 * 2 * 1000 + 3 / 4 * 2 * 1000,       # reduce-scatter once + all-gather: 3000
    ("zero2", "bf16"): 2 * (3 / 4 * 2 * 1000) + 3 / 4 * 2 * 1000,  # reduce-scatter per micro-batch: 4500
    ("zero3", "bf16"): 2 * (2 * 3 / 4 * 2 * 1000 + 3 / 4 * 2 * 1000),  # 2 gathers + 1 reduce per micro-batch: 9000
    ("fsdp", "bf16"): 2 * (2 * 3 / 4 * 2 * 1000) + 3 / 4 * 4 * 1000,   # gathers per micro-batch, fp32 reduce once: 9000
    ("ddp", "fp32"): 6000.0,
    ("zero1", "fp32"): 6000.0,
    ("zero2", "fp32"): 9000.0,
    ("zero3", "fp32"): 18000.0,
    ("fsdp", "fp32"): 2 * (2 * 3 / 4 * 4 * 1000) + 3 / 4 * 4 * 1000,   # 15000
}


@pytest.mark.parametrize("engine,precision", sorted(HAND_BYTES))
def test_bytes_per_step_match_hand_computed_ring_traffic(engine, precision):
    s = small(engine, precision)
    assert sum(c.sent(4) * c.per_step(s) for c in collectives(SMALL, s)) == pytest.approx(HAND_BYTES[engine, precision])
    assert estimate(SMALL, s).comm_per_step == pytest.approx(HAND_BYTES[engine, precision])
    assert predict(SMALL, s).sent_bytes == pytest.approx(HAND_BYTES[engine, precision])


def test_reduce_dtype_sets_the_gradients_bytes():
    # FSDP reduces in fp32 unless told; DeepSpeed in the compute dtype unless told (engines.config)
    assert estimate(SMALL, small("fsdp", reduce_dtype="bf16")).comm_per_step == pytest.approx(6000 + 1500)
    assert estimate(SMALL, small("zero1", reduce_dtype="fp32")).comm_per_step == pytest.approx(3000 + 1500)


def memory_plan_closed_form(m: ModelSizes, s: Setup) -> float:
    """``comm_per_step`` as memory_plan.estimate wrote it before the collectives were factored out."""
    w, n, P, T, A = (2 if s.precision != "fp32" else 4), s.world_size, m.params, m.trainable, s.accumulation
    k = (n - 1) / n
    return {"ddp": 2 * k * 4 * T, "fsdp": A * 2 * k * w * P + k * 4 * T, "zero1": k * w * T + k * w * P,
            "zero2": A * k * w * T + k * w * P, "zero3": A * (2 * k * w * P + k * w * T)}[s.engine]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("precision,accumulation,world", [("bf16", 1, 8), ("fp32", 4, 64), ("bf16", 16, 2)])
def test_bytes_agree_with_the_memory_plans_closed_forms(engine, precision, accumulation, world):
    lora = dataclasses.replace(SMALL, params=6_738_415_616, trainable=20_000_000)  # frozen weights: T < P
    for m in (SMALL, lora):
        s = small(engine, precision, accumulation, world)
        assert estimate(m, s).comm_per_step == pytest.approx(memory_plan_closed_form(m, s))


def test_one_rank_sends_nothing_and_waits_for_nothing():
    for engine in ENGINES:
        p = predict(SMALL, small(engine, world=1))
        assert (p.sent_bytes, p.comm_s, p.exposed_s) == (0, 0, 0)


def test_link_times_by_hand():
    link = Link()
    gather = collectives(SMALL, small("fsdp"))[0]
    big = dataclasses.replace(gather, payload=8e9, calls=1)
    # one node of 8: 7/8 of 8 GB over NVLink at 360 GB/s, plus 8.4 µs + 7 NVLink steps of 3.4 µs
    assert link.seconds(big, 8, 8) == pytest.approx(7e9 / 360e9 + (8.4 + 7 * 3.4) * 1e-6)
    # two nodes of 8: 8 NICs of 47 GB/s (376) outrun NVLink: still 360; 15 steps, one over the network
    assert link.seconds(big, 16, 8) == pytest.approx(7.5e9 / 360e9 + (8.4 + 14 * 3.4 + 14.0) * 1e-6)
    # one GPU per node: its own NIC, every step over the network
    assert link.seconds(big, 4, 1) == pytest.approx(6e9 / 47e9 + (8.4 + 3 * 14.0) * 1e-6)
    # four per node with 2 NICs' worth each: 4 × 20 = 80 GB/s, below NVLink
    assert Link(nic_gbs=20).bandwidth(4, 2) == pytest.approx(80e9)
    # all-reduce on 64 nodes of 8: NCCL's tree (2 × (7 NVLink + log2 64 network hops)) beats the ring
    ring = 8.4 + (2 * 511 - 2 * 63) * 3.4 + 2 * 63 * 14.0
    tree = 8.4 + 2 * (7 * 3.4 + 6 * 14.0)
    assert tree < ring and link.latency("all-reduce", 512, 64) == pytest.approx(tree * 1e-6)
    assert link.latency("all-reduce", 8, 1) == pytest.approx((8.4 + 14 * 3.4) * 1e-6)  # one node: ring = chain


# Compute: 6012 FLOP per token (6·1000 + 12·1·1·1) at 6012 FLOP/s: 1 s per micro-batch, forward 1/3,
# backward 2/3. Links: 1500 B/s and no latency, so a bf16 gather or reduce of 1000 values on 4 ranks
# (1500 B sent) takes 1 s, FSDP's fp32 reduce 2 s, DDP's all-reduce 4 s.
SLOW = Link(nvlink_gbs=1.5e-6, nic_gbs=1.5e-6, base_us=0, nvlink_hop_us=0, net_hop_us=0)
UNIT = Compute(mfu=1.0, peak_tflops=6012e-12)
HAND_EXPOSED = {
    "ddp": 4 - 2 / 3,                          # all-reduce under the last backward
    "zero1": (1 - 2 / 3) + 1,                  # reduce-scatter under the last backward; gather after the step
    "zero2": 2 * (1 - 2 / 3) + 1,              # reduce-scatter under each backward; gather after the step
    "zero3": 2 * ((1 - 1 / 3) + (2 - 2 / 3)),  # gather under forward; gather + reduce under backward
    "fsdp": 2 * (1 - 1 / 3) + (1 - 2 / 3) + (1 + 2 - 2 / 3),  # fp32 reduce in the last backward only
}


@pytest.mark.parametrize("engine", ENGINES)
def test_overlap_arithmetic_by_hand(engine):
    s = small(engine)
    p = predict(SMALL, s, SLOW, UNIT)
    assert p.compute_s == pytest.approx(2.0)
    assert p.exposed_s == pytest.approx(HAND_EXPOSED[engine])
    assert p.mfu == pytest.approx(2.0 / (2.0 + HAND_EXPOSED[engine]))
    nothing_hidden = predict(SMALL, s, SLOW, dataclasses.replace(UNIT, overlap=0.0))
    assert nothing_hidden.exposed_s == pytest.approx(p.comm_s)


def test_full_checkpointing_adds_a_forward_to_compute_and_to_the_backward_window():
    p = predict(SMALL, small("ddp", activation_checkpointing=True), SLOW, UNIT)
    assert p.compute_s == pytest.approx(2 * 4 / 3)
    assert p.exposed_s == pytest.approx(4 - 1)  # the last backward is now 2/3 + 1/3
    assert p.mfu == pytest.approx(2.0 / (8 / 3 + 3))  # MFU counts the model's FLOPs, not the recomputed ones


def test_weak_scaling_keeps_the_work_per_gpu():
    s = Setup("fsdp", micro_batch=8, seq_len=2048, world_size=32, gpus_per_node=8, accumulation=4)
    assert at_nodes(s, 16) == dataclasses.replace(s, world_size=128)
    assert predict(SMALL, at_nodes(s, 16)).compute_s == predict(SMALL, at_nodes(s, 1)).compute_s


def test_the_table_lists_every_engine_auto_fit_orders():
    """The table's row order (pinned by its golden files) differs from auto-fit's preference; the
    engines are the same."""
    from train.engines import CAPABILITIES
    from train.engines.autofit import ENGINE_ORDER
    from train.engines.scaling import TABLE_ORDER

    assert sorted(TABLE_ORDER) == sorted(ENGINE_ORDER) == sorted(CAPABILITIES)


def test_flops_and_peak_are_the_metrics_modules():
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.device_peaks import PEAK_TFLOPS
    from train.metrics.flops import flops_per_token as measured_flops

    assert H100_PEAK_TFLOPS == {"bf16": PEAK_TFLOPS["H100"]["bf16"], "fp16": PEAK_TFLOPS["H100"]["fp16"],
                                "fp32": PEAK_TFLOPS["H100"]["tf32"]}
    for tied in (True, False):
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied)
        model = LlamaForCausalLM(cfg)
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        m = dataclasses.replace(SMALL, params=params, layers=2, hidden=32, untied_embedding=0 if tied else 3200)
        assert flops_per_token(m, 64) == measured_flops(model, 64)


@pytest.mark.parametrize("text,expected", [("1,2,4", [1, 2, 4]), (" 8, 1 ", [1, 8]), ("3", [3])])
def test_node_counts_parse(text, expected):
    assert parse_nodes(text) == expected


@pytest.mark.parametrize("text", ["0", "", "1,,2", "x", "-1", "1.5", "2,2", "²", "1e3"])
def test_bad_node_counts_exit_2_with_one_line(text, capsys):
    from launch.cli import main

    assert main(["plan", "tiny-cpu", "--nodes", text]) == 2  # refused before the recipe is read
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("shardforge: error: --nodes: ") and "e.g. --nodes 1,2,4,8" in err


# configs/llama-1b.yaml as train.config.model_checks.model_sizes and planned_setup see it.
LLAMA_1B = ModelSizes(params=1_038_682_112, trainable=1_038_682_112, largest_layer=65_536_000, block=60_821_504,
                      root=65_538_048, layers=16, hidden=2048, intermediate=8192, heads=32, vocab=32000)
LLAMA_1B_SETUP = Setup("fsdp", "bf16", micro_batch=8, seq_len=2048, world_size=8, gpus_per_node=8, accumulation=8)


@pytest.mark.parametrize("name,setup", [("scaling-llama-1b.txt", LLAMA_1B_SETUP),
                                        ("scaling-llama-1b-mb1.txt",  # communication-bound: accumulation 1
                                         dataclasses.replace(LLAMA_1B_SETUP, micro_batch=1, accumulation=1))])
def test_scaling_table_matches_golden_file(name, setup):
    text = scaling_table(LLAMA_1B, setup, [1, 2, 4, 8, 32], gpu_bytes=80e9) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(text)
        pytest.skip(f"regenerated tests/golden/{name}: review it with git diff, then run without UPDATE_GOLDEN")
    assert text == (GOLDEN / name).read_text(), "regenerate with UPDATE_GOLDEN=1 if the change is intended"


def test_predictions_stay_near_the_published_scaling_figures():
    """benchmarks/scaling_check.py's cases (benchmarks/RESULTS.md): the FSDP ones within its tolerance."""
    from benchmarks.scaling_check import TOLERANCE, check

    rows = check()
    asserted = [r for r in rows if r["asserted"]]
    assert {r["case"] for r in asserted} >= {"llm-foundry MPT-1B, FSDP", "torchtitan Llama 3.1 8B, FSDP2"}
    for r in asserted:
        off = r["predicted_efficiency"] - r["published_efficiency"]
        assert abs(off) <= TOLERANCE, (f"{r['case']} on {r['gpus']} GPUs: predicted {r['predicted_efficiency']:.1%}, "
                                       f"published {r['published_efficiency']:.1%}")
    first = {r["case"]: r for r in reversed(rows)}  # each case's first point: anchored to the publication
    for r in first.values():
        assert r["predicted_efficiency"] == 1.0 and r["predicted_mfu"] == pytest.approx(r["published_mfu"])


def test_plan_prints_the_scaling_block_last(capsys):
    """``shardforge plan llama-1b --nodes 2,1`` (in process; it builds the model on the meta device only)."""
    from launch.cli import main
    from train.config.loading import load_recipe
    from train.config.model_checks import model_sizes, planned_setup

    assert main(["plan", "llama-1b", "--nodes", "2,1"]) == 0
    out = capsys.readouterr().out
    recipe = load_recipe("llama-1b", [], local_gpus=0)
    expected = scaling_table(model_sizes(recipe), planned_setup(recipe), [1, 2], gpu_bytes=80e9)
    assert out.endswith(expected + "\n") and expected.startswith("# scaling: ")
