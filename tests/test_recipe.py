"""Recipes: parsing, overrides, all problems in one message, shipped recipes, golden engine configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from launch.cli import main as cli_main
from train.engines.config import engine_configs
from train.config.loading import CONFIG_DIR, RecipeError, load_recipe
from tests.helpers import REPO, shardforge
from train.config.recipe import Recipe, grad_accum_steps, recipe_from_dict
from train.config.typed import field_docs

GOLDEN = Path(__file__).parent / "golden"
SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_every_field_has_a_docstring():
    """Every field of every section, reached through the resolved type hints (an annotation by
    string, like ``Optional["LoraSettings"]``, was skipped before)."""
    import dataclasses
    import typing

    seen = set()

    def walk(cls):
        seen.add(cls.__name__)
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            for tp in (hints[f.name], *typing.get_args(hints[f.name])):
                if dataclasses.is_dataclass(tp) and tp.__name__ not in seen:
                    walk(tp)

    walk(Recipe)
    assert {"LoraSettings", "SourceConfig", "TokenizerTrainConfig", "SlurmConfig", "EvalConfig"} <= seen, seen


BUILT_ON_A_RUN = {"tiny-chat-lora": "sft"}
"""Shipped recipes whose ``model.pretrained`` is another run's export (``make demo-chat-lora`` makes
it); where it is missing, a stand-in of that task is planned instead."""


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_plans(name, capsys, tmp_path):
    from tests.helpers import make_pretrained

    args = []
    if name in BUILT_ON_A_RUN and not Path(load_recipe(name, check_model=False).model.pretrained).exists():
        args = [f"model.pretrained={make_pretrained(tmp_path / 'base', BUILT_ON_A_RUN[name])}"]
    assert cli_main(["plan", name, *args]) == 0
    out = capsys.readouterr().out
    recipe = load_recipe(name, args)
    assert f"gradient accumulation {grad_accum_steps(recipe)}" in out
    assert recipe.run.dir == f"runs/{recipe.run.name}"


def test_overrides_apply_and_round_trip():
    r = load_recipe("tiny-cpu", ["train.max_steps=7", "parallel.engine=zero3", "optim.betas=[0.8, 0.9]",
                                 "data.sources.0.text_field=body", "run.dir=/tmp/x"])
    assert (r.train.max_steps, r.parallel.engine, r.optim.betas) == (7, "zero3", [0.8, 0.9])
    assert r.data.sources[0].text_field == "body" and r.run.dir == "/tmp/x"
    again = recipe_from_dict(yaml.safe_load(yaml.safe_dump(__import__("dataclasses").asdict(r))))
    assert again == r


def problems(*overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny-cpu", list(overrides))
    return err.value.problems


def test_unknown_key_suggests_the_right_one():
    (p,) = problems("train.max_step=3")
    assert p.startswith("train.max_step: unknown key") and "train.max_steps" in p


def test_wrong_type_names_key_and_value():
    (p,) = problems("train.max_steps=lots")
    assert p == "train.max_steps: expected an integer, got 'lots'"


def test_engine_typo_lists_choices():
    (p,) = problems("parallel.engine=zero4")
    assert "parallel.engine" in p and "'zero3'" in p and "did you mean" in p


def test_batch_arithmetic_is_shown():
    (p,) = problems("train.global_batch_size=30")
    assert "30 is not divisible by micro_batch_size × world size = 8 × 2" in p
    assert "= 16" in p and "train.global_batch_size=16 or 32" in p


def test_all_problems_reported_together():
    found = problems("train.max_step=3", "parallel.engine=zero4", "optim.lr=fast", "oops")
    assert len(found) == 4


def test_cli_exits_2_with_one_message_and_no_traceback(tmp_path):
    proc = shardforge("plan", "tiny-cpu", "train.global_batch_size=10")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "train.global_batch_size" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    proc = shardforge("run", str(bad))
    assert proc.returncode == 2 and "not valid YAML at line" in proc.stderr and "Traceback" not in proc.stderr
    proc = shardforge("run", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "no such recipe file" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_plan_writes_nothing(tmp_path):
    proc = shardforge("plan", "tiny-cpu", f"run.dir={tmp_path / 'run'}", "parallel.engine=zero2")
    assert proc.returncode == 0, proc.stderr
    assert '"stage": 2' in proc.stdout and not (tmp_path / "run").exists()


def test_model_and_sizes_checked_before_launch():
    assert any("model.config.model_type" in p and "'llama'" in p
               for p in problems("model.config.model_type=lama"))
    assert any("data.seq_len: 512 is longer than the model's 256 positions" in p
               for p in problems("data.seq_len=512"))
    assert any("parallel.offload" in p for p in problems("parallel.offload=true"))
    assert any(p.startswith("parallel.reduce_dtype: ddp reduces gradients in their own dtype") and
               "set parallel.engine=fsdp" in p for p in problems("parallel.reduce_dtype=bf16"))
    assert load_recipe("tiny-cpu", ["parallel.engine=fsdp", "parallel.reduce_dtype=bf16"]).parallel.reduce_dtype == "bf16"
    assert any("data.sources[0].path" in p for p in problems("data.sources.0.path=./nowhere/*.txt"))


def test_the_launch_path_of_run_imports_neither_torch_nor_transformers(tmp_path):
    """``shardforge run`` validates, writes the run directory and its engine configs without
    importing torch or transformers (seconds each); the ranks check the model. Checked in a fresh
    interpreter, up to the point where the launcher starts torchrun."""
    import subprocess
    import sys

    script = f"""
