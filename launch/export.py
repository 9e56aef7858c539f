"""``shardforge export RUN_DIR [--step N] OUT_DIR``: a checkpoint → a Hugging Face model directory.

Runs in one process with no process group and no GPU:

* DDP / FSDP2 checkpoints are sharded ``torch.distributed.checkpoint`` directories; DCP loads
  only the model entries into a plain CPU model, consolidating the shards of any world size.
* ZeRO 1/2/3 checkpoints go through DeepSpeed's ``zero_to_fp32`` (fp32 master weights,
  merged from every rank's partition).

The output (``model.safetensors``, ``config.json``, tokenizer files) is written to a temporary
sibling and renamed into place, so ``OUT_DIR`` is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from train.checkpoint import MANIFEST, committed_checkpoints, latest_valid, step_dir_name, verify


class ExportError(ValueError):
    """A one-line problem with the run directory, the checkpoint or the output path."""


def pick_checkpoint(run_dir: Path, step: Optional[int]) -> Path:
    """The verified checkpoint of ``step``, or the latest verified one."""
    root = run_dir / "checkpoints"
    if step is None:
        ckpt = latest_valid(root, warn=lambda msg: print(f"shardforge: {msg}"))
        if ckpt is None:
            raise ExportError(f"{root}: no committed checkpoint to export; train with "
                              f"checkpoint.at_end=true or checkpoint.every_steps>0")
        return ckpt
    ckpt = root / step_dir_name(step)
    problem = verify(ckpt)
    if problem:
        have = [p.name for p in committed_checkpoints(root)]
        raise ExportError(f"--step {step}: {problem}; committed checkpoints: {', '.join(have) or 'none'}")
    return ckpt


def full_state_dict(ckpt: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded fp32 model state saved in ``ckpt`` by any engine."""
    engine = json.loads((ckpt / MANIFEST).read_text())["engine"]
    if engine.startswith("zero"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="state")
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"))  # no process group: a single-process load
    return state["model"]


def export(run_dir: Path, out_dir: Path, step: Optional[int] = None, log=print) -> Path:
    """Write ``out_dir`` as a ``from_pretrained``-loadable model with the run's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launch.recipe import RecipeError
    from train.loop import read_recipe
    from train.model import build_config

    if not (run_dir / "recipe.yaml").exists():
        raise ExportError(f"{run_dir}: not a run directory (no recipe.yaml); pass runs/<name>")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: exists and is not empty; choose a new output directory")
    try:
        recipe = read_recipe(run_dir)
    except ValueError as err:
        raise RecipeError(f"{run_dir / 'recipe.yaml'}: {err}") from None
    ckpt = pick_checkpoint(run_dir, step)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    config = build_config(recipe.model, len(tokenizer))
    config.use_cache = True
    model = AutoModelForCausalLM.from_config(config)  # on CPU: non-persistent buffers need real init
    state = full_state_dict(ckpt, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if model.config.tie_word_embeddings and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ExportError(f"{ckpt}: weights do not match the recipe's model "
                          f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    out_dir = out_dir.resolve()
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "shardforge_export.json").write_text(json.dumps(
        {"run_dir": str(run_dir.resolve()), "checkpoint": ckpt.name, "engine":
         json.loads((ckpt / MANIFEST).read_text())["engine"]}, indent=1))
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    os.replace(tmp, out_dir)
    log(f"shardforge: exported {ckpt} → {out_dir}")
    return out_dir
