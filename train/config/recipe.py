"""The recipe schema: a tree of dataclasses, one docstring per field.

This module is the contract between the launcher and every rank: the launcher
validates user input against it and writes the resolved ``recipe.yaml``; each
rank parses that file back with :func:`recipe_from_dict`. Validation of user
input (all problems at once, exit code 2) lives in ``train.config.loading``; here a
malformed tree raises :class:`RecipeError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from train.config.outputs import CheckpointConfig, LoggingConfig  # noqa: F401 - re-exported
from train.config.slurm import SLURM_SIGNAL_SLACK_S, SlurmConfig  # noqa: F401 - re-exported
from train.config.typed import RecipeError, from_dict

LOWER_IS_BETTER = ("loss", "perplexity")
"""Validation metrics where lower is better (``eval.mode: auto``)."""


@dataclass
class RunConfig:
    name: str = "tiny"
    """Run name; the default run directory is ``runs/<name>``."""
    dir: Optional[str] = None
    """Run directory; ``None`` means ``runs/<name>`` under the current directory."""
    seed: int = 1234
    """Seed for model init, data order and every RNG (each rank derives its own)."""


@dataclass
class ModelConfig:
    pretrained: Optional[str] = None
    """Local path (or hub name) of pretrained weights; exclusive with ``config``."""
    config: Optional[dict] = None
    """Inline config for random init, e.g. ``{model_type: llama, hidden_size: 64}``."""
    activation_checkpointing: Literal[False, True, "selective", "auto"] = False
    """``true``: recompute each transformer block in backward (least activation memory, about a
    third more compute). ``selective``: keep the outputs of the matmuls and of attention, recompute
    only the cheap operations between them (norms, activations, residual adds, dropout): most of
    the time back, part of the memory. ``false``: keep every activation. ``auto``: the least
    recomputation whose memory plan fits the GPU (see ``parallel.engine: auto``)."""
    compile: bool = False
    """``torch.compile`` each transformer block."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: ``sdpa``, ``eager`` or ``flash_attention_2``."""
    freeze_embeddings: bool = False
    """Train without updating the input embeddings (and a head tied to them)."""
    freeze_layers: int = 0
    """Freeze the first N transformer layers (counted from the input)."""
    lora: Optional["LoraSettings"] = None
    """Train LoRA adapters (``peft``) instead of the full model; ddp and fsdp only."""


@dataclass
class LoraSettings:
    r: int = 8
    """Rank of the low-rank update."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt (e.g. ``[q_proj, v_proj]``); ``None`` uses peft's default for the architecture."""
    modules_to_save: Optional[list[str]] = None
    """Modules trained in full beside the adapters (peft's ``modules_to_save``; a name matches each module
    whose name ends with it), e.g. ``[model.norm]``; a classification head is always trained."""
    export: Literal["merged", "adapter"] = "merged"
    """``shardforge export`` writes the base model with the adapter merged in, or the adapter alone."""


@dataclass
class TokenizerTrainConfig:
    vocab_size: int = 4096
    """Vocabulary size of the byte-level BPE trained on the training text."""
    max_chars: int = 20_000_000
    """Train the tokenizer on at most this many characters of training text."""


@dataclass
class TokenizerConfig:
    path: Optional[str] = None
    """Local path or hub name of a fast tokenizer; defaults to ``model.pretrained``. Exclusive with
    ``train``: an override of one drops the other from the recipe file."""
    train: Optional[TokenizerTrainConfig] = None
    """Train a byte-level BPE on the training text once, saved in the run directory. Exclusive with
    ``path``."""


