"""The recipe's cross-field checks (batch arithmetic, sizes, paths, engine choices), one line per
problem. The launcher runs them on the recipe it loads (``train.config.loading.load_recipe``) and every
rank again on the ``recipe.yaml`` it reads (``train.rundir.read_recipe(check=True)``), so a record
edited between the two is refused the same way."""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from train.data.files import local_files as _local_files, path_problem
from train.engines import capabilities, engines_that
from train.config.model_checks import declared_sizes, model_problems, size_problems
from train.config.recipe import TASK_METRICS, Recipe, auto_keys, micro_batch

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
"""A run name: it names a folder and a Slurm job."""


@dataclass(frozen=True)
class EngineProblem:
    """A setting of the recipe that rules an engine out."""

    key: str
    """The setting (``model.lora``): ``check_recipe`` prints each where it checks that section."""
    why: str
    """Auto-fit's reason, one phrase (``shardforge plan`` lists it beside the engine)."""
    line: str
    """``check_recipe``'s line for an explicit ``parallel.engine``: what is wrong and the fix."""


def engine_problems(r: Recipe, engine: str) -> list[EngineProblem]:
    """Why ``r`` cannot run on ``engine`` (empty: it can). Each rule is stated here once: for an
    explicit engine ``check_recipe`` prints the lines, auto-fit skips the engine (its first
    problem, in this order, is the reason it lists)."""
    caps, m, par = capabilities(engine), r.model, r.parallel
    lora, async_save, skip = (" or ".join(engines_that(**{key: True}))  # the engines that can: "ddp or fsdp"
                              for key in ("lora", "async_save", "skip_nonfinite"))
    out = []
    if m.lora is not None and not caps.lora:
        out.append(EngineProblem("model.lora", f"model.lora runs on {lora}",
                                 f"model.lora: supported (and tested) with parallel.engine {lora}, not {engine}; "
                                 f"set parallel.engine=fsdp"))
    if m.compile and caps.zero_stage == 3:  # DeepSpeed compiles ZeRO-3 only through its own engine.compile()
        out.append(EngineProblem("model.compile", "model.compile is not supported under ZeRO-3",
                                 "model.compile: torch.compile of each block is not supported under ZeRO-3, whose "
                                 "hooks gather each parameter as it is used (DeepSpeed compiles through "
                                 "engine.compile()); set model.compile=false, or parallel.engine=fsdp to compile"))
    if r.checkpoint.async_save and not caps.async_save:
        out.append(EngineProblem("checkpoint.async_save", f"checkpoint.async_save needs {async_save}",
                                 f"checkpoint.async_save: needs parallel.engine {async_save} (DeepSpeed saves "
                                 f"synchronously); set checkpoint.async_save=false"))
    if r.train.on_nonfinite == "skip" and not caps.skip_nonfinite:
        out.append(EngineProblem("train.on_nonfinite", f"train.on_nonfinite=skip needs {skip}",
                                 f"train.on_nonfinite: skip needs parallel.engine {skip} (DeepSpeed applies its step "
                                 f"before the gradient norm is known); set train.on_nonfinite=stop"))
    if par.reduce_dtype is not None and caps.config_file is None:
        out.append(EngineProblem("parallel.reduce_dtype", "parallel.reduce_dtype is a setting of fsdp and ZeRO",
                                 f"parallel.reduce_dtype: {engine} reduces gradients in their own dtype; it is a "
                                 f"setting of fsdp and the ZeRO engines: set parallel.engine=fsdp, or leave "
                                 f"parallel.reduce_dtype unset"))
    return out


def _engine_lines(r: Recipe, key: str) -> list[str]:
    """``check_recipe``'s lines about ``key`` for the recipe's own engine (see :func:`engine_problems`)."""
    return [e.line for e in engine_problems(r, r.parallel.engine) if e.key == key]


