"""Data: sources → tokenizer → packed Arrow blocks in a fingerprinted cache → per-rank batches.

Order of samples is defined globally, independent of the world size: epoch ``e``
uses a permutation of all packed samples seeded by ``(seed, e)``; each optimizer
step takes the next ``global_batch_size`` indices of it. Rank ``r`` of ``W`` takes
the ``r``-th slice of those and splits it into micro-batches. The position is the
number of samples consumed, so resuming is O(1) and works on any world size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from train.recipe import DataConfig, Recipe, SourceConfig
from train.sources import BUILDERS as _BUILDERS
from train.sources import local_files as _local_files
from train.stop import ignore_stop_signals, stop_signals_blocked

DATA_FORMAT_VERSION = 1


class DataError(ValueError):
    """A data problem with one line naming the source and the fix."""


# ---------------------------------------------------------------- sources


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def load_records(src: SourceConfig, where: str):
    """Load one source as a ``datasets.Dataset`` with its own columns (checked to be non-empty)."""
    import datasets

    files = _local_files(src.path)
    if files is not None:
        if not files:
            raise DataError(f"{where}.path: no such file or no txt/json/jsonl/parquet files in "
                            f"{src.path!r}; fix the path")
        kinds = {_BUILDERS.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise DataError(f"{where}.path: {src.path!r} mixes or holds unsupported file types "
                            f"({sorted(str(k) for k in kinds)}); use one of .txt .json .jsonl .parquet")
        builder = kinds.pop()
        for f in files:
            if not os.access(f, os.R_OK):
                raise DataError(f"{where}.path: cannot read {f!r}; check its permissions")
        if all(os.path.getsize(f) == 0 for f in files):
            raise DataError(f"{where}: {src.path!r} is empty; point it at non-empty data")
        kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        except Exception as err:  # datasets wraps parser errors in many types
            raise DataError(f"{where}.path: could not read {src.path!r} as {builder}: "
                            f"{_first_line(err)}; check the file") from None
    else:
        try:
            ds = datasets.load_dataset(src.path, src.name, split=src.split)
        except Exception as err:
            raise DataError(f"{where}.path: could not load hub dataset {src.path!r} "
                            f"(split {src.split!r}): {_first_line(err)}") from None
    if len(ds) == 0:
        raise DataError(f"{where}: {src.path!r} has no records; point it at non-empty data")
    return ds


def check_template(src: SourceConfig, ds, where: str) -> None:
    """Fail early, in one line, when a source's template names a column the records lack."""
    if src.template is not None:
        try:
            src.template.format_map(ds[0])
        except (KeyError, IndexError, ValueError) as err:
            raise DataError(f"{where}.template: {err!s} does not match the columns "
                            f"{ds.column_names} of {src.path!r}; fix the template") from None


