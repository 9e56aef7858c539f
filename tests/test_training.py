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

from tests.helpers import make_corpus, read_metrics, run_recipe, tiny_recipe, train_losses

ENGINES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("training")
    return {"tmp": tmp, "corpus": make_corpus(tmp / "corpus"), "cache": tmp / "cache"}


def recipe(world, name: str, engine: str = "ddp", nproc: int = 2, precision: str = "fp32", **extra):
    r = tiny_recipe(world["corpus"], world["cache"], world["tmp"] / name,
                    parallel={"engine": engine, "precision": precision, "nproc": nproc},
                    train={"micro_batch_size": 8 // (2 * nproc) if nproc > 1 else 8})
    for key, value in extra.items():
        r[key] = {**r.get(key, {}), **value}
    return r


@pytest.fixture(scope="module")
def reference(world):
    """1 process, micro-batch 8, no accumulation."""
    r = recipe(world, "reference", nproc=1)
    run_recipe(world["tmp"], r)
    return train_losses(Path(r["run"]["dir"]))


@pytest.fixture(scope="module")
def straight(world):
    """One uninterrupted 2-rank run per engine, with a final checkpoint."""
    runs = {}
    for engine in ENGINES:
        r = recipe(world, f"straight-{engine}", engine, checkpoint={"at_end": True})
        run_recipe(world["tmp"], r)
        runs[engine] = Path(r["run"]["dir"])
    return runs


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_single_process_fp32(straight, reference, engine):
    losses = train_losses(straight[engine])
    assert len(losses) == len(reference) == 6
    assert losses[-1] < losses[0] - 0.5, f"{engine} did not learn: {losses}"
    for step, (a, b) in enumerate(zip(losses, reference), 1):
        assert abs(a - b) < 1e-5, f"{engine} step {step}: {a} vs single-process {b}"


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_trains(world, engine):
    r = recipe(world, f"bf16-{engine}", engine, precision="bf16")
    run_recipe(world["tmp"], r)
    losses = train_losses(Path(r["run"]["dir"]))
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses


def _eval_loss(run_dir: Path) -> float:
    return [m["eval_loss"] for m in read_metrics(run_dir) if "eval_loss" in m][-1]


_STOPPED: dict[tuple[str, int], Path] = {}


def stopped_at_3(world, engine: str, nproc: int, name: str) -> dict:
    """A copy, in run dir ``name``, of a run of ``engine`` on ``nproc`` ranks stopped after step 3.

    The stopped run is launched once per (engine, nproc) and copied for each test that resumes
    it (here on 2 ranks, in the reshard tests on 1), which saves a launch per test.
    """
    import shutil

    key = (engine, nproc)
    if key not in _STOPPED:
        r = recipe(world, f"stopped-{engine}-{nproc}", engine, nproc=nproc, train={"stop_after": 3},
                   checkpoint={"at_end": True})
        first = run_recipe(world["tmp"], r, expect=75)
        assert "train.stop_after=3" in first.stdout
        _STOPPED[key] = Path(r["run"]["dir"])
    r = recipe(world, name, engine, nproc=nproc, train={"stop_after": 3}, checkpoint={"at_end": True})
    shutil.copytree(_STOPPED[key], r["run"]["dir"])
    return r


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_and_resume_is_bit_identical(world, straight, engine):
    r = stopped_at_3(world, engine, 2, f"resume-{engine}")
    run_dir = Path(r["run"]["dir"])
    manifest = json.loads((run_dir / "checkpoints" / "step-000003" / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 2 and manifest["engine"] == engine
    second = run_recipe(world["tmp"], r, "train.stop_after=0")
    assert "resumed from" in second.stdout
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6], "metrics.jsonl must continue without duplicate steps"
    # bit-identical to the uninterrupted run: steps 1-3 repeat it, steps 4-6 continue it exactly
    resumed = [(m["loss"], m["grad_norm"]) for m in read_metrics(run_dir) if "loss" in m]
    assert resumed == [(m["loss"], m["grad_norm"]) for m in read_metrics(straight[engine]) if "loss" in m]
    assert _eval_loss(run_dir) == _eval_loss(straight[engine])


@pytest.mark.parametrize("engine,before,after", [
    ("fsdp", 2, 1), ("fsdp", 1, 2), ("ddp", 2, 1),
    ("zero2", 2, 1), ("zero2", 1, 2), ("zero3", 2, 1), ("zero3", 1, 2)])  # ZeRO: via universal checkpoints
def test_resume_on_another_world_size(world, reference, engine, before, after):
    r = stopped_at_3(world, engine, before, f"reshard-{engine}-{before}to{after}")
    micro = 8 // (2 * after) if after > 1 else 8
    out = run_recipe(world["tmp"], r, "train.stop_after=0", f"parallel.nproc={after}",
                     f"train.micro_batch_size={micro}")
    assert f"({before} → {after} ranks)" in out.stdout
    losses = train_losses(Path(r["run"]["dir"]))
    assert len(losses) == 6
    for a, b in zip(losses, reference):
        assert abs(a - b) < 1e-6, (losses, reference)


@pytest.mark.parametrize("engine", ENGINES)
def test_export_gives_the_trained_model(world, straight, engine, tmp_path):
    """The exported directory loads with from_pretrained and reproduces the run's final eval loss.

    The eval loss in metrics.jsonl was computed by the (sharded) training engine on the
    validation micro-batches of every rank; the exported model must give the same number.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import launch_in_process
    from train.data.batches import eval_batches
    from train.data.prepare import prepare_data
    from train.rundir import read_recipe
    from train.model import causal_lm_loss

    out = tmp_path / "hf"
    proc = launch_in_process("export", str(straight[engine]), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    recipe = read_recipe(straight[engine])
    data = prepare_data(recipe, log=lambda *_: None)
    assert len(tokenizer) == len(data.tokenizer)
    world_size, micro = recipe.parallel.nproc, recipe.train.micro_batch_size
    batches = [b for rank in range(world_size)
               for b in eval_batches(data.val, micro, rank, world_size, recipe.train.eval_batches)]
    with torch.no_grad():
        loss = sum(causal_lm_loss(model, b).item() for b in batches) / len(batches)
    assert abs(loss - _eval_loss(straight[engine])) < 1e-5, (loss, _eval_loss(straight[engine]))
    again = launch_in_process("export", str(straight[engine]), str(out))
    assert again.returncode == 2 and "not empty" in again.stderr
