"""The recipe checks that need transformers: the model's config, its positions, its task heads and
its layers. ``shardforge plan``, ``prepare`` and ``submit`` run them in the launcher; ``shardforge
run`` leaves them to the ranks, which import transformers anyway, so a local launch starts the
ranks without the seconds that importing transformers (and with it torch) costs the launcher.
Every rank runs them before it prepares data; a problem ends the launch with exit 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from train.data.files import local_files
from train.engines.memory_plan import ModelSizes, Setup, fit_problem
from train.config.recipe import Recipe, grad_accum_steps, micro_batch, offloaded, world_size


def declared_sizes(recipe: Recipe) -> dict[str, int]:
    """The model's positions and layers where the recipe or the pretrained ``config.json`` states
    them, read without transformers (the launcher of ``shardforge run`` checks these; sizes left to
    a model type's defaults are checked by the ranks)."""
    import json

    m = recipe.model
    cfg = dict(m.config or {})
    if m.pretrained and (Path(m.pretrained) / "config.json").is_file():
        try:
            cfg = json.loads((Path(m.pretrained) / "config.json").read_text())
        except (OSError, ValueError):
            cfg = {}
    sizes = {"positions": cfg.get("max_position_embeddings") or cfg.get("n_positions"),
             "layers": cfg.get("num_hidden_layers") or cfg.get("n_layer")}
    return {k: v for k, v in sizes.items() if isinstance(v, int) and not isinstance(v, bool)}


def size_problems(recipe: Recipe, positions: Optional[int] = None, layers: Optional[int] = None) -> list[str]:
    """``data.seq_len`` within the model's positions, ``model.freeze_layers`` within its layers."""
    p = []
    if positions and recipe.data.seq_len > positions:
        p.append(f"data.seq_len: {recipe.data.seq_len} is longer than the model's {positions} positions; "
                 f"set data.seq_len={positions} or raise max_position_embeddings")
    if layers is not None and recipe.model.freeze_layers > layers:
        p.append(f"model.freeze_layers: {recipe.model.freeze_layers} is not between 0 and the model's {layers} layers")
    return p


FLASH_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"),
                  "flash_attention_3": ("flash_attn_interface", "FlashAttention-3 (flash_attn_interface)")}
"""``model.attn_implementation`` → (the module transformers imports for it, what to install)."""


def attention_problems(recipe: Recipe) -> list[str]:
    """FlashAttention needs its package where the ranks run (else transformers fails only when the
    model is built, after data preparation) and computes in bf16 or fp16 only."""
    import importlib.util

    impl = recipe.model.attn_implementation
    if impl not in FLASH_PACKAGES:
        return []
    module, package = FLASH_PACKAGES[impl]
    p = []
    if importlib.util.find_spec(module) is None:
        p.append(f"model.attn_implementation: {impl} needs {package}, which this Python cannot import; install "
                 f"it where the ranks run, or set model.attn_implementation=sdpa")
    if recipe.parallel.precision == "fp32":
        p.append(f"model.attn_implementation: {impl} computes in bf16 or fp16 only; set parallel.precision=bf16 "
                 f"or model.attn_implementation=sdpa")
    return p


def model_problems(recipe: Recipe) -> list[str]:
    """One line per problem of the model the recipe names, read through transformers."""
    m = recipe.model
    if (m.pretrained is None) == (m.config is None):
        return attention_problems(recipe)  # the recipe check reports the rest; there is no model to read
    if m.config is not None:
        config, problem = inline_config(m.config)
    else:
        assert m.pretrained is not None  # exactly one of the two is set (returned above otherwise)
        config, problem = pretrained_config(m.pretrained)
    if problem:
        return [problem, *attention_problems(recipe)]
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    p = size_problems(recipe, limit, getattr(config, "num_hidden_layers", None))
    task = recipe.task
    if task in ("sequence_classification", "token_classification") and \
            config.model_type not in task_model_classes(task):
        p.append(f"task: transformers has no {task} head for model type {config.model_type!r}; "
                 f"pick a model that has one (bert, roberta, llama, ...)")
    return p + attention_problems(recipe)


