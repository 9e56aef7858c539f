"""A torchrun program for tests/test_placement.py: for every engine, build the model the way the
ranks of a run do (``place_model`` + ``build_engine``) and check that every rank ends with the
weights and buffers one process builds eagerly from the same seed, bit for bit.

Usage: torchrun --nproc-per-node N tests/placement_check.py OUT.json KIND[,KIND...] [PRETRAINED]
(run from the repository root; MODEL_KIND: llama, llama-lora, gpt2 (dropout 0.1), bert-ner (pretrained
at PRETRAINED)).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from train.engines.config import engine_configs
from train.distributed import init_distributed
from train.engines import CAPABILITIES
from train.engines.build import build_engine
from train.engines.placement import place_model
from train.model import build_model
from train.config.recipe import grad_accum_steps, recipe_from_dict, resolve_defaults

MODELS = {
    "llama": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                         "tie_word_embeddings": True}},
    "gpt2": {"config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}},
}
MODELS["llama-lora"] = {**MODELS["llama"], "freeze_layers": 1, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}


def recipe_for(engine: str, kind: str, world: int, pretrained: str):
    model = MODELS.get(kind) or {"pretrained": pretrained}
    data = {"run": {"name": "placement", "seed": 7}, "model": model, "task": "causal_lm" if kind in MODELS else "token_classification",
            "data": {"sources": [{"path": "unused.txt"}]},
            "train": {"max_steps": 4, "micro_batch_size": 1, "global_batch_size": world},
            "parallel": {"engine": engine, "precision": "fp32", "nproc": world}}
    recipe = recipe_from_dict(data)
    resolve_defaults(recipe, nproc=world)
    return recipe


def main() -> int:
    out, kinds = Path(sys.argv[1]), sys.argv[2].split(",")
    pretrained = sys.argv[3] if len(sys.argv) > 3 else ""
    d = init_distributed(deepspeed=True)
    labels = ["O", "B-PER", "I-PER"]
    results = []
    for kind in kinds:
        for engine in (e for e, caps in CAPABILITIES.items() if caps.lora or "lora" not in kind):
            recipe = recipe_for(engine, kind, d.world_size, pretrained)
            task_labels = labels if recipe.task == "token_classification" else None

            def build(empty_init, recipe=recipe, task_labels=task_labels):
                return build_model(recipe.model, 256, recipe.run.seed, recipe.task, task_labels,
                                   empty_init=empty_init)

            expected = build(None)  # what one process builds
            cfg = engine_configs(recipe).get(CAPABILITIES[engine].config_file or "", {})
            model, weights = place_model(engine, build, d.rank, d.world_size, cfg)
            engine_obj = build_engine(recipe, model, d.device, accum=grad_accum_steps(recipe, d.world_size), cfg=cfg,
                                      weights=weights)
            full = engine_obj.full_model_state()  # gathers every rank's shards on rank 0
            mismatched = []
            if d.rank == 0:
                want = expected.state_dict()
                mismatched += [k for k in want if not torch.equal(full[k].float(), want[k].float())]
            inner = engine_obj.engine.module if hasattr(engine_obj, "engine") else engine_obj.model
            inner = getattr(inner, "module", inner)  # DDP
            want_buffers = dict(expected.named_buffers())
            mismatched += [f"rank {d.rank} buffer {k}" for k, b in inner.named_buffers()
                           if not torch.equal(b.cpu(), want_buffers[k])]
            trainable = [k for k, p in expected.named_parameters() if p.requires_grad]
            if [k for k, p in inner.named_parameters() if p.requires_grad] != trainable:
                mismatched.append(f"rank {d.rank}: trainable parameters differ")
            if CAPABILITIES[engine].zero_stage in (None, 1, 2) and engine != "fsdp":  # replicated weights
                want = dict(expected.named_parameters())
                mismatched += [f"rank {d.rank} param {k}" for k, p in inner.named_parameters()
                               if not torch.equal(p.detach().cpu(), want[k].detach())]
            every = [None] * d.world_size
            dist.all_gather_object(every, mismatched)
            if d.rank == 0:
                results.append({"kind": kind, "engine": engine, "mismatched": sum(every, []),
                                "compared": len(full)})
            del engine_obj, model, weights, expected
    if d.rank == 0:
        out.write_text(json.dumps({"world_size": d.world_size, "results": results,
                                   "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    dist.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # as train/__main__.py: tearing gloo and DeepSpeed's threads down at exit can abort or hang
