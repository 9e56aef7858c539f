"""Auto-fit (train/engines/autofit.py, train/config/autofit.py): every decision on CPU from stated GPU
memory (``parallel.gpu_mem_gb`` or the ``gpu_bytes`` argument: no GPU is needed to decide), the
choice written into recipe.yaml, kept on the same world size, chosen again on another; the
refusals; and the golden table ``shardforge plan`` prints."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_corpus, run_recipe, shardforge, tiny_recipe, write_recipe
from train.engines.autofit import Auto, choose, fit_table, ladder, micro_batches
from train.engines.memory_plan import HEADROOM, ModelSizes, Setup, estimate

GOLDEN = Path(__file__).parent / "golden"
SEVEN_B = ModelSizes(params=6_738_415_616, trainable=6_738_415_616, largest_layer=131_072_000, block=202_383_360,
                     root=262_148_096, layers=32, hidden=4096, intermediate=11008, heads=32, vocab=32000)
BASE = Setup("ddp", "bf16", micro_batch=1, seq_len=4096, world_size=32, gpus_per_node=8, accumulation=32)
ALL = Auto(engine=True, offload=True, checkpointing=True, micro_batch=True)


def just_fits(s: Setup) -> float:
    """GPU bytes at which ``s`` fits with nothing to spare."""
    return estimate(SEVEN_B, s).total / HEADROOM * 1.0001


def test_the_ladder_is_least_communication_then_checkpointing_then_offload():
    steps = [(s.engine, s.activation_checkpointing, s.offload) for s in ladder(BASE, ALL)]
    assert steps[:5] == [(e, False, False) for e in ("ddp", "zero1", "zero2", "fsdp", "zero3")]
    assert steps[5:10] == [(e, "selective", False) for e in ("ddp", "zero1", "zero2", "fsdp", "zero3")]
    assert steps[15] == ("zero1", False, True)  # ddp cannot offload: never tried with it
    assert len(steps) == 15 + 12
    fixed = ladder(dataclasses.replace(BASE, engine="fsdp"), Auto(offload=True))
    assert [(s.engine, s.offload) for s in fixed] == [("fsdp", False), ("fsdp", True)]


@pytest.mark.parametrize("engine", ["ddp", "zero1", "zero2", "zero3"])
def test_gpu_memory_forces_each_engine(engine):
    """Just enough memory for ``engine`` at micro-batch 1: every engine before it needs more (and
    with enough for DDP, DDP: it sends the least)."""
    target = dataclasses.replace(BASE, engine=engine)
    fit = choose(SEVEN_B, BASE, Auto(engine=True), just_fits(target), global_batch=1024)
    assert fit.chosen == target
    assert [c.setup.engine for c in fit.rejected] == list(("ddp", "zero1", "zero2", "fsdp"))[:len(fit.rejected)]
    assert all("more than 90% of" in c.verdict for c in fit.rejected)


def test_fsdp_when_it_fits_before_zero3():
    small = dataclasses.replace(SEVEN_B, params=1_000_000_000, trainable=1_000_000_000)
    fsdp = dataclasses.replace(BASE, engine="fsdp")
    gpu = estimate(small, fsdp).total / HEADROOM * 1.0001
    assert not estimate(small, dataclasses.replace(BASE, engine="zero2")).fits(gpu)
    assert choose(small, BASE, Auto(engine=True), gpu, 1024).chosen == fsdp


@pytest.mark.parametrize("ckpt", ["selective", True])
def test_gpu_memory_forces_checkpointing(ckpt):
    base = dataclasses.replace(BASE, engine="fsdp")
    target = dataclasses.replace(base, activation_checkpointing=ckpt)
    fit = choose(SEVEN_B, base, Auto(checkpointing=True), just_fits(target), 1024)
    assert fit.chosen == target


def test_offload_only_when_nothing_fits_without_it():
    base = dataclasses.replace(BASE, engine="zero3")
    target = dataclasses.replace(base, offload=True, activation_checkpointing=True)
    fit = choose(SEVEN_B, base, Auto(offload=True, checkpointing=True), just_fits(target), 1024)
    assert fit.chosen == target
    assert [(c.setup.activation_checkpointing, c.setup.offload) for c in fit.rejected] == \
        [(False, False), ("selective", False), (True, False), (False, True), ("selective", True)]
    roomy = choose(SEVEN_B, base, Auto(offload=True, checkpointing=True), 1e12, 1024)
    assert roomy.chosen is not None and not roomy.chosen.offload


def test_micro_batch_is_the_largest_that_fits_and_keeps_the_global_batch():
    assert micro_batches(1024, 32) == [32, 16, 8, 4, 2, 1]
    assert micro_batches(12, 2) == [6, 3, 2, 1] and micro_batches(10, 4) == []
    base = dataclasses.replace(BASE, engine="zero3", activation_checkpointing=True)
    four = dataclasses.replace(base, micro_batch=4, accumulation=8)
    eight = dataclasses.replace(base, micro_batch=8, accumulation=4)
    gpu = just_fits(four)
    assert not estimate(SEVEN_B, eight).fits(gpu)
    fit = choose(SEVEN_B, base, Auto(micro_batch=True), gpu, 1024)
    assert fit.chosen == four and fit.chosen.micro_batch * fit.chosen.accumulation * 32 == 1024
    assert [c.setup.micro_batch for c in fit.rejected] == [32, 16, 8]


def test_engines_a_recipe_excludes_are_listed_not_chosen():
    fit = choose(SEVEN_B, BASE, Auto(engine=True), 1e12, 1024, excluded={"ddp": "model.lora runs on ddp or fsdp"})
    assert fit.chosen is not None and fit.chosen.engine == "zero1"
    assert fit.rejected[0].estimate is None and fit.rejected[0].verdict == "model.lora runs on ddp or fsdp"


def test_plan_table_is_golden():
    fit = choose(SEVEN_B, BASE, ALL, 80e9, 1024)
    text = fit_table(fit) + "\n"
    golden = GOLDEN / "autofit-7b-80gb.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
        pytest.skip(f"regenerated tests/golden/{golden.name}: review it with git diff, then run without UPDATE_GOLDEN")
    assert text == golden.read_text(), "regenerate with UPDATE_GOLDEN=1 if the change is intended"


# --- the recipe: what the launcher chooses and writes ---------------------------------------------------------

MID_MODEL = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
             "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 512, "vocab_size": 32000}


def mid_recipe(tmp: Path, **parallel) -> dict:
    """A ~135M-parameter Llama (counted on the meta device, never built) on 8 GPUs."""
    corpus = tmp / "corpus" if (tmp / "corpus").exists() else make_corpus(tmp / "corpus", files=1, words_per_file=50)
    r = tiny_recipe(corpus, tmp / "cache", tmp / "run", model={"config": MID_MODEL},
                    parallel={"engine": "auto", "precision": "bf16", "nproc": 8, **parallel},
                    train={"micro_batch_size": "auto", "global_batch_size": 64},
                    data={"seq_len": 512})
    return r


def load(tmp: Path, recipe: dict, *overrides: str, gpu_gb: float | None = None):
    from train.config.loading import load_fitted_recipe

    return load_fitted_recipe(str(write_recipe(tmp / "r.yaml", recipe)), overrides, local_gpus=8,
                              gpu_bytes=(lambda: gpu_gb * 1e9) if gpu_gb else None)


def test_the_launcher_writes_the_choice_and_chooses_again_on_another_world(tmp_path):
    from train.config.autofit import fit_changes, fit_summary
    from train.config.loading import recipe_yaml

    recipe, fit = load(tmp_path, mid_recipe(tmp_path), gpu_gb=4)
    assert fit is not None and fit.chosen is not None
    p, t = recipe.parallel, recipe.train
    assert (p.engine, t.micro_batch_size) == (fit.chosen.engine, fit.chosen.micro_batch)
    assert p.fitted == ["parallel.engine", "train.micro_batch_size", "train.on_nonfinite"] and p.engine != "ddp"
    line = fit_summary(recipe, fit)
    assert line is not None and f"parallel.engine={p.engine}" in line and "8 GPUs of 4 GB" in line
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(recipe_yaml(recipe))
    again, _ = load(tmp_path, yaml.safe_load((run_dir / "recipe.yaml").read_text()), gpu_gb=4)
    assert (again.parallel.engine, again.train.micro_batch_size) == (p.engine, t.micro_batch_size)
    assert fit_changes(again, run_dir) == []  # the same world and GPU: the same choice
    fewer, _ = load(tmp_path, yaml.safe_load((run_dir / "recipe.yaml").read_text()), "parallel.nproc=2",
                    gpu_gb=4)
    assert (p.engine, fewer.parallel.engine) == ("zero1", "fsdp")  # fewer GPUs: more to shard per GPU
    assert fit_changes(fewer, run_dir) == ["auto-fit chose again for 2 GPUs (the run had 8): parallel.engine zero1 → "
                                           "fsdp, train.on_nonfinite stop → skip"]  # derived from the engine again
    fixed, _ = load(tmp_path, yaml.safe_load((run_dir / "recipe.yaml").read_text()), "parallel.engine=zero3",
                    gpu_gb=4)
    assert fixed.parallel.engine == "zero3" and fixed.parallel.fitted == ["train.micro_batch_size"]


def test_lora_and_a_resume_exclude_engines(tmp_path):
    r = mid_recipe(tmp_path)
    recipe, fit = load(tmp_path, {**r, "model": {**r["model"], "lora": {"r": 4}}}, gpu_gb=4)
    assert fit is not None and recipe.parallel.engine in ("ddp", "fsdp")
    assert all(c.verdict == "model.lora runs on ddp or fsdp" for c in fit.rejected if c.setup.engine.startswith("zero"))


def test_auto_without_gpu_memory_and_auto_in_a_ranks_record_are_refused(tmp_path):
    from train.config.loading import RecipeError
    from train.config.recipe import recipe_from_dict, resolve_defaults
    from train.config.checks import check_recipe

    with pytest.raises(RecipeError) as err:
        load(tmp_path, mid_recipe(tmp_path))
    assert "parallel.engine, train.micro_batch_size: auto chooses from the GPU's memory, and this machine shows " \
           "no GPU (NVML); set parallel.gpu_mem_gb" in str(err.value)
    with pytest.raises(RecipeError) as err:
        load(tmp_path, mid_recipe(tmp_path), gpu_gb=0.5)
    assert "auto found nothing that fits 8 GPUs of 0.5 GB" in str(err.value)
    record = resolve_defaults(recipe_from_dict(mid_recipe(tmp_path)), nproc=8)
    assert check_recipe(record, None, check_model=False) == [
        "parallel.engine, train.micro_batch_size: auto is chosen by the launcher (`shardforge run`, `plan` or "
        "`submit`), which writes the choice into the run's recipe.yaml; start the run with one of them"]


def test_plan_prints_the_choice_and_submit_needs_the_gpu_memory(tmp_path):
    proc = shardforge("plan", "llama-7b-fsdp", "parallel.engine=auto", "train.micro_batch_size=auto",
                      "parallel.offload=auto", "model.activation_checkpointing=auto")
    assert proc.returncode == 0, proc.stderr
    assert "#   chosen: zero1, micro-batch 1 × accumulation 32" in proc.stdout
    assert "fitted:\n  - parallel.engine\n" in proc.stdout  # the resolved recipe says what auto chose
    proc = shardforge("submit", "llama-7b-fsdp", "parallel.engine=auto", "parallel.gpu_mem_gb=null",
                      f"run.dir={tmp_path / 'job'}", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "a Slurm job's GPUs are not visible from where it is submitted; set parallel.gpu_mem_gb" in proc.stderr
    proc = shardforge("submit", "llama-7b-fsdp", "parallel.engine=auto", "train.micro_batch_size=auto",
                      f"run.dir={tmp_path / 'job'}", "--dry-run")  # the recipe states 80 GB
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!") and "auto-fit" not in proc.stdout  # stdout: the job script alone
    assert "shardforge: auto-fit" in proc.stderr and "zero1" in proc.stderr, proc.stderr
    assert not (tmp_path / "job").exists()


def test_a_run_keeps_its_fit_and_fits_again_on_another_world_size(tmp_path):
    """Three launches of one run: 2 ranks (micro-batch auto → 4 of the 8 per step, stopped at step 3),
    the same 2 ranks (nothing changes, stopped at step 6), then 1 rank: micro-batch 8, said so, and
    the run completes. (Any memory fits 80 GB here: the choice is the largest micro-batch.)"""
    corpus = make_corpus(tmp_path / "corpus", files=4)
    r = tiny_recipe(corpus, tmp_path / "cache", tmp_path / "auto", train={"micro_batch_size": "auto", "max_steps": 8,
                                                                        "stop_after": 3},
                    parallel={"engine": "ddp", "precision": "fp32", "nproc": 2, "gpu_mem_gb": 80})
    first = run_recipe(tmp_path, r, expect=75)
    assert "auto-fit: train.micro_batch_size=4 (ddp, micro-batch 4 × accumulation 1; 2 GPUs of 80 GB" in first.stdout
    saved = yaml.safe_load((tmp_path / "auto" / "recipe.yaml").read_text())
    assert saved["train"]["micro_batch_size"] == 4 and saved["parallel"]["fitted"] == ["train.micro_batch_size"]
    second = run_recipe(tmp_path, r, expect=75)
    assert "chose again" not in second.stdout + second.stderr and "at step 3 (2 → 2 ranks)" in second.stdout
    third = run_recipe(tmp_path, r, "parallel.nproc=1", "train.stop_after=0")
    assert "auto-fit chose again for 1 GPUs (the run had 2): train.micro_batch_size 4 → 8" in third.stdout
    assert yaml.safe_load((tmp_path / "auto" / "recipe.yaml").read_text())["train"]["micro_batch_size"] == 8
    assert "at step 6 (2 → 1 ranks)" in third.stdout and "completed at step 8" in third.stdout


def test_plan_lists_the_candidates_when_nothing_fits(tmp_path):
    from tests.helpers import launch_in_process

    proc = launch_in_process("plan", "llama-7b-fsdp", "parallel.engine=auto", "parallel.gpu_mem_gb=4")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "#   chosen: nothing fits" in proc.stdout and "model.compile is not supported under ZeRO-3" in proc.stdout
    assert "auto found nothing that fits 32 GPUs of 4 GB (the smallest, fsdp, micro-batch 2" in proc.stderr


def test_choosing_again_refuses_rather_than_writing_stand_ins(tmp_path):
    """An elastic job's refit on a node where nothing fits raises: the recipe must not be written
    with the placeholders a refused launch holds (fsdp, micro-batch 1, nothing in ``fitted``)."""
    from train.config.autofit import refit
    from train.config.recipe import recipe_from_dict, resolve_defaults
    from train.config.typed import RecipeError

    r = mid_recipe(tmp_path)
    r["parallel"].update(engine="zero1", fitted=["parallel.engine", "train.micro_batch_size"])
    r["train"].update(micro_batch_size=1, on_nonfinite="stop")  # as resolve_defaults wrote it for zero1
    recipe = resolve_defaults(recipe_from_dict(r), nproc=8)
    with pytest.raises(RecipeError) as err:
        refit(recipe, 0.5e9, "no GPU", tmp_path / "run")
    assert "auto found nothing that fits 8 GPUs of 0.5 GB" in str(err.value)
    recipe = resolve_defaults(recipe_from_dict(r), nproc=8)
    assert refit(recipe, 4e9, "no GPU", tmp_path / "run") == []  # 4 GB on 8 GPUs: zero1 again
    assert recipe.train.on_nonfinite == "stop" and recipe.parallel.fitted == ["parallel.engine",
                                                                              "train.micro_batch_size"]


def test_a_resume_reads_the_engine_from_the_checkpoint_it_resumes(tmp_path):
    from train.config.autofit import excluded_engines, reopen_fitted, saved_engine
    from train.config.recipe import recipe_from_dict, resolve_defaults

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000004" / "manifest.json").write_text('{"engine": "zero3", "world_size": 8}')
    (run_dir / "recipe.yaml").write_text("parallel: {engine: fsdp}\n")  # not what the checkpoint says
    r = mid_recipe(tmp_path)
    recipe = resolve_defaults(recipe_from_dict(r), nproc=8)
    assert saved_engine(recipe, run_dir) == "zero3"
    recipe.checkpoint.resume = "never"
    assert saved_engine(recipe, run_dir) is None
    # a fitted engine's derived train.on_nonfinite is derived again for the engine chosen next
    r["parallel"].update(engine="fsdp", fitted=["parallel.engine", "train.on_nonfinite"])
    recipe = resolve_defaults(recipe_from_dict(r), nproc=8)
    assert recipe.train.on_nonfinite == "skip" and "zero2" in excluded_engines(recipe)
    reopen_fitted(recipe, set())
    assert recipe.train.on_nonfinite == "auto" and recipe.parallel.engine == "auto"
    assert "zero2" not in excluded_engines(recipe)
    # one the user gave (not in fitted) stays theirs
    r["parallel"].update(fitted=["parallel.engine"])
    recipe = resolve_defaults(recipe_from_dict(r), nproc=8)
    reopen_fitted(recipe, set())
    assert recipe.train.on_nonfinite == "skip" and recipe.parallel.engine == "auto"


def test_nvml_memory_is_what_cuda_reports():
    """A fake pynvml (no GPU here; the narrowest seam: the module the launcher asks): NVML's v2
    memory info less the driver's reserve, which torch's total_memory leaves out too; the total
    where an older driver has no v2."""
    from types import SimpleNamespace

    from launch.gpus import usable_bytes

    v2 = SimpleNamespace(nvmlMemory_v2=2, nvmlDeviceGetMemoryInfo=lambda h, version=1: SimpleNamespace(
        total=85_520_809_984, reserved=531_628_032) if version == 2 else SimpleNamespace(total=85_520_809_984))
    assert usable_bytes(v2, "gpu0") == 85_520_809_984 - 531_628_032

    def v1_only(handle, version=None):
        if version is not None:
            raise RuntimeError("NVML_ERROR_FUNCTION_NOT_FOUND")
        return SimpleNamespace(total=42)

    assert usable_bytes(SimpleNamespace(nvmlMemory_v2=2, nvmlDeviceGetMemoryInfo=v1_only), "gpu0") == 42


def test_a_resume_is_offered_only_engines_that_load_its_checkpoint(tmp_path):
    """Measured on CPU: DeepSpeed 0.19 loads no ZeRO-2 checkpoint under ZeRO-3 (its load finds no
    ZeRO-3 model-state file, universal conversion or not), so a ZeRO-2 run that auto-fit would
    move to ZeRO-3 keeps to ZeRO-1/2, and DCP's engines are offered DDP and FSDP only."""
    from train.engines import resumes_from

    assert resumes_from("zero2", "zero1") is None and resumes_from("ddp", "fsdp") is None
    assert resumes_from("zero2", "zero3") == "ZeRO-2's layout, which ZeRO-3 cannot load"
    assert resumes_from("zero3", "fsdp") == "deepspeed format, which 'fsdp' cannot read"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000004" / "manifest.json").write_text('{"engine": "zero2", "world_size": 8}')
    recipe, fit = load(tmp_path, mid_recipe(tmp_path), "parallel.nproc=2", gpu_gb=6)  # ddp when fresh
    assert fit is not None and recipe.parallel.engine in ("zero1", "zero2")
    assert [(c.setup.engine, c.verdict) for c in fit.rejected if c.estimate is None] == [
        ("ddp", "the checkpoint it resumes was written by zero2 (deepspeed format, which 'ddp' cannot read)")]
    with pytest.raises(Exception) as err:  # 3 GB: only what ZeRO-2's checkpoint rules out is left
        load(tmp_path, mid_recipe(tmp_path), "parallel.nproc=2", gpu_gb=3)
    assert "auto found nothing that fits 2 GPUs of 3 GB" in str(err.value)


