"""Prepare a recipe's data once (tokenizer, then packed or task samples, cached); the ranks and
``shardforge prepare`` call :func:`prepare_data`."""

from __future__ import annotations

from pathlib import Path

from train.data.cache import PreparedData
from train.data.finetuning import prepare_task_data
from train.data.pretraining import prepare_packed
from train.data.tokenizer import load_or_train_tokenizer
from train.recipe import Recipe


def prepare_data(recipe: Recipe, log=print) -> PreparedData:
    """The recipe's prepared splits: tokenized and cached on the first call, loaded afterwards."""
    tokenizer = load_or_train_tokenizer(recipe, Path(recipe.data.cache_dir).expanduser())
    if recipe.task == "causal_lm":
        return prepare_packed(recipe, tokenizer, log=log)
    return prepare_task_data(recipe, tokenizer, log=log)
