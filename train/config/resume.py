"""What a resume may not change: the settings a run's checkpoints were trained with, checked by the
launcher against the run directory's ``recipe.yaml`` before it rewrites it (the ranks check the
data through the next batch's fingerprint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from train.config.recipe import Recipe
from train.engines import resumes_from


RESUME_KEYS = ("task", "run.seed", "model", "data.seq_len", "data.tokenizer", "train.global_batch_size")
"""Settings a run's checkpoints were trained with: a resume that changes one cannot continue them
(data sources are checked by the ranks, through the next batch's fingerprint)."""


RESUME_FREE = ("model.activation_checkpointing", "model.compile")
"""Settings under :data:`RESUME_KEYS` that change how a step computes, not what the checkpoints
hold: a resume may change them (auto-fit may, on another world size)."""


def value_at(tree: object, key: str) -> Any:
    """``tree["a"]["b"]`` for ``key`` "a.b" in plain YAML data, or ``None`` where a step is missing."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_resumable(recipe: Recipe, run_dir: Path) -> list[str]:
    """Problems (one line each) that would make the ranks refuse to resume ``run_dir`` with ``recipe``:
    found here, before ``recipe.yaml`` is rewritten, so a refused launch leaves the run as it was."""
    import dataclasses

    import yaml

    from train.checkpoint.files import committed_checkpoints

    old_file = run_dir / "recipe.yaml"
    if recipe.checkpoint.resume != "auto" or not old_file.exists() or not committed_checkpoints(run_dir / "checkpoints"):
        return []
    try:
        old = yaml.safe_load(old_file.read_text()) or {}
    except yaml.YAMLError:
        return []  # the ranks' own checks still apply
    if not isinstance(old, dict):
        return [f"{old_file}: holds a YAML {type(old).__name__}, not the recipe its checkpoints were trained with; "
                f"restore it to resume, or start over with checkpoint.resume=never or another run.dir"]
    new = dataclasses.asdict(recipe)

    def leaves(tree, prefix: str) -> dict:  # {"model.config.hidden_size": 64, ...}
        if not isinstance(tree, dict) or not tree:
            return {prefix: tree}
        return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}.{key}").items()}

    problems = []
    for key in RESUME_KEYS:
        if value_at(old, key) is None:
            continue  # an older run directory without it: the ranks' checks still apply
        was, now = leaves(value_at(old, key), key), leaves(value_at(new, key), key)
        # a setting newer than the run directory is skipped; the model's own config is compared whole
        for name in sorted(set(was) | {n for n in now if n.startswith("model.config.")}):
            if was.get(name) != now.get(name) and name not in RESUME_FREE:
                problems.append(f"{name}: {now.get(name)!r} here but {was.get(name)!r} in {old_file}, which its "
                                f"checkpoints were trained with; restore it to resume, or start over with "
                                f"checkpoint.resume=never or another run.dir")
    saved = value_at(old, "parallel.engine")
    if isinstance(saved, str) and (why := resumes_from(saved, recipe.parallel.engine)) is not None:
        problems.append(f"parallel.engine: {recipe.parallel.engine!r} here, but the checkpoints in {run_dir} were "
                        f"written by {saved!r} ({why}); resume with parallel.engine={saved}, or start over "
                        f"with checkpoint.resume=never or another run.dir")
    return problems