def _divisors_near(n: int, unit: int) -> str:
    lower = (n // unit) * unit
    options = [v for v in (lower, lower + unit) if v > 0]
    return " or ".join(str(v) for v in options)


def check_recipe(r: Recipe, local_gpus: Optional[int], check_model: bool = True,
                 data_paths: bool = True) -> list[str]:
    """Cross-field checks: batch arithmetic, sizes, paths, engine choices. One line per problem.
    ``data_paths=False`` leaves out whether the data sources exist here (a rank that does not
    prepare the data may not see them: a source on the first node's own disk)."""
    if keys := auto_keys(r):  # the launcher chooses them before it checks; a record still holding one is refused
        return [f"{', '.join(keys)}: auto is chosen by the launcher (`shardforge run`, `plan` or `submit`), which "
                f"writes the choice into the run's recipe.yaml; start the run with one of them"]
    p: list[str] = []
    t, par = r.train, r.parallel
    assert par.nproc is not None  # load_recipe resolved it (resolve_defaults) before these checks
    if len(r.run.name) > 100:
        p.append(f"run.name: {len(r.run.name)} characters, at most 100 (it names a folder and a Slurm job); "
                 f"shorten it")
    elif not SAFE_NAME.fullmatch(r.run.name):  # match() would let a trailing newline through
        p.append(f"run.name: {r.run.name!r} may hold only letters, digits, '.', '_' and '-', and starts with a "
                 f"letter or digit; rename the run")
    for key in ("max_steps", "micro_batch_size", "global_batch_size", "log_every"):
        if getattr(t, key) < 1:
            p.append(f"train.{key}: must be at least 1, got {getattr(t, key)}")
    for key in ("eval_every", "eval_batches", "stop_after"):
        if (getattr(t, key) or 0) < 0:
            p.append(f"train.{key}: must be 0 or more, got {getattr(t, key)}")
    if par.nproc is not None and par.nproc < 1 or par.nodes < 1:
        p.append(f"parallel: nproc and nodes must be at least 1 (nproc={par.nproc}, nodes={par.nodes})")
    elif micro_batch(r) >= 1 and t.global_batch_size >= 1:
        world = par.nproc * par.nodes
        unit = micro_batch(r) * world
        if t.global_batch_size % unit:
            p.append(f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                     f"micro_batch_size × world size = {micro_batch(r)} × {world} "
                     f"({par.nproc} per node × {par.nodes} nodes) = {unit}; set "
                     f"train.global_batch_size={_divisors_near(t.global_batch_size, unit)} "
                     f"or change train.micro_batch_size")
    if local_gpus and par.nodes == 1 and par.nproc > local_gpus:
        p.append(f"parallel.nproc: {par.nproc} processes but this node has {local_gpus} GPUs; "
                 f"set parallel.nproc={local_gpus}")
    caps = capabilities(par.engine)
    p += _engine_lines(r, "train.on_nonfinite")
    if r.run.seed < 0:
        p.append(f"run.seed: must be 0 or more (numpy takes unsigned seeds), got {r.run.seed}")
    if t.step_timeout_s < 0:
        p.append(f"train.step_timeout_s: must be 0 (off) or more, got {t.step_timeout_s}")
    if par.gpu_mem_gb is not None and par.gpu_mem_gb <= 0:
        p.append(f"parallel.gpu_mem_gb: must be more than 0 (one GPU's memory in GB, e.g. 80), got {par.gpu_mem_gb}")
    p += _engine_lines(r, "parallel.reduce_dtype")
    if par.offload and not caps.offload:
        p.append("parallel.offload: DDP keeps every replica on the device; use parallel.engine=zero2, "
                 "zero3 or fsdp to offload, or set parallel.offload=false")
    m = r.model
    p += _engine_lines(r, "model.compile")
    if (m.pretrained is None) == (m.config is None):
        p.append("model: give exactly one of model.pretrained (weights to load) or model.config "
                 "(inline config for random init)")
    if check_model:  # what only transformers can tell (`shardforge run` leaves it to the ranks)
        p += model_problems(r)
    elif (m.pretrained is None) != (m.config is None):  # the sizes the recipe or config.json states
        p += size_problems(r, **declared_sizes(r))
    if m.attn_implementation not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"):
        p.append(f"model.attn_implementation: {m.attn_implementation!r} is not sdpa, eager, "
                 f"flash_attention_2, flash_attention_3 or flex_attention")
    p += _check_task(r)
    d = r.data
    if d.seq_len < 2:
        p.append(f"data.seq_len: must be at least 2, got {d.seq_len}")
    if not d.sources:
        p.append("data.sources: no training data; add at least one {path: ...} entry")
    named = [(f"data.sources[{i}]", s) for i, s in enumerate(d.sources)] + \
        [(key, s) for key, s in (("data.val_source", d.val_source), ("data.test_source", d.test_source)) if s]
    for where, src in named:
        if not src.path:
            p.append(f"{where}.path: empty; set it to a file, folder, glob or hub dataset name")
        elif data_paths and (problem := path_problem(where, src.path, src.split)) is not None:
            missing = _local_files(src.path) == [] and not Path(src.path).expanduser().exists()
            p.append(problem + (missing_path_hint(src.path) if missing else ""))
        if src.weight <= 0:
            p.append(f"{where}.weight: must be positive, got {src.weight}")
    if not 0 <= d.val_fraction < 1:
        p.append(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    elif d.val_fraction == 0 and d.val_source is None:
        p.append("data.val_fraction: 0 and no data.val_source leaves nothing to evaluate, yet the run "
                 "evaluates at its end (and every train.eval_every steps); set data.val_fraction=0.01 "
                 "or data.val_source")
    if d.num_workers < 0 or (d.num_proc is not None and d.num_proc < 1):
        p.append(f"data: num_workers must be 0 (load in the training process) or more and num_proc at "
                 f"least 1 (num_workers={d.num_workers}, num_proc={d.num_proc})")
    if d.max_samples is not None and d.max_samples < 1:
        p.append(f"data.max_samples: must be at least 1 (or unset for all samples), got {d.max_samples}")
    if d.max_record_mb < 1:
        p.append(f"data.max_record_mb: must be at least 1, got {d.max_record_mb}")
    tok = d.tokenizer
    if tok.train is None and tok.path is None and m.pretrained is None:
        p.append("data.tokenizer: no tokenizer; set data.tokenizer.path, model.pretrained, or "
                 "data.tokenizer.train.vocab_size to train one")
    if tok.train is not None and tok.path is not None:
        p.append(f"data.tokenizer: sets both path ({tok.path!r}, a tokenizer to load) and train (a tokenizer "
                 f"to train), and one would be ignored; remove one of them (on the command line, setting "
                 f"either replaces the other)")
    if tok.train is not None and m.pretrained is not None and r.task == "causal_lm":
        p.append("data.tokenizer.train: model.pretrained brings its own tokenizer (its embeddings index its "
                 "vocabulary); remove data.tokenizer.train")
    if tok.train is not None and tok.train.vocab_size < 300:
        p.append(f"data.tokenizer.train.vocab_size: {tok.train.vocab_size} is below the 256 byte "
                 f"symbols plus merges; use at least 300")
    o = r.optim
    if not (math.isfinite(o.lr) and o.lr > 0):
        p.append(f"optim.lr: must be a positive finite number, got {o.lr}")
    for key in ("eps", "weight_decay", "grad_clip", "min_lr_ratio"):
        if not math.isfinite(getattr(o, key)):
            p.append(f"optim.{key}: must be a finite number, got {getattr(o, key)}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas: expected two numbers in [0, 1), got {o.betas}")
    if o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
        p.append("optim: warmup_steps, grad_clip and weight_decay must not be negative")
    if not 0 <= o.min_lr_ratio <= 1:
        p.append(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    c = r.checkpoint
    if c.resume not in ("auto", "never") and not (Path(c.resume) / "manifest.json").is_file():
        p.append(f"checkpoint.resume: {c.resume!r} is not auto, never or a committed checkpoint "
                 f"directory (one with a manifest.json, e.g. runs/NAME/checkpoints/step-000100); fix the path")
    p += _engine_lines(r, "checkpoint.async_save")
    for key in ("every_steps", "every_minutes", "keep_every"):
        if getattr(c, key) < 0 or not math.isfinite(getattr(c, key)):
            p.append(f"checkpoint.{key}: must be 0 (off) or more, got {getattr(c, key)}")
    if c.keep_last < 1:
        p.append(f"checkpoint.keep_last: must be at least 1, got {c.keep_last}")
    return p


def missing_path_hint(path: str) -> str:
    """Where a missing relative data path was looked for: the working directory, which the
    shipped recipes expect to be the repository root (``make`` fetches their data there)."""
    if Path(path).expanduser().is_absolute():
        return ""
    return (f" (relative paths are read from the working directory, {Path.cwd()}; the shipped recipes expect "
            f"the repository root, where `make demo` fetches data/shakespeare and `make finetune-data` the rest)")


def _check_task(r: Recipe) -> list[str]:
    """Fine-tuning: the model type serves the task, the metric exists, LoRA and freezing fit."""
    p: list[str] = []
    task, m, ev, d = r.task, r.model, r.eval, r.data
    metrics = TASK_METRICS[task]
    if ev.metric not in metrics:
        p.append(f"eval.metric: {ev.metric!r} is not a {task} metric; choose one of {', '.join(metrics)}")
    if ev.patience < 0 or ev.min_delta < 0:
        p.append(f"eval: patience and min_delta must not be negative (patience={ev.patience}, "
                 f"min_delta={ev.min_delta})")
    if ev.patience > 0 and r.train.eval_every == 0:
        p.append(f"eval.patience: early stopping needs periodic evaluation; set train.eval_every "
                 f"(e.g. train.eval_every={max(1, r.train.max_steps // 10)})")
    if r.train.epochs < 0:
        p.append(f"train.epochs: must be 0 (use train.max_steps) or more, got {r.train.epochs}")
    if not 0 <= d.test_fraction < 1 or d.val_fraction + d.test_fraction >= 1:
        p.append(f"data.test_fraction: must be in [0, 1) and leave training data: val_fraction + "
                 f"test_fraction = {d.val_fraction} + {d.test_fraction}; lower them")
    if task != "causal_lm" and d.tokenizer.train is not None:
        p.append(f"data.tokenizer.train: task {task} fine-tunes with the model's own tokenizer; remove "
                 f"data.tokenizer.train and set model.pretrained or data.tokenizer.path")
    if m.freeze_layers < 0:
        p.append(f"model.freeze_layers: must be 0 or more, got {m.freeze_layers}")
    if m.lora is not None:
        lora = m.lora
        p += _engine_lines(r, "model.lora")
        if lora.r < 1 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
            p.append(f"model.lora: need r >= 1, alpha > 0 and dropout in [0, 1) (got r={lora.r}, "
                     f"alpha={lora.alpha}, dropout={lora.dropout})")
        if importlib.util.find_spec("peft") is None:  # found, not imported: importing peft costs seconds
            p.append("model.lora: the peft package is not installed; pip install 'shardforge[peft]'")
    return p
