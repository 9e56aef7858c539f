"""Real multi-process training on CPU (gloo) through every engine, and exact resume.

Each launch is a real `shardforge run` (torchrun, 2 processes unless noted) on a tiny
Llama built from a config. The reference is 1 process × micro-batch 8; the engines run
2 ranks × micro-batch 2 × accumulation 2, which must give the same fp32 losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import read_metrics, run_recipe, train_losses

ENGINES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]


def recipe(world, name: str, engine: str = "ddp", nproc: int = 2, precision: str = "fp32", **extra):
    r = world.recipe(name, parallel={"engine": engine, "precision": precision, "nproc": nproc},
                     train={"micro_batch_size": 8 // (2 * nproc) if nproc > 1 else 8})
    for key, value in extra.items():
        r[key] = {**r.get(key, {}), **value}
    return r


@pytest.fixture(scope="module")
def reference(world):
    """1 process, micro-batch 8, no accumulation: its training losses and its final eval loss.
    With ``train.deterministic`` (torch's deterministic kernels): every engine must match it, so the
    setting runs and changes nothing on a CPU."""
    r = recipe(world, "reference", nproc=1, train={"deterministic": True})
    run_recipe(world.tmp, r)
    return {"losses": train_losses(Path(r["run"]["dir"])), "eval_loss": _eval_loss(Path(r["run"]["dir"]))}


# Settings that must not change an engine's fp32 trajectory, tried on the straight runs (and kept
# by the runs that resume from them): FSDP recomputes activations in backward.
STRAIGHT_EXTRA = {"fsdp": {"model": {"activation_checkpointing": True}}}


@pytest.fixture(scope="module")
def straight(world):
    """One uninterrupted 2-rank run per engine, saving at step 3 (the resume tests start there) and at the end."""
    runs = {}
    for engine in ENGINES:
        r = recipe(world, f"straight-{engine}", engine, checkpoint={"every_steps": 3, "at_end": True},
                   **STRAIGHT_EXTRA.get(engine, {}))
        run_recipe(world.tmp, r)
        runs[engine] = Path(r["run"]["dir"])
    return runs


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_single_process_fp32(straight, reference, engine):
    losses = train_losses(straight[engine])
    if engine in STRAIGHT_EXTRA:
        assert "activation_checkpointing: true" in (straight[engine] / "recipe.yaml").read_text()
    assert len(losses) == len(reference["losses"]) == 6
    assert losses[-1] < losses[0] - 0.5, f"{engine} did not learn: {losses}"
    log = (straight[engine] / "logs" / "launch.log").read_text()
    assert "precision: the first forward computed in torch.float32" in log
    # rank 1 started from an empty model filled with rank 0's weights (tests/test_placement.py)
    assert "model: rank 0 built the weights; the other 1 rank(s) built the structure" in log
    for step, (a, b) in enumerate(zip(losses, reference["losses"]), 1):
        assert abs(a - b) < 1e-5, f"{engine} step {step}: {a} vs single-process {b}"
    # the same validation samples whatever the world size and micro-batch
    assert abs(_eval_loss(straight[engine]) - reference["eval_loss"]) < 1e-5, (_eval_loss(straight[engine]), reference)


def resume_from_step_3(world, source: Path, name: str, engine: str, *overrides: str, expect: int = 0,
                       **sections) -> tuple[Path, str]:
    """A new run dir ``name`` that resumes from ``source``'s step-3 checkpoint (``checkpoint.resume=PATH``);
    its directory and the launch's output."""
    r = recipe(world, name, engine, **sections)
    out = run_recipe(world.tmp, r, f"checkpoint.resume={source / 'checkpoints' / 'step-000003'}", *overrides,
                     expect=expect)
    assert "resumed from" in out.stdout and "at step 3" in out.stdout, out.stdout[-2000:]
    return Path(r["run"]["dir"]), out.stdout


def _trajectory(run_dir: Path) -> list[tuple]:
    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(run_dir) if "loss" in m]


