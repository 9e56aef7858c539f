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

from train.checkpoint_files import MANIFEST, committed_checkpoints, latest_valid, step_dir_name, verify


class ExportError(ValueError):
    """A one-line problem with the run directory, the checkpoint or the output path."""


def pick_checkpoint(run_dir: Path, step: Optional[int]) -> Path:
    """The verified checkpoint of ``step``; else the best one (``checkpoints/best.json``, kept by
    fine-tuning runs) when it verifies; else the latest verified one."""
    from train.rundir import BEST_FILE

    root = run_dir / "checkpoints"
    if step is None and (root / BEST_FILE).exists():
        best = root / json.loads((root / BEST_FILE).read_text())["checkpoint"]
        if verify(best) is None:
            return best
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
    from train.engines import capabilities
    from train.safe_load import forbid_code_in_checkpoints, safe_reader

    engine = json.loads((ckpt / MANIFEST).read_text())["engine"]
    deepspeed = capabilities(engine).checkpoint_format == "deepspeed"
    forbid_code_in_checkpoints(deepspeed=deepspeed)  # DeepSpeed's loader passes weights_only=False
    if deepspeed:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="state")
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    dcp.load(state, storage_reader=safe_reader(ckpt / "dcp"))  # no process group: a single-process load
    return state["model"]


def build_export_model(recipe, run_dir: Path, tokenizer) -> torch.nn.Module:
    """The recipe's model on CPU, randomly initialised (LoRA adapters included), ready for a state
    dict; it carries the run tokenizer's special ids, as in training, and generates with its pad id."""
    from train.rundir import LABELS_FILE
    from train.model import add_lora, auto_model_class, build_config, token_ids

    labels_file = run_dir / LABELS_FILE
    labels = json.loads(labels_file.read_text()) if labels_file.exists() else None
    config = build_config(recipe.model, len(tokenizer), labels, token_ids(tokenizer))
    config.use_cache = True
    model = auto_model_class(recipe.task).from_config(config)  # on CPU: non-persistent buffers need real init
    generation = getattr(model, "generation_config", None)  # generative models only
    if not recipe.model.pretrained and generation is not None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    if recipe.model.lora is not None:
        model = add_lora(model, recipe.model.lora, recipe.task)
    return model


def export(run_dir: Path, out_dir: Path, step: Optional[int] = None, log=print,
           lora_export: Optional[str] = None) -> Path:
    """Write ``out_dir`` as a ``from_pretrained``-loadable model with the run's tokenizer.

    With LoRA, ``lora_export`` (default: the recipe's ``model.lora.export``) picks ``merged`` (a
    plain model with the adapters folded in) or ``adapter`` (peft's adapter files alone, for
    ``PeftModel.from_pretrained`` on top of ``model.pretrained``).
    """
    from transformers import AutoTokenizer

    from launch.recipe import RecipeError
    from train.rundir import read_recipe
    from train.safe_load import refusing_code

    if not (run_dir / "recipe.yaml").exists():
        raise ExportError(f"{run_dir}: not a run directory (no recipe.yaml); pass runs/<name>")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: exists and is not empty; choose a new output directory")
    try:
        recipe = read_recipe(run_dir)
    except ValueError as err:
        raise RecipeError(str(run_dir / "recipe.yaml"), [str(err)]) from None
    ckpt = pick_checkpoint(run_dir, step)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    model = build_export_model(recipe, run_dir, tokenizer)
    with refusing_code(ckpt, ExportError):
        state = full_state_dict(ckpt, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if model.config.tie_word_embeddings and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ExportError(f"{ckpt}: weights do not match the recipe's model "
                          f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    mode = None
    if recipe.model.lora is not None:
        mode = lora_export or recipe.model.lora.export
        if mode == "merged":
            model = model.merge_and_unload()
        else:
            model.peft_config["default"].base_model_name_or_path = recipe.model.pretrained
    out_dir = out_dir.resolve()
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "shardforge_export.json").write_text(json.dumps(
        {"run_dir": str(run_dir.resolve()), "checkpoint": ckpt.name, "task": recipe.task, "lora": mode,
         "engine": json.loads((ckpt / MANIFEST).read_text())["engine"]}, indent=1))
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    os.replace(tmp, out_dir)
    log(f"shardforge: exported {ckpt} → {out_dir}")
    return out_dir