def test_one_rule_set_refuses_an_explicit_engine_and_excludes_it_from_auto_fit(tmp_path):
    """``engine_problems`` states each rule once: ``check_recipe`` prints its lines for the recipe's
    engine, auto-fit lists its first reason beside every engine it rules out."""
    from train.config.autofit import excluded_engines
    from train.config.checks import check_recipe, engine_problems
    from train.config.recipe import recipe_from_dict, resolve_defaults

    r = mid_recipe(tmp_path, engine="zero3", reduce_dtype="bf16")
    r["train"].update(micro_batch_size=1, on_nonfinite="skip")
    r["model"].update(compile=True)
    recipe = resolve_defaults(recipe_from_dict(r), nproc=8)
    assert engine_problems(recipe, "fsdp") == []
    found = engine_problems(recipe, "zero3")
    assert [e.key for e in found] == ["model.compile", "train.on_nonfinite"]
    lines = check_recipe(recipe, None, check_model=False, data_paths=False)
    assert all(e.line in lines for e in found)
    assert excluded_engines(recipe)["zero3"] == found[0].why == "model.compile is not supported under ZeRO-3"
    assert excluded_engines(recipe)["zero2"] == "train.on_nonfinite=skip needs ddp or fsdp"
    assert excluded_engines(recipe)["ddp"] == "parallel.reduce_dtype is a setting of fsdp and ZeRO"
    assert "fsdp" not in excluded_engines(recipe)
