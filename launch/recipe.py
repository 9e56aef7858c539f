"""Load a YAML recipe, apply dotted ``key=value`` overrides, check it, and resolve it.

Every problem is collected and reported together in one :class:`RecipeError`
(the CLI exits 2 with it); nothing is written before the recipe is known good.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from train.engines import capabilities, engines_that
from train.model_checks import declared_sizes, model_problems, size_problems
from train.data.files import local_files as _local_files, path_problem
from train.recipe import TASK_METRICS, Recipe, recipe_from_dict, resolve_defaults
from train.schema import RecipeProblems

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class RecipeError(ValueError):
    """Bad user input; ``str()`` is the whole message, one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        if len(problems) == 1:
            text = f"{source}: {problems[0]}"
        else:
            text = f"{source}: {len(problems)} problems\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text)


class StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML silently keeps the
    last: a second ``train:`` section would replace the first) and aliases that expand beyond
    :attr:`MAX_NODES` nodes (an alias bomb)."""

    MAX_NODES = 100_000

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def size(n) -> int:  # an alias is the anchored node itself: count it once per use
            if id(n) not in sizes:
                sizes[id(n)] = self.MAX_NODES + 1  # meanwhile: a structure that contains itself is refused
                children = n.value if isinstance(n, yaml.SequenceNode) else \
                    [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else []
                sizes[id(n)] = 1 + sum(size(c) for c in children)
            return sizes[id(n)]

        if node is not None and size(node) > self.MAX_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"it expands to more than {self.MAX_NODES:,} values through aliases", node.start_mark)
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<" and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (the second would silently replace the first)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def find_recipe(name: str) -> Path:
    """A path, or the name of a shipped recipe in ``configs/`` (``tiny-cpu``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise RecipeError(name, [f"no such recipe file; give a path or a shipped recipe ({names})"])


def parse_overrides(overrides: list[str]) -> tuple[list[tuple[list[str], Any]], list[str]]:
    """``a.b=1`` → ([(["a", "b"], 1)], problems); values are parsed as YAML scalars."""
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected dotted key=value, e.g. train.max_steps=50")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed, problems


def apply_override(data: dict, path: list[str], value: Any) -> Optional[str]:
    """Set ``data[path] = value`` in place (list items by index); a problem line or ``None``."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        key = ".".join(path[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"{key}: no list item {part} (the list has {len(node)})"
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            return f"{key}: is not a mapping, cannot set {'.'.join(path)}"
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            return f"{'.'.join(path)}: no list item {last} (the list has {len(node)})"
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        return f"{'.'.join(path[:-1])}: is not a mapping, cannot set {'.'.join(path)}"
    return None


REPLACES = {("data", "tokenizer", "path"): ("data", "tokenizer", "train"),
            ("data", "tokenizer", "train"): ("data", "tokenizer", "path"),
            ("model", "pretrained"): ("model", "config"),
            ("model", "config"): ("model", "pretrained")}
"""Keys that exclude each other: a command-line override that sets the first drops the second from
the recipe file (``tiny-cpu data.tokenizer.path=...`` loads that tokenizer instead of training one;
``model.pretrained=...`` replaces the inline ``model.config``).
A recipe file that sets both is refused (:func:`check_recipe`)."""


def drop_replaced(data: dict, parsed: list[tuple[list[str], Any]]) -> None:
    """Remove from ``data`` (the recipe file, in place) each key of :data:`REPLACES` that an override
    replaces, unless the overrides set it as well (then the recipe is refused as setting both)."""
    def overridden(key: tuple[str, ...], set_only: bool) -> bool:
        return any(tuple(keys[: len(key)]) == key and not (set_only and value is None) for keys, value in parsed)

    for key, other in REPLACES.items():
        if overridden(key, set_only=True) and not overridden(other, set_only=False):
            node: Any = data
            for part in other[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(other[-1], None)


def load_recipe(name: str, overrides: list[str] = (), local_gpus: Optional[int] = None,
                for_slurm: bool = False, check_model: bool = True) -> Recipe:
    """Read, override, check and resolve a recipe; raise :class:`RecipeError` with every problem.

    ``parallel.nproc`` left unset becomes the local GPU count, or ``slurm.gpus_per_node`` for a
    Slurm job (whose nodes are not this one). ``check_model=False`` leaves out the checks that
    import transformers (``train.model_checks``): the ranks run them.
    """
    path = find_recipe(name)
    try:
        text = path.read_text()
    except OSError as err:
        raise RecipeError(str(path), [f"cannot read the recipe: {err.strerror}; check the path"]) from None
    try:
        data = yaml.load(text, Loader=StrictLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(str(path), [f"not valid YAML{where}: {getattr(err, 'problem', err)}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), ["the top level must be a mapping of sections (run, model, ...)"])
    data = copy.deepcopy(data)
    parsed, problems = parse_overrides(list(overrides))
    drop_replaced(data, parsed)
    for keys, value in parsed:
        problem = apply_override(data, keys, value)
        if problem:
            problems.append(problem)
    try:
        recipe = recipe_from_dict(data)
    except RecipeProblems as err:
        raise RecipeError(str(path), problems + err.problems) from None
    if for_slurm:
        local_gpus = None
    resolve_defaults(recipe, nproc=recipe.slurm.gpus_per_node if for_slurm else local_gpus)
    problems += check_recipe(recipe, local_gpus, check_model)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


def _divisors_near(n: int, unit: int) -> str:
    lower = (n // unit) * unit
    options = [v for v in (lower, lower + unit) if v > 0]
    return " or ".join(str(v) for v in options)


def check_recipe(r: Recipe, local_gpus: Optional[int], check_model: bool = True) -> list[str]:
    """Cross-field checks: batch arithmetic, sizes, paths, engine choices. One line per problem."""
    p: list[str] = []
    t, par = r.train, r.parallel
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
    elif t.micro_batch_size >= 1 and t.global_batch_size >= 1:
        world = par.nproc * par.nodes
        unit = t.micro_batch_size * world
        if t.global_batch_size % unit:
            p.append(f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                     f"micro_batch_size × world size = {t.micro_batch_size} × {world} "
                     f"({par.nproc} per node × {par.nodes} nodes) = {unit}; set "
                     f"train.global_batch_size={_divisors_near(t.global_batch_size, unit)} "
                     f"or change train.micro_batch_size")
    if local_gpus and par.nodes == 1 and par.nproc > local_gpus:
        p.append(f"parallel.nproc: {par.nproc} processes but this node has {local_gpus} GPUs; "
                 f"set parallel.nproc={local_gpus}")
    caps = capabilities(par.engine)
    if t.on_nonfinite == "skip" and not caps.skip_nonfinite:
        p.append(f"train.on_nonfinite: skip needs parallel.engine {' or '.join(engines_that(skip_nonfinite=True))} "
                 f"(DeepSpeed applies its step before the gradient norm is known); set train.on_nonfinite=stop")
    if r.run.seed < 0:
        p.append(f"run.seed: must be 0 or more (numpy takes unsigned seeds), got {r.run.seed}")
    if t.step_timeout_s < 0:
        p.append(f"train.step_timeout_s: must be 0 (off) or more, got {t.step_timeout_s}")
    if par.gpu_mem_gb is not None and par.gpu_mem_gb <= 0:
        p.append(f"parallel.gpu_mem_gb: must be more than 0 (one GPU's memory in GB, e.g. 80), got {par.gpu_mem_gb}")
    if par.offload and not caps.offload:
        p.append("parallel.offload: DDP keeps every replica on the device; use parallel.engine=zero2, "
                 "zero3 or fsdp to offload, or set parallel.offload=false")
    m = r.model
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
        elif (problem := path_problem(where, src.path, src.split)) is not None:
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
    if d.num_workers < 0 or d.num_proc < 1:
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
    if c.async_save and not capabilities(r.parallel.engine).async_save:
        p.append(f"checkpoint.async_save: needs parallel.engine {' or '.join(engines_that(async_save=True))} "
                 f"(DeepSpeed saves synchronously); set checkpoint.async_save=false")
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
        if not capabilities(r.parallel.engine).lora:
            p.append(f"model.lora: supported (and tested) with parallel.engine "
                     f"{' or '.join(engines_that(lora=True))}, not {r.parallel.engine}; set parallel.engine=fsdp")
        if lora.r < 1 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
            p.append(f"model.lora: need r >= 1, alpha > 0 and dropout in [0, 1) (got r={lora.r}, "
                     f"alpha={lora.alpha}, dropout={lora.dropout})")
        if importlib.util.find_spec("peft") is None:  # found, not imported: importing peft costs seconds
            p.append("model.lora: the peft package is not installed; pip install 'shardforge[peft]'")
    return p


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)
