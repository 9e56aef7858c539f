"""Initial weights when rank 0 builds them and the other ranks build only the structure
(``train.engines.placement``): every engine must end with what one process builds, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import REPO, make_pretrained
from train.engines.placement import is_empty, materialize


def torchrun_program(script: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run a test program under torchrun on CPU (gloo), from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_every_engine_starts_from_the_weights_one_process_builds(tmp_path):
    """2 ranks; random init (Llama with tied embeddings, GPT-2 with dropout), LoRA with frozen
    layers (ddp, fsdp), and a pretrained encoder with a fresh NER head: weights gathered from
    every rank's shards, buffers and trainable flags on every rank, equal one eager build."""
    pretrained = make_pretrained(tmp_path / "bert", "token_classification")
    out = tmp_path / "placement.json"
    proc = torchrun_program(REPO / "tests" / "placement_check.py", str(out), "llama,llama-lora,gpt2,bert-ner",
                            str(pretrained))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())["results"]
    assert {(r["kind"], r["engine"]) for r in results} == {
        *((k, e) for k in ("llama", "gpt2", "bert-ner") for e in ("ddp", "fsdp", "zero1", "zero2", "zero3")),
        ("llama-lora", "ddp"), ("llama-lora", "fsdp")}
    assert all(r["compared"] > 20 for r in results), results
    assert {(r["kind"], r["engine"]): r["mismatched"] for r in results if r["mismatched"]} == {}


def test_materialize_keeps_tied_weights_and_real_buffers():
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, vocab_size=64, tie_word_embeddings=True)
    eager = AutoModelForCausalLM.from_config(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    assert is_empty(model) and not is_empty(eager)
    materialize(model, torch.device("cpu"))
    assert not is_empty(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(list(model.parameters())) == len(list(eager.parameters()))
    for (name, buffer), (_, want) in zip(model.named_buffers(), eager.named_buffers()):
        assert torch.equal(buffer, want), name  # rotary frequencies are in no state dict: kept, not emptied
