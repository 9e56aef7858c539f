"""The memory plan (train/engines/memory_plan.py): its state numbers against DeepSpeed's own estimators,
its activation estimate against what autograd really saves, its advice, and the refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import launch_in_process, make_corpus, shardforge, tiny_recipe, write_recipe
from train.engines.memory_plan import ModelSizes, Setup, activation_bytes, estimate, fit_problem
from train.config.model_checks import model_sizes, planned_setup
from train.config.recipe import recipe_from_dict, resolve_defaults


def sizes(params: int, largest: int) -> ModelSizes:
    return ModelSizes(params=params, trainable=params, largest_layer=largest, block=largest * 4, root=largest,
                      layers=32, hidden=4096, intermediate=11008, heads=32, vocab=32000)


@pytest.mark.parametrize("params,largest,gpus,nodes", [(6_738_415_616, 131_072_000, 8, 4),
                                                       (1_100_000_000, 65_536_000, 8, 1),
                                                       (125_000_000, 38_597_376, 2, 1)])
def test_state_memory_matches_deepspeeds_estimators(params, largest, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    m, n = sizes(params, largest), gpus * nodes

    def states(engine: str, offload: bool) -> float:
        e = estimate(m, Setup(engine, "bf16", offload, world_size=n, gpus_per_node=gpus))
        return e.params + e.grads + e.optimizer

    for offload in (False, True):
        _, ds_gpu = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=offload)
        assert states("zero2", offload) == pytest.approx(ds_gpu, abs=1)
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, gpus, nodes, cpu_offload=False,
                                                         cpu_offload_params=False)
    assert states("zero3", False) == pytest.approx(ds_gpu + 2 * params / n, abs=1)  # + the fp32 gradient partition
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, gpus, nodes, cpu_offload=True,
                                                         cpu_offload_params=True)
    assert states("zero3", True) == pytest.approx(ds_gpu, abs=1)


def saved_for_backward(model: torch.nn.Module, batch: int, seq: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct tensors autograd keeps from a forward for its backward, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(input_ids=ids, labels=ids).loss.backward()
    return sum(seen.values())


def recipe_for(config: dict, precision: str):
    r = recipe_from_dict({"run": {"name": "plan"}, "model": {"config": config}, "data": {"sources": [{"path": "x"}]},
                          "parallel": {"engine": "ddp", "precision": precision, "nproc": 1}})
    resolve_defaults(r, nproc=1)
    return r


# Shapes unlike the ones the coefficients were fitted on; GPT-2 trains with dropout, as shipped.
SHAPES = {"llama": {"model_type": "llama", "hidden_size": 320, "intermediate_size": 864, "num_hidden_layers": 3,
                    "num_attention_heads": 5, "num_key_value_heads": 5, "vocab_size": 3072},
          "gpt2": {"model_type": "gpt2", "n_embd": 320, "n_layer": 3, "n_head": 5, "vocab_size": 3072,
                   "bos_token_id": 0, "eos_token_id": 0}}


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_is_what_autograd_saves(kind, precision):
    from transformers import AutoConfig, AutoModelForCausalLM

    recipe = recipe_for(SHAPES[kind], precision)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SHAPES[kind]), attn_implementation="sdpa").train()
    batch, seq = 3, 96
    measured = saved_for_backward(model, batch, seq, torch.bfloat16 if precision == "bf16" else torch.float32)
    setup = dataclasses.replace(planned_setup(recipe), micro_batch=batch, seq_len=seq)
    estimated = activation_bytes(model_sizes(recipe), setup)
    assert estimated == pytest.approx(measured, rel=0.10), (estimated, measured)


def test_model_sizes_count_what_the_ranks_build():
    from train.model import build_model

    r = recipe_for({**SHAPES["llama"], "tie_word_embeddings": True}, "bf16")
    r.model.freeze_layers = 1
    built = build_model(r.model, 3072, 0)
    m = model_sizes(r)
    assert m.params == sum(p.numel() for p in built.parameters())  # the tied head counted once
    assert m.trainable == sum(p.numel() for p in built.parameters() if p.requires_grad) < m.params
    assert m.block * m.layers + m.root == m.params
    assert m.largest_layer == 3072 * 320  # the embedding table


def test_advice_names_a_setting_that_fits():
    from train.config.loading import load_recipe

    recipe = load_recipe("llama-7b-fsdp", for_slurm=True)
    m, setup = model_sizes(recipe), planned_setup(recipe)
    assert fit_problem(m, setup, 80e9) is None
    line = fit_problem(m, setup, 24e9)
    assert line.startswith("memory: fsdp, micro-batch 2, selective checkpointing needs 34.9 GB per GPU (weights")
    assert line.endswith("set model.activation_checkpointing=true (14.8 GB per GPU)")
    assert "+ CUDA/NCCL/buffers 1.9)" in line  # 0.6 context + 0.5 NCCL + one block's fp32 gradients (0.81)
    assert estimate(m, dataclasses.replace(setup, activation_checkpointing=True)).fits(24e9)
    single = dataclasses.replace(setup, world_size=8, gpus_per_node=8, activation_checkpointing=True)
    line = fit_problem(m, single, 16e9)  # 7B on one node of 16 GB GPUs: checkpointing alone is not enough
    assert "set " in line and estimate(m, _apply(single, line)).fits(16e9), line
    assert fit_problem(m, dataclasses.replace(single, world_size=1, gpus_per_node=1), 8e9).endswith(
        "use more GPUs or GPUs with more memory")


def test_a_gpu_holds_the_cuda_context_nccl_and_the_engines_buffers_beside_the_model():
    """The plan's GPU-only terms (module docstring of train.engines.memory_plan): the context always,
    NCCL once there are peers, DeepSpeed's three buckets, FSDP's reduce-dtype copy of one block."""
    from train.engines.memory_plan import CUDA_CONTEXT_BYTES, NCCL_BYTES, runtime_bytes

    m = ModelSizes(params=10**9, trainable=10**9, largest_layer=10**7, block=5 * 10**7, root=10**8,
                   layers=16, hidden=2048, intermediate=5504, heads=16, vocab=32000)
    one = Setup("ddp", "bf16", world_size=1)
    assert runtime_bytes(m, one) == CUDA_CONTEXT_BYTES
    assert runtime_bytes(m, dataclasses.replace(one, world_size=8)) == CUDA_CONTEXT_BYTES + NCCL_BYTES
    zero = Setup("zero2", "bf16", world_size=8, reduce_bucket_mb=100)
    assert runtime_bytes(m, zero) == CUDA_CONTEXT_BYTES + NCCL_BYTES + 3 * 100 * 2**20
    fsdp = Setup("fsdp", "bf16", world_size=8)
    assert runtime_bytes(m, fsdp) == CUDA_CONTEXT_BYTES + NCCL_BYTES + 4 * m.block  # fp32 reduce of bf16 grads
    assert runtime_bytes(m, dataclasses.replace(fsdp, reduce_dtype="bf16")) == CUDA_CONTEXT_BYTES + NCCL_BYTES
    assert runtime_bytes(m, dataclasses.replace(fsdp, precision="fp32")) == CUDA_CONTEXT_BYTES + NCCL_BYTES
    e = estimate(m, zero)
    assert e.total == e.params + e.grads + e.optimizer + e.activations + e.runtime


def _apply(setup: Setup, line: str) -> Setup:
    """The setup the advice's ``set key=value ...`` describes."""
    change = line.rsplit("; set ", 1)[1].split(" (")[0]
    fields = {"parallel.engine": "engine", "parallel.offload": "offload", "train.micro_batch_size": "micro_batch",
              "model.activation_checkpointing": "activation_checkpointing"}
    values = {"true": True, "false": False}
    out = {}
    for item in change.split():
        key, value = item.split("=")
        out[fields[key]] = values.get(value, int(value) if value.isdigit() else value)
    return dataclasses.replace(setup, **out)