import sys
from pathlib import Path
from train.engines.config import engine_configs
from launch.local import write_run_dir
from train.config.resume import check_resumable
from train.config.loading import load_recipe
for engine in ("fsdp", "zero3", "ddp"):
    recipe = load_recipe("tiny-cpu", [f"run.dir={tmp_path}/" + engine, "parallel.engine=" + engine], check_model=False)
    assert check_resumable(recipe, Path(recipe.run.dir)) == []
    write_run_dir(recipe, engine_configs(recipe))
heavy = sorted(m for m in ("torch", "transformers", "datasets", "deepspeed", "peft") if m in sys.modules)
print("heavy:", heavy)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "heavy: []"
    assert json.loads((tmp_path / "fsdp" / "fsdp.json").read_text())["shard_modules"] is None
    assert (tmp_path / "zero3" / "deepspeed.json").exists()


@pytest.mark.launch  # the ranks start (and refuse): not for `make test-fast`
def test_a_bad_model_config_is_refused_by_the_ranks_when_run_skips_the_launchers_model_checks(tmp_path):
    """``run`` leaves the transformers checks to the ranks: they refuse before preparing data, the
    launch exits 2 with the line `plan` gives (the agent's ending line); the run directory keeps
    status.json and the ranks' error reports. Sizes the recipe states (positions, layers) the
    launcher checks itself."""
    from train.config.model_checks import model_problems

    bad = ["model.config.model_type=lama", f"run.dir={tmp_path / 'run'}", "parallel.nproc=2",
           f"data.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(RecipeError, match="data.seq_len: 512 is longer than the model's 256 positions"):
        load_recipe("tiny-cpu", ["data.seq_len=512"], check_model=False)  # stated in the recipe: no transformers
    recipe = load_recipe("tiny-cpu", bad, check_model=False)  # the launcher's own checks pass
    (line,) = model_problems(recipe)
    assert line == "model.config.model_type: 'lama' is not a transformers model type; did you mean 'llama'?"
    proc = shardforge("run", "tiny-cpu", *bad)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last in (f"shardforge: failed before the first step: rank {r}: {line} (exit 2)" for r in (0, 1)), \
        proc.stdout + proc.stderr  # every rank refuses; the agent names the first report
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "cache").exists(), "refused before preparing data"
    status = json.loads((tmp_path / "run" / "status.json").read_text())  # kept, with the ranks' reports
    assert status["state"] == "failed" and status["exit_code"] == 2 and status["reason"] == line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_run_refuses_more_than_one_node_in_one_line(tmp_path):
    """A multi-node recipe without --node-rank/--master is refused (never trained as one node's
    share); the options are checked (tests/test_multinode.py trains across two launches)."""
    proc = shardforge("run", "tiny-cpu", "parallel.nodes=2", "parallel.nproc=1", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "parallel.nodes: 2 nodes; start `shardforge run` on every node with --node-rank 0..1 and " \
           "--master HOST:PORT of node 0" in proc.stderr
    assert "shardforge submit" in proc.stderr and not (tmp_path / "run").exists()
    proc = shardforge("run", "tiny-cpu", "parallel.nodes=2", "--node-rank", "2", "--master", "n0")
    assert proc.returncode == 2 and "--node-rank: 2 is not between 0 and 1" in proc.stderr
    assert "--master: 'n0' is not HOST:PORT" in proc.stderr
    proc = shardforge("run", "tiny-cpu", "--node-rank", "0", "--master", "n0:29500")
    assert proc.returncode == 2 and "--node-rank/--master: parallel.nodes is 1" in proc.stderr


def test_plan_names_the_blocks_fsdp_shards():
    proc = shardforge("plan", "minilm-plays", "parallel.engine=fsdp")
    assert proc.returncode == 0, proc.stderr
    assert '"shard_modules": null' in proc.stdout
    assert "# fsdp: each rank shards every BertLayer, then the root" in proc.stdout


GOLDEN_CASES = {
    "tiny-zero1-bf16": ("tiny-cpu", ["parallel.engine=zero1"]),
    "tiny-zero2-fp16": ("tiny-cpu", ["parallel.engine=zero2", "parallel.precision=fp16"]),
    "tiny-zero3-offload": ("tiny-cpu", ["parallel.engine=zero3", "parallel.offload=true"]),
    "tiny-fsdp-fp32": ("tiny-cpu", ["parallel.engine=fsdp", "parallel.precision=fp32"]),
    "gpt2-124m-fsdp": ("gpt2-124m", ["parallel.engine=fsdp"]),
    "llama-1b": ("llama-1b", []),
    "llama-7b-zero3": ("llama-7b-zero3", []),
    "llama-7b-fsdp-offload": ("llama-7b-fsdp", ["parallel.offload=true"]),
    "tiny-fsdp-reduce-bf16": ("tiny-cpu", ["parallel.engine=fsdp", "parallel.reduce_dtype=bf16"]),
    "tiny-zero2-reduce-fp32": ("tiny-cpu", ["parallel.engine=zero2", "parallel.reduce_dtype=fp32"]),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_engine_config_matches_golden(case):
    name, overrides = GOLDEN_CASES[case]
    configs = engine_configs(load_recipe(name, overrides))
    path = GOLDEN / f"{case}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(configs, indent=2) + "\n")
        pytest.skip(f"regenerated {path.name}: review it with git diff, then run without UPDATE_GOLDEN")
    assert configs == json.loads(path.read_text()), "regenerate with UPDATE_GOLDEN=1 if the change is intended"


def test_export_of_a_run_dir_with_a_broken_recipe_exits_2_with_one_line(tmp_path):
    (tmp_path / "recipe.yaml").write_text("train: {max_steps: 5}\nbogus: 1\n")
    proc = shardforge("export", str(tmp_path), str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "recipe.yaml" in proc.stderr and "bogus: unknown key" in proc.stderr


@pytest.mark.parametrize("override, fragment", [
    ("checkpoint.every_steps=-1", "checkpoint.every_steps: must be 0 (off) or more"),
    ("checkpoint.every_minutes=-5", "checkpoint.every_minutes: must be 0 (off) or more"),
    ("data.val_fraction=0", "data.val_fraction: 0 and no data.val_source leaves nothing to evaluate"),
    ("data.num_workers=-1", "data: num_workers must be 0"),
    ("data.max_samples=0", "data.max_samples: must be at least 1"),
    ("run.seed=-1", "run.seed: must be 0 or more"),
    ("optim.lr=.nan", "optim.lr: must be a positive finite number"),
    ("optim.lr=.inf", "optim.lr: must be a positive finite number"),
    ("optim.grad_clip=.nan", "optim.grad_clip: must be a finite number"),
    ("model.config=null model.pretrained=data/minilm", "data.tokenizer.train: model.pretrained brings its own"),
    ("checkpoint.resume=configs", "checkpoint.resume: 'configs' is not auto, never or a committed checkpoint"),
    ("train.max_steps=99999999999999999999999", "train.max_steps: 99999999999999999999999 is beyond any count a "
                                                "run can hold (at most 4,611,686,018,427,387,904 = 2^62)"),
    ("run.name=" + "r" * 300, "run.name: 300 characters, at most 100 (it names a folder and a Slurm job)"),
])
def test_values_that_used_to_fail_inside_the_run_are_refused_before_launch(override, fragment):
    (p,) = problems(*override.split())
    assert p.startswith(fragment), p


def test_run_name_with_a_trailing_newline_is_refused(tmp_path):
    """``re.match(r"...$")`` accepts "x\\n": the name would end an #SBATCH line and run as a command."""
    path = tmp_path / "r.yaml"
    path.write_text((CONFIG_DIR / "tiny-cpu.yaml").read_text().replace("name: tiny-cpu", 'name: "x\\n"'))
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    (p,) = err.value.problems
    assert p.startswith("run.name: 'x\\n' may hold only"), p


@pytest.mark.parametrize("text, fragment", [
    ("train: {max_steps: 3}\ntrain: {log_every: 1}\n", "the key 'train' is given twice"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
     + "".join(f"{k}: &{k} [{', '.join(['*' + p] * 10)}]\n" for p, k in zip("abcdefgh", "bcdefghi")),
     "expands to more than 100,000 values through aliases"),
    ("a: &a [1, *a]\n", "expands to more than"),
])
def test_duplicate_keys_and_alias_bombs_are_one_line_exit_2(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = shardforge("plan", str(path))
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_more_processes_than_cpus_is_refused_on_a_machine_without_gpus(tmp_path):
    import os

    n = (os.cpu_count() or 1) + 1
    proc = shardforge("run", "tiny-cpu", f"run.dir={tmp_path / 'run'}", f"parallel.nproc={n}",
                      "train.global_batch_size=" + str(8 * n), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and f"parallel.nproc: {n} processes, but this machine has no GPU" in proc.stderr, \
        proc.stderr
    assert not (tmp_path / "run").exists()


# Declared but not imported by launch/ or train/, and why.
USED_INDIRECTLY = {"safetensors": "export writes model.safetensors through transformers"}


def test_dependencies_are_declared_used_and_bounded_by_what_is_tested():
    import ast
    import importlib.metadata
    import re
    import sys
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower(): Requirement(r) for r in
                [*project["dependencies"], *project["optional-dependencies"]["peft"]]}
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "constraints.txt").read_text(), flags=re.M))
    pins = {name.lower(): version for name, version in pins.items()}
    for name, req in declared.items():
        assert name in pins, f"{name}: declared in pyproject.toml but not pinned in constraints.txt"
        assert Version(pins[name]) in req.specifier, f"{name}: the tested pin {pins[name]} is outside {req}"
    imported = set()
    for path in [*(REPO / "launch").rglob("*.py"), *(REPO / "train").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"launch", "train"}
    dists = importlib.metadata.packages_distributions()
    used = {dists[m][0].lower() for m in third_party}
    assert used <= set(declared), f"imported but not declared in pyproject.toml: {sorted(used - set(declared))}"
    assert set(declared) - used == set(USED_INDIRECTLY), \
        f"declared but imported nowhere: {sorted(set(declared) - used - set(USED_INDIRECTLY))}"


def test_the_rank_rebuilds_the_engine_config_and_refuses_an_edited_record(tmp_path):
    """deepspeed.json / fsdp.json are built in one place (train.engines.config); the file in the run
    directory is a record the rank checks, never a second source of settings."""
    from launch.local import write_run_dir
    from train.engines.config import EngineConfigMismatch, checked_engine_config

    recipe = load_recipe("tiny-cpu", ["parallel.engine=zero2", "parallel.nproc=2", f"run.dir={tmp_path / 'run'}"],
                         local_gpus=0)
    run_dir = write_run_dir(recipe, engine_configs(recipe))
    assert checked_engine_config(recipe, run_dir) == engine_configs(recipe)["deepspeed.json"]
    cfg = json.loads((run_dir / "deepspeed.json").read_text())
    cfg["zero_optimization"]["stage"] = 3
    (run_dir / "deepspeed.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineConfigMismatch) as err:
        checked_engine_config(recipe, run_dir)
    assert "deepspeed.json: zero_optimization.stage is 3 there, but recipe.yaml gives 2" in str(err.value)
    (run_dir / "deepspeed.json").write_text("{")
    with pytest.raises(EngineConfigMismatch, match="deepspeed.json: unreadable"):
        checked_engine_config(recipe, run_dir)


def test_accumulation_is_one_formula_that_refuses_a_batch_that_does_not_divide():
    """The launcher's check names the divisors; on a rank the same formula refuses (batches.py
    rounded down before)."""
    from train.config.recipe import accumulation
    from train.config.typed import RecipeError

    assert accumulation(64, 4, 2) == 8
    with pytest.raises(RecipeError, match=r"10 is not divisible by micro_batch_size × world size = 2 × 3 = 6"):
        accumulation(10, 2, 3)


def test_a_rank_runs_the_launchers_checks_on_the_recipe_it_reads(tmp_path, monkeypatch):
    """One set of checks (train.config.checks): the launcher runs it on the recipe it loads, each
    rank again on recipe.yaml, so a record edited after the launch is refused naming the file."""
    from launch.local import write_run_dir
    from train.config.loading import read_recipe
    from train.config.typed import RecipeError

    recipe = load_recipe("tiny-cpu", ["parallel.nproc=2", f"run.dir={tmp_path / 'run'}"], local_gpus=0)
    run_dir = write_run_dir(recipe, engine_configs(recipe))
    assert read_recipe(run_dir, check=True) == read_recipe(run_dir)
    text = (run_dir / "recipe.yaml").read_text()
    (run_dir / "recipe.yaml").write_text(text.replace("global_batch_size: 32", "global_batch_size: 10"))
    assert read_recipe(run_dir).train.global_batch_size == 10  # export and status still read it
    with pytest.raises(RecipeError) as err:
        read_recipe(run_dir, check=True)
    assert str(err.value).startswith(f"{run_dir / 'recipe.yaml'}: train.global_batch_size: 10 is not divisible")
    # the data sources' paths are checked where they are read (rank 0), not on every rank
    (run_dir / "recipe.yaml").write_text(text.replace("data/shakespeare", str(tmp_path / "only-on-node-0")))
    monkeypatch.setenv("RANK", "1")
    assert read_recipe(run_dir, check=True).data.sources[0].path == str(tmp_path / "only-on-node-0" / "*_gut.txt")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RecipeError, match="only-on-node-0"):
        read_recipe(run_dir, check=True)