@dataclass
class SourceConfig:
    path: str = ""
    """Local file, folder or glob (txt, json, jsonl, csv, tsv, parquet), a folder written by
    ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a hub dataset name."""
    name: Optional[str] = None
    """Hub dataset config name."""
    split: str = "train"
    """Split to read (of a hub dataset, or of a ``DatasetDict`` saved with ``save_to_disk``)."""
    text_field: str = "text"
    """Column holding the text (unless ``template`` is set); ``causal_lm`` needs strings (chat: ``task: sft``)."""
    template: Optional[str] = None
    """Python format template over the record's columns, e.g. ``"Q: {question}\\nA: {answer}"``."""
    weight: float = 1.0
    """Mixing weight relative to the other sources (by tokens)."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Training sources, mixed by weight."""
    seq_len: int = 128
    """Tokens per packed training sample."""
    val_fraction: float = 0.01
    """Fraction of packed samples held out for validation (when no ``val_source``)."""
    val_source: Optional[SourceConfig] = None
    """A separate validation source (a named split, say) instead of ``val_fraction``."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Which tokenizer to use or train."""
    cache_dir: str = "data_cache"
    """Where packed Arrow files are cached, keyed by a fingerprint of the data recipe."""
    num_proc: Optional[int] = None
    """Processes that tokenize (pre-training: for sources over 1 MiB); ``None``: one per CPU core this
    process may use."""
    max_record_mb: int = 16
    """Longest line of a json/jsonl/csv/tsv file, in MiB; a longer one is refused, naming it (parsers
    need many times a record's size in memory)."""
    num_workers: int = 0
    """DataLoader worker processes per rank. 0: a thread of the training process reads 4 micro-batches
    ahead, which suits pre-tokenized data best (a worker hands each batch over through a queue)."""
    max_samples: Optional[int] = None
    """Use at most this many packed training samples (for smoke tests)."""
    test_fraction: float = 0.0
    """Fine-tuning tasks: fraction of records held out as the test split (when no ``test_source``)."""
    test_source: Optional[SourceConfig] = None
    """Fine-tuning tasks: a separate test source, evaluated once at the end with the best weights."""
    label_field: str = "label"
    """Classification: the column with each record's label; token classification: the column with
    the list of per-word tags (the words are in ``text_field``)."""
    prompt_field: str = "prompt"
    """SFT: the prompt column (or a source's ``template`` renders the prompt)."""
    response_field: str = "response"
    """SFT: the response column; the loss covers only these tokens (and the EOS after them)."""
    messages_field: str = "messages"
    """SFT: a column of chat records ``[{role, content}, ...]``, used when there is no prompt column;
    the loss covers the assistant turns only."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms or biases)."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to ``lr``."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """LR decay after warmup, down to ``lr * min_lr_ratio`` at ``train.max_steps``."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps to train."""
    micro_batch_size: Union[int, Literal["auto"]] = 2
    """Samples per rank per forward/backward. ``auto``: the largest that divides the global batch
    over the ranks and whose memory plan fits the GPU (see ``parallel.engine: auto``)."""
    global_batch_size: int = 8
    """Samples per optimizer step over all ranks; accumulation = global / (micro × world)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    eval_batches: Optional[int] = None
    """Global batches per evaluation: the first ``eval_batches × global_batch_size`` validation
    samples, the same ones whatever the world size; 0: the whole validation split; ``None``: 4 for
    ``causal_lm``, the whole split for the fine-tuning tasks (their metrics need every sample)."""
    epochs: float = 0.0
    """Train this many passes over the training split (sets ``max_steps``); 0: use ``max_steps``."""
    log_every: int = 10
    """Log metrics every N steps."""
    stop_after: int = 0
    """Stop this launch after N steps with a checkpoint and exit code 75 (time-boxed jobs); 0: off."""
    on_nonfinite: Literal["auto", "skip", "stop"] = "auto"
    """A NaN/inf loss or gradient norm on any rank: ``skip`` the optimizer step on every rank (counted
    in ``skipped_steps``), or ``stop`` without saving (the last good checkpoint stays the latest).
    ``auto``: skip with ddp/fsdp, stop with ZeRO (DeepSpeed applies its step before the norm is
    known, so it cannot skip). ``skipped_steps`` also counts the fp16 loss scaler's skips."""
    step_timeout_s: float = 0.0
    """Hang watchdog: a step (or save) that runs longer dumps every rank's Python stack and exits
    non-zero so the job can be requeued; the first step of a launch gets 10× (warm-up); 0: off."""
    deterministic: bool = False
    """Deterministic kernels on GPUs (``torch.use_deterministic_algorithms``, a fixed cuBLAS
    workspace, no cuDNN autotuning): a resumed run then repeats the uninterrupted one bit for bit on
    the same GPUs and software, and an op with no deterministic kernel raises naming itself. Off by
    default: it costs speed. CPU runs are deterministic either way."""


