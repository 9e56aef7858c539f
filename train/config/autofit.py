"""``auto`` in a recipe: the launcher chooses the engine, offload, activation checkpointing and
micro-batch from the memory plan (:mod:`train.engines.autofit`), writes the choice into the run's
``recipe.yaml`` (with ``parallel.fitted`` naming what was chosen), and chooses again when a launch
has another world size or GPU, saying what changed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Optional

from train.engines import CAPABILITIES, resumes_from
from train.engines.autofit import Auto, Fit, choose, describe_setup
from train.engines.memory_plan import GB, ModelSizes, Setup
from train.config.checks import check_recipe, engine_problems
from train.config.recipe import AUTO_KEYS, Recipe, auto_keys, micro_batch, offloaded, world_size

STAND_INS: dict[str, Any] = {"parallel.engine": "fsdp", "parallel.offload": False,
                             "model.activation_checkpointing": False, "train.micro_batch_size": 1}
"""What an ``auto`` setting holds while the recipe's other checks run, when nothing could be
chosen (the recipe is refused then, so a stand-in never trains)."""


def _get(recipe: Recipe, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def _set(recipe: Recipe, key: str, value: Any) -> None:
    section, name = key.split(".")
    setattr(getattr(recipe, section), name, value)


def reopen_fitted(recipe: Recipe, overridden: set[str]) -> None:
    """Turn the settings an earlier launch chose (``parallel.fitted``) back to ``auto``, so this
    launch chooses them for its own world size and GPU; one the command line sets is the user's."""
    def given(key: str) -> bool:  # `parallel.engine=...` or the whole `parallel={...}` section
        return any(key == o or key.startswith(o + ".") for o in overridden)

    for key in recipe.parallel.fitted:
        if (key in AUTO_KEYS or key == DERIVED_FROM_ENGINE) and not given(key):
            _set(recipe, key, "auto")
    recipe.parallel.fitted = []


DERIVED_FROM_ENGINE = "train.on_nonfinite"
"""Left to ``auto`` beside a fitted engine, it follows the engine (``resolve_defaults``): listed in
``parallel.fitted`` with it, so a launch that chooses the engine again derives it again (a value
the user gave stays theirs)."""


def excluded_engines(recipe: Recipe) -> dict[str, str]:
    """Engine → why this recipe cannot use it: the rules ``check_recipe`` applies to an explicit
    engine (:func:`~train.config.checks.engine_problems`), and DeepSpeed missing here (an explicit
    ZeRO engine then fails on its import instead)."""
    out: dict[str, str] = {}
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    for name, caps in CAPABILITIES.items():
        if problems := engine_problems(recipe, name):
            out[name] = problems[0].why
        elif caps.family == "deepspeed" and not deepspeed:
            out[name] = "deepspeed is not installed here"
    return out


def saved_engine(recipe: Recipe, run_dir: Path) -> Optional[str]:
    """The engine that wrote the checkpoint this launch resumes (its manifest says; ``None`` for
    ``checkpoint.resume: never`` or no committed checkpoint)."""
    import json

    from train.checkpoint.files import MANIFEST, committed_checkpoints

    resume = recipe.checkpoint.resume
    if resume == "never":
        return None
    found = [Path(resume)] if resume != "auto" else committed_checkpoints(run_dir / "checkpoints")
    if not found:
        return None
    try:
        engine = json.loads((found[-1] / MANIFEST).read_text()).get("engine")
    except (OSError, ValueError, AttributeError):
        return None  # the ranks' own checks refuse an unreadable manifest
    return engine if engine in CAPABILITIES else None


