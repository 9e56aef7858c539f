"""Load a YAML recipe, apply dotted ``key=value`` overrides, check it, and resolve it.

Every problem is collected and reported together in one :class:`RecipeError`
(the CLI exits 2 with it); nothing is written before the recipe is known good.
"""

from __future__ import annotations

import copy
import os
import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from train.config.autofit import fit_recipe, node_memory, reopen_fitted
from train.engines.autofit import Fit
from train.config.model_checks import plan_gpu_bytes
from train.config.recipe import Recipe, auto_keys, recipe_from_dict, resolve_defaults
from train.config.checks import check_recipe
from train.config.typed import RecipeError
from train.rundir import RECIPE_FILE

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


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


def load_recipe(name: str, overrides: Sequence[str] = (), local_gpus: Optional[int] = None,
                for_slurm: bool = False, check_model: bool = True,
                gpu_bytes: Optional[Callable[[], Optional[float]]] = None) -> Recipe:
    """Read, override, check and resolve a recipe; raise :class:`RecipeError` with every problem.

    ``parallel.nproc`` left unset becomes the local GPU count, or ``slurm.gpus_per_node`` for a
    Slurm job (whose nodes are not this one). ``check_model=False`` leaves out the checks that
    import transformers (``train.config.model_checks``): the ranks run them (unless a setting is
    ``auto``: choosing it counts the model). ``gpu_bytes``: this machine's GPU memory, for
    ``auto`` when the recipe does not state ``parallel.gpu_mem_gb``.
    """
    return load_fitted_recipe(name, overrides, local_gpus, for_slurm, check_model, gpu_bytes)[0]


def load_fitted_recipe(name: str, overrides: Sequence[str] = (), local_gpus: Optional[int] = None,
                       for_slurm: bool = False, check_model: bool = True,
                       gpu_bytes: Optional[Callable[[], Optional[float]]] = None,
                       on_fit: Optional[Callable[[Fit], None]] = None) -> tuple[Recipe, Optional[Fit]]:
    """:func:`load_recipe`, and what auto-fit chose and rejected (``None`` when nothing was auto).
    ``on_fit`` sees the candidates auto-fit weighed before a refusal is raised (``plan`` prints them)."""
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
    except RecipeError as err:
        raise RecipeError(str(path), problems + err.problems) from None
    if for_slurm:
        local_gpus = None
    nproc = recipe.slurm.gpus_per_node if for_slurm else local_gpus
    reopen_fitted(recipe, {".".join(keys) for keys, _ in parsed})
    resolve_defaults(recipe, nproc=nproc)
    fit = None
    if auto_keys(recipe):
        fit, fit_problems = fit_recipe(recipe, plan_gpu_bytes(recipe, gpu_bytes), NO_GPU_HINT[for_slurm],
                                       host_bytes=node_memory(recipe, for_slurm))
        if fit is not None and on_fit is not None:
            on_fit(fit)
        problems += fit_problems
        resolve_defaults(recipe, nproc=nproc)  # what waited for the engine (train.on_nonfinite)
        check_model = True  # counting the model read it through transformers already
    problems += check_recipe(recipe, local_gpus, check_model)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe, fit


NO_GPU_HINT = {False: "this machine shows no GPU (NVML)",
               True: "a Slurm job's GPUs are not visible from where it is submitted"}
"""Why no GPU memory is known, for a local launch or plan (``False``) and for ``submit``."""


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)


def read_recipe(run_dir: Path, check: bool = False):
    """The resolved recipe the launcher wrote into ``run_dir`` (a :class:`train.config.recipe.Recipe`).
    ``check`` (the ranks): run the launcher's checks on it again (``train.config.checks``, less the
    local GPU count and what needs transformers, which the ranks check after, and the data sources'
    paths but on rank 0, the one that reads them) and raise
    :class:`train.config.typed.RecipeError` naming the file: a record edited after the launch is
    refused as the launcher would have refused it."""
    path = run_dir / RECIPE_FILE
    recipe = resolve_defaults(recipe_from_dict(yaml.load(path.read_text(), Loader=StrictLoader)))
    if check:
        problems = check_recipe(recipe, local_gpus=None, check_model=False,
                                data_paths=os.environ.get("RANK", "0") == "0")
        if problems:
            raise RecipeError(None, [f"{path}: {problem}" for problem in problems])
    return recipe
