"""Prepare a recipe's data once (tokenizer, then packed or task samples, cached); the ranks and
``shardforge prepare`` call :func:`prepare_data`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from train.data.cache import PreparedData
from train.data.finetuning import prepare_task_data
from train.data.pretraining import prepare_packed
from train.data.scratch import scratch_in
from train.data.sources import DataError
from train.data.tokenizer import load_or_train_tokenizer
from train.config.recipe import Recipe


def prepare_data(recipe: Recipe) -> PreparedData:
    """The recipe's prepared splits: tokenized and cached on the first call, loaded afterwards.
    ``datasets``' own cache and every temporary file stay in a scratch folder of ``data.cache_dir``,
    removed before this returns."""
    root = Path(recipe.data.cache_dir).expanduser()
    with scratch_in(root):
        tokenizer = load_or_train_tokenizer(recipe, root)
        if recipe.task == "causal_lm":
            data = prepare_packed(recipe, tokenizer)
            assert data is not None  # only a task's share (prepare_share) is left unjoined
            return data
        return prepare_task_data(recipe, tokenizer)


def prepare_share(recipe: Recipe, task: int, tasks: int) -> Optional[PreparedData]:
    """Task ``task`` of ``tasks`` (a Slurm array's): tokenize this task's share of the pre-training
    files into the cache entry's shards, and join them when it is the last to finish (see
    :mod:`train.data.shards`); the prepared data once joined, else ``None``."""
    if recipe.task != "causal_lm":
        raise DataError(f"prepare: --tasks splits pre-training data (task: causal_lm) only; prepare "
                        f"task: {recipe.task} data with one `shardforge prepare`")
    root = Path(recipe.data.cache_dir).expanduser()
    with scratch_in(root):
        tokenizer = load_or_train_tokenizer(recipe, root)
        return prepare_packed(recipe, tokenizer, share=(task, tasks))