def load_source(src: SourceConfig, where: str):
    """Load one source as a ``datasets.Dataset`` with a single ``text`` column."""
    ds = load_records(src, where)
    if src.template is None and src.text_field not in ds.column_names:
        raise DataError(f"{where}.text_field: {src.text_field!r} is not a column of {src.path!r} "
                        f"(columns: {', '.join(ds.column_names)}); set {where}.text_field")
    check_template(src, ds, where)
    template, field_name = src.template, src.text_field

    def to_text(batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        if template is None:
            return {"text": [str(t) for t in batch[field_name]]}
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        return {"text": [template.format_map(r) for r in rows]}

    return ds.map(to_text, batched=True, remove_columns=ds.column_names, desc=f"{where}: text")


# ---------------------------------------------------------------- tokenizer


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_train_tokenizer(recipe: Recipe, cache_root: Path):
    """A fast tokenizer with an EOS token: loaded from a path or trained (once, cached)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = recipe.data.tokenizer
    if cfg.train is None:
        name = cfg.path or recipe.model.pretrained
        if name is None:
            raise DataError("data.tokenizer: no tokenizer given; set data.tokenizer.path, "
                            "model.pretrained, or data.tokenizer.train.vocab_size")
        try:
            tok = AutoTokenizer.from_pretrained(name, use_fast=True)
        except Exception as err:
            raise DataError(f"data.tokenizer.path: cannot load tokenizer {name!r}: "
                            f"{_first_line(err)}; fix the path") from None
        if tok.eos_token_id is None:
            tok.eos_token = tok.sep_token or tok.pad_token
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    key = _hash({"sources": [asdict(s) for s in recipe.data.sources], "train": asdict(cfg.train),
                 "v": DATA_FORMAT_VERSION})
    out = cache_root / "tokenizers" / key
    if not (out / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        texts = _training_text(recipe.data, cfg.train.max_chars)
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.train.vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tk.train_from_iterator(texts, trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        fast.save_pretrained(tmp)
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    return PreTrainedTokenizerFast.from_pretrained(str(out))


def _training_text(cfg: DataConfig, max_chars: int) -> Iterator[str]:
    seen = 0
    for i, src in enumerate(cfg.sources):
        for record in load_source(src, f"data.sources[{i}]"):
            text = record["text"][: max_chars - seen]
            seen += len(text)
            yield text
            if seen >= max_chars:
                return


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


# ---------------------------------------------------------------- tokenize + pack


def _tokenize_batch(batch: dict, tokenizer, eos_id: int) -> dict:
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [x + [eos_id] for x in ids]}


def _pack_batch(batch: dict, seq_len: int) -> dict:
    flat = np.fromiter((t for doc in batch["input_ids"] for t in doc), dtype=np.int64)
    n = len(flat) // seq_len
    return {"input_ids": flat[: n * seq_len].reshape(n, seq_len).tolist()}


def tokenize_and_pack(ds, tokenizer, seq_len: int, num_proc: int, desc: str):
    """Tokenize (EOS after every document) and pack into ``seq_len`` blocks; return (blocks, stats)."""
    eos = tokenizer.eos_token_id
    tok = ds.map(_tokenize_batch, batched=True, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=ds.column_names, fn_kwargs={"tokenizer": tokenizer, "eos_id": eos},
                 desc=f"{desc}: tokenize")
    total = int(sum(len(x) for x in tok["input_ids"]))
    packed = tok.map(_pack_batch, batched=True, batch_size=1000, remove_columns=tok.column_names,
                     fn_kwargs={"seq_len": seq_len}, desc=f"{desc}: pack {seq_len}")
    kept = len(packed) * seq_len
    return packed, {"tokens_total": total, "tokens_kept": kept, "tokens_dropped": total - kept}


@dataclass
class PreparedData:
    train: Any
    """Packed training samples (a ``datasets.Dataset`` of ``input_ids``)."""
    val: Any
    """Packed validation samples."""
    tokenizer: Any
    """The fast tokenizer used."""
    key: str
    """Fingerprint of the data recipe and tokenizer; names the cache directory."""
    stats: dict
    """Token counts and whether the cache was hit."""
    test: Any = None
    """Fine-tuning tasks: the test split (may be empty)."""
    labels: Optional[list[str]] = None
    """Classification tasks: label names by class id."""


def source_stamps(recipe: Recipe) -> list:
    """(file, size, mtime) of every local data file, so editing data in place refreshes the cache."""
    d = recipe.data
    stamps = []
    for src in [*d.sources, d.val_source, d.test_source]:
        for f in (_local_files(src.path) or []) if src is not None else []:
            st = os.stat(f)
            stamps.append([f, st.st_size, st.st_mtime_ns])
    return stamps


def data_cache_key(recipe: Recipe, tokenizer) -> str:
    d = recipe.data
    return _hash({"sources": [asdict(s) for s in d.sources], "files": source_stamps(recipe), "seq_len": d.seq_len,
                  "val_fraction": d.val_fraction, "val_source": d.val_source and asdict(d.val_source),
                  "max_samples": d.max_samples, "tokenizer": tokenizer_fingerprint(tokenizer),
                  "seed": recipe.run.seed, "v": DATA_FORMAT_VERSION})


def prepare_data(recipe: Recipe, log=print) -> PreparedData:
    """Tokenize and pack the recipe's data once; later calls load the cached Arrow files."""
    d = recipe.data
    cache_root = Path(d.cache_dir).expanduser()
    tokenizer = load_or_train_tokenizer(recipe, cache_root)
    if recipe.task != "causal_lm":
        from train.task_data import prepare_task_data

        return prepare_task_data(recipe, tokenizer, log=log)
    key = data_cache_key(recipe, tokenizer)
    out = cache_root / key
    if (out / "stats.json").exists():
        stats = json.loads((out / "stats.json").read_text())
        stats["cache_hit"] = True
        return PreparedData(*_load_split_pair(out), tokenizer, key, stats)
    start = time.time()
    parts, stats = [], {"tokens_total": 0, "tokens_kept": 0, "tokens_dropped": 0}
    for i, src in enumerate(d.sources):
        blocks, st = tokenize_and_pack(load_source(src, f"data.sources[{i}]"), tokenizer,
                                       d.seq_len, d.num_proc, f"data.sources[{i}]")
        if len(blocks) == 0:
            raise DataError(f"data.sources[{i}]: {src.path!r} has {st['tokens_total']} tokens, fewer "
                            f"than one sample of data.seq_len={d.seq_len}; lower data.seq_len or add data")
        parts.append((blocks, src.weight))
        for k in stats:
            stats[k] += st[k]
    train = _mix(parts, recipe.run.seed)
    if d.val_source is not None:
        val, _ = tokenize_and_pack(load_source(d.val_source, "data.val_source"), tokenizer,
                                   d.seq_len, d.num_proc, "data.val_source")
    else:
        n_val = max(1, int(round(len(train) * d.val_fraction))) if d.val_fraction > 0 else 0
        if len(train) - n_val < 1:
            raise DataError(f"data: only {len(train)} packed samples of {d.seq_len} tokens; "
                            f"lower data.seq_len or data.val_fraction, or add data")
        order = np.random.default_rng([recipe.run.seed, 7]).permutation(len(train))
        val, train = train.select(np.sort(order[:n_val])), train.select(np.sort(order[n_val:]))
    if d.max_samples is not None:
        train = train.select(range(min(d.max_samples, len(train))))
    stats.update(train_samples=len(train), val_samples=len(val), seq_len=d.seq_len,
                 seconds=round(time.time() - start, 2))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train.flatten_indices().save_to_disk(str(tmp / "train"))
    if len(val):
        val.flatten_indices().save_to_disk(str(tmp / "val"))
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    if out.exists():  # another process won the race; keep its copy
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    log(f"data: {stats['tokens_kept']:,} tokens kept in {stats['train_samples']:,} train + "
        f"{stats['val_samples']:,} val samples of {d.seq_len}; {stats['tokens_dropped']:,} dropped "
        f"(cache {out})")
    stats["cache_hit"] = False
    return PreparedData(*_load_split_pair(out), tokenizer, key, stats)


def _load_split_pair(out: Path):
    import datasets

    def load(name: str):
        if not (out / name).exists():  # an empty split is not written (datasets cannot reload one)
            return datasets.Dataset.from_dict({"input_ids": []})
        return datasets.load_from_disk(str(out / name))

    return load("train"), load("val")


def _mix(parts: list, seed: int):
    """Mix packed sources so each source's share of samples follows its weight."""
    import datasets

    if len(parts) == 1:
        return parts[0][0]
    total = sum(len(b) for b, _ in parts)
    wsum = sum(w for _, w in parts)
    chosen = []
    for i, (blocks, w) in enumerate(parts):
        want = max(1, int(round(total * w / wsum)))
        idx = np.resize(np.random.default_rng([seed, 11, i]).permutation(len(blocks)), want)
        chosen.append(blocks.select(np.sort(idx)).flatten_indices())
    return datasets.concatenate_datasets(chosen)


# ---------------------------------------------------------------- the global sample stream


class GlobalSampleStream:
    """Which global sample indices each optimizer step consumes.

    The position is ``consumed`` samples in total; the stream is a pure
    function of ``(num_samples, seed)`` and the position, never of the world size.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 3, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def locate(self, consumed: int, global_batch: int) -> tuple[int, int]:
        """(epoch, offset in that epoch) of the step starting after ``consumed`` samples."""
        per_epoch = (self.num_samples // global_batch) * global_batch
        return consumed // per_epoch, consumed % per_epoch

    def step_indices(self, consumed: int, global_batch: int) -> np.ndarray:
        """The ``global_batch`` sample indices of the step that starts at position ``consumed``.

        An epoch holds ``num_samples // global_batch`` whole steps; the
        ``num_samples % global_batch`` samples left in its permutation are skipped.
        """
        if global_batch > self.num_samples:
            raise DataError(f"train.global_batch_size={global_batch} exceeds the {self.num_samples} "
                            f"training samples; lower it or add data")
        epoch, offset = self.locate(consumed, global_batch)
        return self.permutation(epoch)[offset: offset + global_batch]


def rank_slice(step_indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of one step's global indices."""
    per_rank = len(step_indices) // world
    return step_indices[rank * per_rank: (rank + 1) * per_rank]


class _PackedSamples(torch.utils.data.Dataset):
    """Batches of samples as a dict of int64 tensors, one per column.

    Padded (fine-tuning) samples are trimmed to the longest in the batch, so a batch of short
    records costs what it holds, not ``seq_len``.
    """

    def __init__(self, ds):
        self.ds = ds.with_format("numpy")

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = self.ds[indices]
        batch = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in rows.items()}
        mask = batch.get("attention_mask")
        if mask is not None and len(mask):
            width = int(mask.sum(1).max())
            batch = {k: v[:, :width] if v.ndim == 2 else v for k, v in batch.items()}
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def _identity(batch):
    return batch


