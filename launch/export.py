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
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch

from launch.ownership import export_dir_problems
from train.checkpoint.files import MANIFEST, committed_checkpoints, links_note, newest_valid, step_dir_name, verify

logger = logging.getLogger("shardforge")


class ExportError(ValueError):
    """A one-line problem with the run directory, the checkpoint or the output path."""


def pick_checkpoint(run_dir: Path, step: Optional[int]) -> Path:
    """The verified checkpoint of ``step``; else the best one (``checkpoints/best.json``, kept by
    fine-tuning runs) when it verifies; else the latest verified one."""
    from train.rundir import BEST_FILE

    root = run_dir / "checkpoints"
    if (note := links_note(root)) is not None:
        logger.warning(note)
    if step is None and (root / BEST_FILE).exists():
        best = root / json.loads((root / BEST_FILE).read_text())["checkpoint"]
        if best in committed_checkpoints(root) and verify(best) is None:
            return best
    if step is None:
        ckpt, problems = newest_valid(committed_checkpoints(root), verify)
        if ckpt is None and problems:
            raise ExportError(f"none of the {len(problems)} committed checkpoints in {root} verifies (newest: "
                              f"{problems[0]}); restore them from a copy")
        if ckpt is None:
            raise ExportError(f"{root}: no committed checkpoint to export; train with "
                              f"checkpoint.at_end=true or checkpoint.every_steps>0")
        return ckpt
    ckpt = root / step_dir_name(step)
    problem = f"{ckpt} is a symbolic link; export reads no checkpoint through a link" if ckpt.is_symlink() \
        else verify(ckpt)
    if problem:
        have = [p.name for p in committed_checkpoints(root)]
        raise ExportError(f"--step {step}: {problem}; committed checkpoints: {', '.join(have) or 'none'}")
    return ckpt