def inline_config(cfg: dict) -> tuple[Any, Optional[str]]:
    """(transformers config, None) for ``model.config``, or (None, what is wrong)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = cfg.get("model_type")
    if model_type is None:
        return None, "model.config.model_type: missing; name a transformers model type such as llama or gpt2"
    if model_type not in CONFIG_MAPPING_NAMES:
        import difflib

        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING_NAMES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return None, f"model.config.model_type: {model_type!r} is not a transformers model type{hint}"
    try:
        return AutoConfig.for_model(**cfg), None
    except Exception as err:  # transformers raises TypeError, ValueError and huggingface_hub validation errors
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300]
        return None, f"model.config: transformers rejected it: {text}"


def pretrained_config(name: str) -> tuple[Any, Optional[str]]:
    """(transformers config, None) for ``model.pretrained``, or (None, what is wrong)."""
    from transformers import AutoConfig

    if local_files(name) == [] or (name.startswith((".", "/", "~")) and not Path(name).exists()):
        return None, f"model.pretrained: no such directory {name!r}; fix the path"
    try:
        return AutoConfig.from_pretrained(name), None
    except Exception as err:  # hub/network/parse errors all mean the same to the user
        return None, f"model.pretrained: cannot read a config from {name!r}: {str(err).splitlines()[0][:160]}"


def task_model_classes(task: str) -> dict[str, str]:
    """model_type → the transformers class name that serves ``task``."""
    from transformers.models.auto import modeling_auto

    from train.tasks import TASKS

    return getattr(modeling_auto, TASKS[task].mapping)


def shard_block_names(recipe: Recipe) -> list[str]:
    """The classes FSDP shards one by one for this recipe's model (``fsdp.json``'s
    ``shard_modules: null``, resolved as each rank does: see ``train.model.shard_units``)."""
    import torch

    from train.model import auto_model_class, build_config, shard_units

    with torch.device("meta"):  # no weights: only the module tree
        model = auto_model_class(recipe.task).from_config(build_config(recipe.model, 1024))
    return sorted({type(unit).__name__ for unit in shard_units(model)})


def model_sizes(recipe: Recipe) -> ModelSizes:
    """Count the recipe's model on the meta device (no weights), as the ranks will build it
    (frozen layers and LoRA included). The vocabulary is the config's, else the size of the
    tokenizer the recipe trains, else 32000; a classification head is counted with 2 labels."""
    import torch

    from train.model import build_model, param_numel, shard_units

    m = recipe.model
    tok = recipe.data.tokenizer.train
    vocab = (m.config or {}).get("vocab_size") or (tok.vocab_size if tok else 32000)
    labels = ["A", "B"] if recipe.task in ("sequence_classification", "token_classification") else None
    # A transformers model (peft's wrapper with LoRA): its config and embeddings are read through their API.
    model: Any = build_model(m, vocab, 0, recipe.task, labels, empty_init=torch.device("meta"))
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(param_numel(p) for p in unique)
    blocks = shard_units(model)
    block = max((sum(param_numel(p) for p in b.parameters()) for b in blocks), default=0)
    cfg = model.config
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied = 0 if head is not None and head.weight is embedding.weight else param_numel(embedding.weight)
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    dropout = max(float(getattr(cfg, name, 0) or 0) for name in ("attention_dropout", "attn_pdrop",
                                                                   "attention_probs_dropout_prob"))
    return ModelSizes(
        params=total, trainable=sum(param_numel(p) for p in unique if p.requires_grad),
        largest_layer=max(sum(param_numel(p) for p in mod.parameters(recurse=False)) for mod in model.modules()),
        block=block, root=total - block * len(blocks), layers=cfg.num_hidden_layers, hidden=hidden,
        intermediate=getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden,
        heads=cfg.num_attention_heads, vocab=cfg.vocab_size, untied_embedding=untied,
        keeps_attention_probs=m.attn_implementation == "eager" or dropout > 0)


def planned_setup(recipe: Recipe) -> Setup:
    """The recipe's engine, precision and batch shape, as the memory plan sees them."""
    p = recipe.parallel
    return Setup(engine=p.engine, precision=p.precision, offload=offloaded(recipe),
                 activation_checkpointing=recipe.model.activation_checkpointing,
                 micro_batch=micro_batch(recipe), seq_len=recipe.data.seq_len,
                 world_size=world_size(recipe), gpus_per_node=p.nproc or 1, accumulation=grad_accum_steps(recipe),
                 reduce_bucket_mb=p.reduce_bucket_mb, reduce_dtype=p.reduce_dtype)


def plan_gpu_bytes(recipe: Recipe, detect: Optional[Callable[[], Optional[float]]] = None) -> Optional[float]:
    """The GPU memory a plan must fit: ``parallel.gpu_mem_gb`` when the recipe states it, else what
    ``detect`` finds (``shardforge plan``/``run``: this machine's GPUs through NVML; a rank: its own
    GPU through torch); ``submit`` passes none, since a login node cannot see the cluster's GPUs."""
    if recipe.parallel.gpu_mem_gb:
        return recipe.parallel.gpu_mem_gb * 1e9
    return detect() if detect is not None else None


def memory_problems(recipe: Recipe, gpu_bytes: Optional[float]) -> list[str]:
    """One line when the recipe's plan cannot fit GPUs of ``gpu_bytes`` (nothing when unknown)."""
    if not gpu_bytes or (recipe.model.pretrained is None) == (recipe.model.config is None):
        return []
    problem = fit_problem(model_sizes(recipe), planned_setup(recipe), gpu_bytes)
    return [problem] if problem else []