@dataclass
class EvalConfig:
    metric: str = "loss"
    """The validation metric for early stopping and the best checkpoint: ``loss`` or ``perplexity``;
    classification adds ``accuracy``, ``macro_f1``, ``micro_f1``; token classification adds
    ``entity_f1``, ``entity_precision``, ``entity_recall``, ``token_accuracy``."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower or higher is better; ``auto``: lower for loss and perplexity, higher otherwise."""
    patience: int = 0
    """Stop after this many evaluations in a row without improvement; 0: never stop early."""
    min_delta: float = 0.0
    """An improvement must beat the best value by more than this."""
    keep_best: Optional[bool] = None
    """Save a checkpoint whenever the metric improves and never prune it; ``None``: on for the
    fine-tuning tasks, off for ``causal_lm``."""
    test_at_end: bool = True
    """Evaluate the test split at the end, with the best checkpoint's weights, into
    ``test_results.json`` and ``test_results.md``."""


@dataclass
class ParallelConfig:
    engine: Literal["ddp", "fsdp", "zero1", "zero2", "zero3", "auto"] = "ddp"
    """Data-parallel engine. ``auto``: the least communication whose memory plan fits the GPU, in
    the order ddp, zero1, zero2, fsdp, zero3 (``train.config.autofit``; ``shardforge plan`` shows the
    choice and what it rejected). Needs the GPU's memory: NVML, or ``parallel.gpu_mem_gb``."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Compute precision; master weights stay fp32."""
    offload: Union[bool, Literal["auto"]] = False
    """Offload optimizer state (and ZeRO-3 / FSDP parameters) to CPU memory. ``auto``: only when
    nothing fits without it (see ``engine: auto``)."""
    nproc: Optional[int] = None
    """Processes per node; ``None`` means all local GPUs (one process without GPUs)."""
    nodes: int = 1
    """Number of nodes."""
    reduce_dtype: Optional[Literal["fp32", "bf16"]] = None
    """The dtype gradients are reduced in across ranks. Unset: FSDP reduces in fp32, DeepSpeed in its
    own choice (the compute dtype); ``bf16`` halves the reduce-scatter's bytes (the fast choice on
    GPUs, at bf16's rounding of the summed gradients), ``fp32`` is exact. FSDP and ZeRO only: DDP
    reduces gradients in their own dtype."""
    reduce_bucket_mb: int = 200
    """DeepSpeed reduce / all-gather (and ZeRO-3 prefetch) bucket size in MiB of gradients; converted
    to the element count DeepSpeed expects (2 bytes per element in bf16/fp16, 4 in fp32)."""
    gpu_mem_gb: Optional[float] = None
    """Memory of one GPU in GB, for the memory plan (``shardforge plan``) and the check that refuses
    a plan that cannot fit. Unset: the GPUs of the machine that plans or trains (NVML / CUDA);
    set it for a Slurm cluster's GPUs, which ``shardforge submit`` cannot see from the login node."""
    fitted: list[str] = field(default_factory=list)
    """The settings ``auto`` chose (e.g. ``[parallel.engine, train.micro_batch_size]``), written by
    the launcher into the run's ``recipe.yaml`` beside the values it chose: a launch on another
    world size (or GPU) chooses them again, and says what changed. Not for hand editing: an
    override of one of these settings takes it out of the list."""
    tf32: bool = True
    """On GPUs, fp32 matmuls and convolutions run on TF32 tensor cores (torch's own default is full
    fp32): all of ``precision: fp32`` and the fp32 parts of mixed precision. MFU for fp32 is then
    measured against the TF32 peak. ``false`` for bit-strict fp32."""


_CLASSIFICATION = ("loss", "accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall",
                   "micro_precision", "micro_recall")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("loss", "perplexity"),
    "sft": ("loss", "perplexity"),
    "sequence_classification": _CLASSIFICATION,
    "token_classification": ("loss", "entity_f1", "entity_precision", "entity_recall", "token_accuracy",
                             *_CLASSIFICATION[2:]),
}
"""The validation metrics of each task (``eval.metric`` picks one); the first few are logged on the console."""


@dataclass
class Recipe:
    task: Literal["causal_lm", "sft", "sequence_classification", "token_classification"] = "causal_lm"
    """``causal_lm`` (packed pre-training), ``sft`` (prompt/response or chat, loss on responses),
    ``sequence_classification`` or ``token_classification`` (labels read from the data)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Name, directory and seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps and batch sizes."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation metric, early stopping, best checkpoint, test split."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Engine, precision and process counts."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When to save and whether to resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """TensorBoard, console and telemetry."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Slurm job settings for ``shardforge submit``."""


def recipe_from_dict(data: dict) -> Recipe:
    """Build a :class:`Recipe` from plain data; raise :class:`RecipeError` listing every problem."""
    return from_dict(Recipe, data)