def test_plan_prints_the_memory_of_every_engine():
    proc = shardforge("plan", "llama-7b-fsdp", "parallel.gpu_mem_gb=24")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# memory per GPU, GB (6.74B parameters, 6.74B trainable, 32 GPUs, bf16" in out
    for row in ("# * fsdp, micro-batch 2, selective checkpointing", "#   ddp, micro-batch 2 ",
                "#   zero3 + offload, micro-batch 2, checkpointing", "#   zero1 + offload, micro-batch 2 "):
        assert row in out, out
    assert "# does not fit: memory: fsdp, micro-batch 2, selective checkpointing needs 34.9 GB" in out


def test_submit_and_run_refuse_a_plan_that_cannot_fit(tmp_path):
    proc = shardforge("submit", "llama-7b-fsdp", "parallel.gpu_mem_gb=24", f"run.dir={tmp_path / 'big'}", "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "set model.activation_checkpointing=true" in proc.stderr and not (tmp_path / "big").exists()
    # run: the ranks check (the launcher does not import transformers); on CPU only a stated size counts
    recipe = tiny_recipe(make_corpus(tmp_path / "corpus"), tmp_path / "cache", tmp_path / "run",
                         parallel={"gpu_mem_gb": 0.0001, "nproc": 2})
    proc = launch_in_process("run", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "memory: ddp, micro-batch" in proc.stdout + proc.stderr
    assert "more than 90% of the GPU's 0.0001 GB" in proc.stdout + proc.stderr