def fit_recipe(recipe: Recipe, gpu_bytes: Optional[float], no_gpu_hint: str, run_dir: Optional[Path] = None,
               sizes: Optional[Callable[[Recipe], ModelSizes]] = None,
               host_bytes: Optional[float] = None) -> tuple[Optional[Fit], list[str]]:
    """Choose every ``auto`` setting of ``recipe`` (in place) and list them in ``parallel.fitted``;
    returns the fit and the problems (one line each). When nothing was chosen the settings hold
    :data:`STAND_INS`; the fit is still returned when candidates were weighed (``plan`` prints
    them), and the problems may be empty: the recipe's own checks say what is wrong
    (the model, a batch that does not divide, a rule that excludes the only engine).
    ``no_gpu_hint`` says why no GPU memory is known here; ``run_dir`` (default ``run.dir``) is
    where a resume's checkpoints are; ``host_bytes`` one node's memory (:func:`node_memory`; unknown:
    not checked), which offloaded state must fit too."""
    keys = auto_keys(recipe)
    if not keys:
        return None, []

    def stand_in(problems: list[str]) -> tuple[Optional[Fit], list[str]]:
        for key in keys:
            _set(recipe, key, STAND_INS[key])
        return None, problems

    if not gpu_bytes:
        return stand_in([f"{', '.join(keys)}: auto chooses from the GPU's memory, and {no_gpu_hint}; set "
                         f"parallel.gpu_mem_gb (one GPU's memory in GB, e.g. 80)"])
    m = recipe.model
    if (m.pretrained is None) == (m.config is None):
        return stand_in([])  # check_recipe says what is wrong with the model
    from train.config.model_checks import model_problems

    if model_problems(recipe):
        return stand_in([])  # the same, through check_recipe(check_model=True)
    from train.config.model_checks import model_sizes

    auto = Auto(engine="parallel.engine" in keys, offload="parallel.offload" in keys,
                checkpointing="model.activation_checkpointing" in keys, micro_batch="train.micro_batch_size" in keys)
    excluded = excluded_engines(recipe)
    assert recipe.run.dir is not None  # resolve_defaults ran
    if auto.engine and (saved := saved_engine(recipe, run_dir or Path(recipe.run.dir))) is not None:
        for name in CAPABILITIES:
            if (why := resumes_from(saved, name)) is not None:
                excluded.setdefault(name, f"the checkpoint it resumes was written by {saved} ({why})")
    world, t, p = world_size(recipe), recipe.train, recipe.parallel
    micro = 1 if auto.micro_batch else micro_batch(recipe)
    base = Setup(engine="ddp" if auto.engine else p.engine, precision=p.precision,
                 offload=False if auto.offload else offloaded(recipe),
                 activation_checkpointing=False if auto.checkpointing else m.activation_checkpointing,
                 micro_batch=micro, seq_len=recipe.data.seq_len, world_size=world, gpus_per_node=p.nproc or 1,
                 reduce_bucket_mb=p.reduce_bucket_mb, reduce_dtype=p.reduce_dtype,
                 accumulation=max(1, t.global_batch_size // (micro * world)))
    fit = choose((sizes or model_sizes)(recipe), base, auto, gpu_bytes, t.global_batch_size, excluded, host_bytes)
    if fit.chosen is None:
        sized = [c for c in fit.candidates if c.estimate is not None]
        if not sized:  # the batch does not divide, or a rule excludes every engine: check_recipe says which
            return stand_in([])
        least = min(sized, key=lambda c: c.estimate.total if c.estimate else 0.0)
        stand_in([])
        return fit, [f"{', '.join(keys)}: auto found nothing that fits {world} GPUs of {gpu_bytes / GB:.3g} GB "
                     f"(the smallest, {describe_setup(least.setup)}, {least.verdict}); use more GPUs or GPUs with "
                     f"more memory (`shardforge plan` lists every candidate)"]
    chosen = fit.chosen
    values = {"parallel.engine": chosen.engine, "parallel.offload": chosen.offload,
              "model.activation_checkpointing": chosen.activation_checkpointing,
              "train.micro_batch_size": chosen.micro_batch}
    for key in keys:
        _set(recipe, key, values[key])
    follows = "parallel.engine" in keys and recipe.train.on_nonfinite == "auto"
    p.fitted = keys + ([DERIVED_FROM_ENGINE] if follows else [])
    return fit, []


SLURM_MEM_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def node_memory(recipe: Recipe, for_slurm: bool) -> Optional[float]:
    """One node's memory in bytes: for a Slurm job ``slurm.mem`` when it states one (``500G``;
    Slurm's default unit is MB; ``0`` means all of a node, unknown here); for a local launch this
    machine's when it is the only node; else unknown (``None``)."""
    mem = recipe.slurm.mem.strip().upper()
    if for_slurm:
        if not mem or mem == "0":
            return None
        unit = mem[-1] if mem[-1] in SLURM_MEM_UNITS else "M"
        number = mem[:-1] if mem[-1] in SLURM_MEM_UNITS else mem
        try:
            return float(number) * SLURM_MEM_UNITS[unit]
        except ValueError:
            return None  # not a size: sbatch refuses it
    if recipe.parallel.nodes == 1:
        import psutil

        return float(psutil.virtual_memory().total)
    return None


def fit_summary(recipe: Recipe, fit: Optional[Fit]) -> Optional[str]:
    """The line a launch prints about what auto chose (``None`` when nothing was auto)."""
    if fit is None or fit.chosen is None:
        return None
    chosen = ", ".join(f"{key}={_show(_get(recipe, key))}" for key in recipe.parallel.fitted)
    return (f"auto-fit: {chosen} ({describe_setup(fit.chosen)}; {fit.chosen.world_size} GPUs of "
            f"{fit.gpu_bytes / GB:.3g} GB; `shardforge plan` lists what it rejected)")


def fit_changes(recipe: Recipe, run_dir: Path) -> list[str]:
    """What this launch's auto-fit changed against the run's ``recipe.yaml`` (another world size
    or GPU): one line, or none when it chose the same (or the run is new)."""
    import yaml

    if not recipe.parallel.fitted or not (run_dir / "recipe.yaml").is_file():
        return []
    try:
        old = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(old, dict):
        return []

    from train.config.resume import value_at

    was_world = (value_at(old, "parallel.nproc") or 1) * (value_at(old, "parallel.nodes") or 1)
    changed = [f"{key} {_show(value_at(old, key))} → {_show(_get(recipe, key))}" for key in recipe.parallel.fitted
               if value_at(old, key) != _get(recipe, key)]
    if not changed:
        return []
    return [f"auto-fit chose again for {world_size(recipe)} GPUs (the run had {was_world}): {', '.join(changed)}"]


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def refit(recipe: Recipe, gpu_bytes: Optional[float], no_gpu_hint: str, run_dir: Path) -> list[str]:
    """Choose the settings an earlier launch chose (``parallel.fitted``) again, for ``recipe``'s
    world size now (an elastic job that came back on fewer nodes); what changed, one phrase each
    (``train.micro_batch_size 4 → 2``). :class:`RecipeError` when nothing can be chosen: the
    recipe is then not to be written (it holds stand-ins)."""
    from train.config.recipe import resolve_defaults
    from train.config.typed import RecipeError

    before = {key: _get(recipe, key) for key in recipe.parallel.fitted}
    reopen_fitted(recipe, set())
    fit, problems = fit_recipe(recipe, gpu_bytes, no_gpu_hint, run_dir, host_bytes=node_memory(recipe, True))
    resolve_defaults(recipe)  # what waited for the engine (train.on_nonfinite)
    if fit is None or fit.chosen is None or problems:
        raise RecipeError(None, problems or check_recipe(recipe, None, check_model=True, data_paths=False) or [
            f"{', '.join(before)}: auto could not choose them again for {world_size(recipe)} GPUs"])
    return [f"{key} {_show(was)} → {_show(_get(recipe, key))}" for key, was in before.items()
            if _get(recipe, key) != was]