# GPT-2 as the seeds fine-tune it: dropout 0.1 on embeddings, attention and residuals (its defaults)
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_with_dropout_trains_and_resumes_bit_identically(world, engine):
    """Every rank's dropout masks continue exactly after a resume: RNG states are restored, and
    nothing draws from the global generator between the restore and the next step. FSDP reduces
    its gradients in bf16 here (``parallel.reduce_dtype``, the fast choice on GPUs)."""
    gpt2 = {"model": {"config": GPT2}, "parallel": {"engine": engine, "precision": "bf16", "nproc": 2,
                                                    **({"reduce_dtype": "bf16"} if engine == "fsdp" else {})}}
    straight = recipe(world, f"bf16-{engine}", engine, checkpoint={"every_steps": 3, "at_end": True}, **gpt2)
    proc = run_recipe(world.tmp, straight)
    assert "precision: the first forward computed in torch.bfloat16" in proc.stdout, proc.stdout[-2000:]
    straight_dir = Path(straight["run"]["dir"])
    losses = train_losses(straight_dir)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    manifest = json.loads((straight_dir / "checkpoints" / "step-000003" / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 2 and manifest["engine"] == engine

    resumed, _ = resume_from_step_3(world, straight_dir, f"bf16-resumed-{engine}", engine, **gpt2)
    assert _trajectory(resumed) == _trajectory(straight_dir)[3:], "steps 4-6 must continue the run exactly"
    assert _eval_loss(resumed) == _eval_loss(straight_dir)


def _eval_loss(run_dir: Path) -> float:
    return [m["eval_loss"] for m in read_metrics(run_dir) if "eval_loss" in m][-1]


@pytest.mark.parametrize("engine", ENGINES)  # ZeRO reshards through universal checkpoints
def test_resume_on_another_world_size(world, straight, reference, engine):
    """Steps 1-3 on 2 ranks (the straight run), 4-5 on 1, 6 on 2 again: the single-process trajectory."""
    extra = STRAIGHT_EXTRA.get(engine, {})
    run_dir, out = resume_from_step_3(world, straight[engine], f"reshard-{engine}", engine, "parallel.nproc=1",
                                      "train.micro_batch_size=8", "train.stop_after=2", expect=75, **extra)
    assert "(2 → 1 ranks)" in out
    again = run_recipe(world.tmp, recipe(world, f"reshard-{engine}", engine, **extra), "checkpoint.resume=auto")
    assert "(1 → 2 ranks)" in again.stdout, again.stdout[-2000:]
    assert [m[0] for m in _trajectory(run_dir)] == [4, 5, 6]
    losses = train_losses(run_dir)
    for a, b in zip(losses, reference["losses"][3:]):
        assert abs(a - b) < 1e-6, (losses, reference)
    assert abs(_eval_loss(run_dir) - reference["eval_loss"]) < 1e-5


@pytest.mark.parametrize("engine", ENGINES)
def test_export_gives_the_trained_model(world, straight, engine, tmp_path):
    """The exported directory loads with from_pretrained, carries the run tokenizer's special ids,
    and reproduces the run's final eval loss.

    The eval loss in metrics.jsonl was computed by the (sharded) training engine on every rank's
    share of the first ``eval_batches × global_batch_size`` validation samples; the exported model,
    evaluated here by hand on those samples, must give the same number.
    """
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import launch_in_process
    from train.data.prepare import prepare_data
    from train.config.loading import read_recipe

    out = tmp_path / "hf"
    proc = launch_in_process("export", str(straight[engine]), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    eos = tokenizer.eos_token_id
    assert eos is not None and model.config.eos_token_id == model.generation_config.eos_token_id == eos
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    recipe = read_recipe(straight[engine])
    data = prepare_data(recipe)
    assert len(tokenizer) == len(data.tokenizer)
    n = recipe.train.eval_batches * recipe.train.global_batch_size
    ids = torch.from_numpy(data.val.rows(range(min(n, len(data.val))))["input_ids"]).long()
    assert len(ids) == min(n, len(data.val)) > 0
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert abs(loss - _eval_loss(straight[engine])) < 1e-5, (loss, _eval_loss(straight[engine]))
    again = launch_in_process("export", str(straight[engine]), str(out))
    assert again.returncode == 2 and "not empty" in again.stderr