class _MicroBatchSampler:
    """Yields this rank's micro-batches of indices from position ``start`` on, forever."""

    def __init__(self, stream: GlobalSampleStream, start: int, global_batch: int, micro: int,
                 rank: int, world: int):
        self.stream, self.start, self.gb, self.micro = stream, start, global_batch, micro
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.start
        while True:
            mine = rank_slice(self.stream.step_indices(consumed, self.gb), self.rank, self.world)
            for j in range(0, len(mine), self.micro):
                yield mine[j: j + self.micro].tolist()
            consumed += self.gb


class TrainBatches:
    """Stateful iterator over this rank's micro-batches; the state is the global sample position.

    Only batches handed to the caller count: prefetched ones do not, so a checkpoint
    taken at a step boundary resumes at exactly the next unseen step.
    """

    def __init__(self, dataset, seed: int, global_batch: int, micro: int, rank: int, world: int,
                 num_workers: int = 1, pin_memory: bool = False):
        self.dataset, self.seed = dataset, seed
        self.global_batch, self.micro, self.rank, self.world = global_batch, micro, rank, world
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.stream = GlobalSampleStream(len(dataset), seed)
        self.stream.step_indices(0, global_batch)  # validates the sizes up front
        self.micro_per_step = global_batch // (micro * world)
        self.consumed = 0
        self._yielded = 0
        self._it: Optional[Iterator] = None

    @property
    def epoch(self) -> int:
        return self.stream.locate(self.consumed, self.global_batch)[0]

    def _start(self) -> Iterator:
        sampler = _MicroBatchSampler(self.stream, self.consumed, self.global_batch, self.micro,
                                     self.rank, self.world)
        loader = torch.utils.data.DataLoader(
            _PackedSamples(self.dataset), batch_sampler=sampler, collate_fn=_identity,
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            worker_init_fn=ignore_stop_signals if self.num_workers else None,
            persistent_workers=False, prefetch_factor=4 if self.num_workers else None)
        with stop_signals_blocked():  # the workers start with them blocked; see train.stop
            return iter(loader)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        self._yielded += 1
        if self._yielded == self.micro_per_step:
            self._yielded = 0
            self.consumed += self.global_batch
        return batch

    def next_step_indices(self) -> np.ndarray:
        """Global indices of the next step (for fingerprints and tests)."""
        return self.stream.step_indices(self.consumed, self.global_batch)

    def fingerprint(self, steps_back: int = 0) -> str:
        """sha256 of the token ids of the next optimizer step's global batch (or of one ``steps_back``)."""
        idx = self.stream.step_indices(self.consumed - steps_back * self.global_batch, self.global_batch)
        tokens = np.asarray(self.dataset.with_format("numpy")[np.sort(idx).tolist()]["input_ids"])
        return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()[:16]

    def state_dict(self) -> dict:
        if self._yielded:
            raise RuntimeError("data position saved mid-step; checkpoints happen at step boundaries")
        return {"consumed": self.consumed, "epoch": self.epoch, "num_samples": len(self.dataset),
                "global_batch": self.global_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
        self._yielded, self._it = 0, None


def eval_batches(dataset, micro: int, rank: int, world: int, num_batches: int) -> list[dict]:
    """A fixed, rank-sharded list of validation micro-batches (the same at every evaluation).

    ``num_batches`` > 0: that many micro-batches per rank from the start of the split.
    ``num_batches`` = 0: the whole split; every rank gets the same number of batches (sharded
    engines run collectives in forward), the last ones filled up with repeats whose
    ``sample_weight`` is 0 so they count for nothing.
    """
    samples = _PackedSamples(dataset)
    if num_batches > 0:
        n = min(len(dataset), micro * world * num_batches)
        per_rank = n // world
        idx = list(range(rank * per_rank, (rank + 1) * per_rank))
        return [samples.__getitems__(idx[j: j + micro]) for j in range(0, per_rank, micro)]
    if len(dataset) == 0:
        return []
    per_rank = -(-len(dataset) // world)
    per_rank = -(-per_rank // micro) * micro
    mine = [rank * per_rank + i for i in range(per_rank)]
    batches = []
    for j in range(0, per_rank, micro):
        chunk = mine[j: j + micro]
        real = [i < len(dataset) for i in chunk]
        batch = samples.__getitems__([i if ok else 0 for i, ok in zip(chunk, real)])
        batch["sample_weight"] = torch.tensor(real, dtype=torch.float32)
        batches.append(batch)
    return batches