def full_state_dict(ckpt: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded fp32 model state saved in ``ckpt`` by any engine. A checkpoint that holds only
    the trainable parameters (its manifest names the ``frozen_base`` digest) takes the frozen rest
    from ``model``, which :func:`build_export_model` built with the real base weights."""
    from train.engines import capabilities
    from train.checkpoint.safe_load import forbid_code_in_checkpoints, safe_reader

    manifest = json.loads((ckpt / MANIFEST).read_text())
    deepspeed = capabilities(manifest["engine"]).checkpoint_format == "deepspeed"
    forbid_code_in_checkpoints(deepspeed=deepspeed)  # DeepSpeed's loader passes weights_only=False
    if deepspeed:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="state")
    import torch.distributed.checkpoint as dcp

    own = model.state_dict()
    wanted = own
    if manifest.get("frozen_base"):
        saved = {key.removeprefix("model.") for key in safe_reader(ckpt / "dcp").read_metadata().state_dict_metadata}
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        absent = sorted(set(own) - saved - frozen)
        if absent:
            raise ExportError(f"{ckpt}: holds trainable parameters only, but not {absent[:3]} of the recipe's model")
        wanted = {k: v for k, v in own.items() if k in saved}
    state = {"model": {k: v.detach().clone() for k, v in wanted.items()}}
    dcp.load(state, storage_reader=safe_reader(ckpt / "dcp"))  # no process group: a single-process load
    return {**own, **state["model"]}


def _labels(run_dir: Path) -> Optional[list[str]]:
    from train.rundir import LABELS_FILE

    path = run_dir / LABELS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def build_export_model(recipe, run_dir: Path, tokenizer, frozen_base: Optional[str] = None) -> torch.nn.Module:
    """The recipe's model on CPU (LoRA adapters included), ready for a state dict; it carries the run
    tokenizer's special ids, as in training, and generates with its pad id.

    Randomly initialised, unless the checkpoint holds only the trainable parameters (``frozen_base``,
    its manifest's digest of the frozen ones): then it is built as training built it (the weights of
    ``model.pretrained``, or the seed), and its frozen weights must have that digest."""
    import dataclasses

    from train.model import add_lora, auto_model_class, build_config, build_model, frozen_digest, token_ids

    labels = _labels(run_dir)
    if frozen_base is not None:
        as_trained = dataclasses.replace(recipe.model, activation_checkpointing=False, compile=False)
        # A transformers model (peft's wrapper with LoRA), used through their API.
        model: Any = build_model(as_trained, len(tokenizer), recipe.run.seed, recipe.task, labels,
                                 special_ids=token_ids(tokenizer))
        if frozen_digest(model) != frozen_base:
            raise ExportError(f"{run_dir}: its checkpoint holds only the trainable parameters, and the frozen ones "
                              f"built from model.pretrained {recipe.model.pretrained!r} differ from those it was "
                              f"trained with; export where that model (unchanged) is at that path")
        model.eval()
        model.config.use_cache = True
    else:
        config = build_config(recipe.model, len(tokenizer), labels, token_ids(tokenizer))
        config.use_cache = True
        model = auto_model_class(recipe.task).from_config(config)  # on CPU: non-persistent buffers need real init
        if recipe.model.lora is not None:
            model = add_lora(model, recipe.model.lora, recipe.task)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    generation = getattr(base, "generation_config", None)  # generative models only
    if not recipe.model.pretrained and generation is not None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    return model


def base_model_reference(pretrained: Optional[str]) -> Optional[str]:
    """``model.pretrained`` as an adapter's ``base_model_name_or_path``: absolute when it is a local
    path (the adapter then loads from anywhere), as given for a hub name."""
    if pretrained is None or not Path(pretrained).expanduser().exists():
        return pretrained
    return str(Path(pretrained).expanduser().resolve())


def label_config(labels: Optional[list[str]]) -> Optional[dict]:
    """``num_labels``, ``id2label`` and ``label2id`` of a classifier run: the keyword arguments its
    base model is loaded with before ``PeftModel.from_pretrained`` adds the adapter and trained head."""
    if not labels:
        return None
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def export(run_dir: Path, out_dir: Path, step: Optional[int] = None,
           lora_export: Optional[str] = None) -> Path:
    """Write ``out_dir`` as a ``from_pretrained``-loadable model with the run's tokenizer.

    With LoRA, ``lora_export`` (default: the recipe's ``model.lora.export``) picks ``merged`` (a
    plain model with the adapters folded in) or ``adapter`` (peft's adapter files alone, for
    ``PeftModel.from_pretrained`` on top of ``model.pretrained``).
    """
    from transformers import AutoTokenizer

    from train.config.loading import RecipeError
    from train.config.loading import read_recipe
    from train.checkpoint.safe_load import refusing_code

    if not (run_dir / "recipe.yaml").exists():
        raise ExportError(f"{run_dir}: not a run directory (no recipe.yaml); pass runs/<name>")
    if problems := export_dir_problems(out_dir):
        raise ExportError(problems[0])
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: exists and is not empty; choose a new output directory")
    try:
        recipe = read_recipe(run_dir)
    except ValueError as err:
        raise RecipeError(str(run_dir / "recipe.yaml"), [str(err)]) from None
    ckpt = pick_checkpoint(run_dir, step)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    model: Any = build_export_model(recipe, run_dir, tokenizer, manifest.get("frozen_base"))  # used through HF's API
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
            model.peft_config["default"].base_model_name_or_path = base_model_reference(recipe.model.pretrained)
    out_dir = out_dir.resolve()
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}")  # two exports at once never share it
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "shardforge_export.json").write_text(json.dumps(
            {"run_dir": str(run_dir.resolve()), "checkpoint": ckpt.name, "task": recipe.task, "lora": mode,
             "engine": manifest["engine"],
             **({"base_model": base_model_reference(recipe.model.pretrained),
                 "label_config": label_config(_labels(run_dir))} if mode == "adapter" else {})}, indent=1))
        if out_dir.exists():  # empty when checked, or written meanwhile by another export of it: the last one wins
            old = out_dir.with_name(f".old-{out_dir.name}-{uuid.uuid4().hex[:8]}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"shardforge: exported {ckpt} → {out_dir}")
    return out_dir