def resolve_defaults(recipe: Recipe, nproc: Optional[int] = None) -> Recipe:
    """Every default that depends on other settings, resolved in one place (in place; idempotent).

    The launcher resolves before it writes ``recipe.yaml``, so the file shows what runs; each rank
    resolves again (a no-op then). ``nproc``: processes per node when ``parallel.nproc`` is unset
    (the local GPU count, or ``slurm.gpus_per_node`` for a job). Only ``train.epochs`` waits for
    the data: :func:`resolve_epochs`.
    """
    from train.engines import capabilities  # a table; imports nothing heavy

    if recipe.parallel.nproc is None:
        recipe.parallel.nproc = nproc or 1
    if recipe.run.dir is None:
        recipe.run.dir = f"runs/{recipe.run.name}"
    t, ev = recipe.train, recipe.eval
    if t.eval_batches is None:  # fine-tuning metrics need every sample
        t.eval_batches = 4 if recipe.task == "causal_lm" else 0
    if ev.keep_best is None:
        ev.keep_best = recipe.task != "causal_lm"
    if ev.mode == "auto":
        ev.mode = "min" if ev.metric in LOWER_IS_BETTER else "max"
    if t.on_nonfinite == "auto" and "parallel.engine" not in auto_keys(recipe):  # else once auto-fit has chosen
        t.on_nonfinite = "skip" if capabilities(recipe.parallel.engine).skip_nonfinite else "stop"
    return recipe


def resolve_epochs(recipe: Recipe, train_samples: int) -> Optional[str]:
    """``train.epochs`` > 0 sets ``train.max_steps`` from the size of the training split (known only
    once the data is prepared); returns a line saying so, or ``None``."""
    t = recipe.train
    if t.epochs <= 0:
        return None
    per_epoch = max(1, train_samples // t.global_batch_size)
    t.max_steps = max(1, math.ceil(t.epochs * per_epoch))
    return (f"train: {t.epochs:g} epochs of {per_epoch} steps ({train_samples} samples / "
            f"global batch {t.global_batch_size}) = {t.max_steps} steps")


AUTO_KEYS = ("parallel.engine", "parallel.offload", "model.activation_checkpointing", "train.micro_batch_size")
"""The settings that take ``auto`` (chosen by ``train.config.autofit`` from the memory plan)."""


def auto_keys(recipe: Recipe) -> list[str]:
    """The settings of :data:`AUTO_KEYS` that ``recipe`` leaves to auto-fit."""
    values = {"parallel.engine": recipe.parallel.engine, "parallel.offload": recipe.parallel.offload,
              "model.activation_checkpointing": recipe.model.activation_checkpointing,
              "train.micro_batch_size": recipe.train.micro_batch_size}
    return [key for key in AUTO_KEYS if values[key] == "auto"]


def micro_batch(recipe: Recipe) -> int:
    """``train.micro_batch_size`` once chosen (``auto`` is resolved by the launcher before anything runs)."""
    value = recipe.train.micro_batch_size
    assert value != "auto", "auto-fit (train.config.autofit) chooses train.micro_batch_size first"
    return value


def offloaded(recipe: Recipe) -> bool:
    """``parallel.offload`` once chosen (see :func:`micro_batch`)."""
    value = recipe.parallel.offload
    assert value != "auto", "auto-fit (train.config.autofit) chooses parallel.offload first"
    return value


def world_size(recipe: Recipe) -> int:
    """Total ranks: processes per node × nodes (``nproc`` must be resolved)."""
    return (recipe.parallel.nproc or 1) * recipe.parallel.nodes


def accumulation(global_batch: int, micro: int, world: int) -> int:
    """Micro-batches per rank per optimizer step: the one formula, which refuses a global batch
    that does not divide (never rounds it down)."""
    unit = micro * world
    if micro < 1 or world < 1 or global_batch < 1 or global_batch % unit:
        raise RecipeError(None, [f"train.global_batch_size: {global_batch} is not divisible by micro_batch_size × world "
                              f"size = {micro} × {world} = {unit}; change train.global_batch_size or "
                              f"train.micro_batch_size"])
    return global_batch // unit


def grad_accum_steps(recipe: Recipe, world: Optional[int] = None) -> int:
    """:func:`accumulation` for ``recipe`` on ``world`` ranks (default: the recipe's world size)."""
    return accumulation(recipe.train.global_batch_size, micro_batch(recipe), world or world_size(recipe))
