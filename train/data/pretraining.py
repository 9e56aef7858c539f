"""Pre-training data (``causal_lm``): sources → tokens (EOS after every document) → packed
``seq_len`` blocks, mixed by weight, with a held-out validation share; cached.

Streamed in bounded memory: documents are read a block at a time (:mod:`train.data.documents`),
tokenized in bounded pieces on ``data.num_proc`` processes (:mod:`train.data.encode`), packed to a
flat file as blocks fill and written out as Arrow by row indices (:mod:`train.data.packing`). The
samples, their order and the cache key are what the ``datasets.map`` pipeline before it produced.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from train.data.cache import (DATA_FORMAT_VERSION, PreparedData, fingerprint, publish, read_cache, source_stamps,
                              staging)
from train.data.documents import Progress, documents
from train.data.encode import PIECE_CHARS, Splitter, available_cpus, backend_of, encode, tokenizer_processes
from train.data.files import local_files
from train.data.packing import Packer, blocks, write_split
from train.data.scratch import scratch_dir
from train.data.sources import DataError
from train.data.tokenizer import tokenizer_fingerprint
from train.config.recipe import Recipe, SourceConfig

logger = logging.getLogger("shardforge")

_BACKENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _backend(tokenizer):
    """:func:`backend_of`, made once per tokenizer while it lives (a shard task packs file by file,
    and copying a large vocabulary's backend takes a fraction of a second each time)."""
    backend = _BACKENDS.get(tokenizer)
    if backend is None:
        backend = _BACKENDS[tokenizer] = backend_of(tokenizer)
    return backend


def pack_documents(docs: Iterable[Iterable[str]], tokenizer, seq_len: int, num_proc: int, path: Path,
                   size: Optional[int] = None, progress: Optional[Progress] = None,
                   where: str = "data", sink=None) -> dict:
    """Tokenize documents (each an iterable of text blocks) and pack them into ``path`` (see
    :class:`Packer`); the token counts. ``size`` (bytes, if known) decides whether worker processes pay.
    ``sink``: takes the pieces' ids (``add(ids, last)``, ``finish()``) instead of a :class:`Packer`."""
    backend = _backend(tokenizer)
    splitter = Splitter(backend)
    packer = sink if sink is not None else Packer(path, seq_len, tokenizer.eos_token_id)

    def in_process(texts: list[str]) -> list:  # pieces of documents: the Packer adds the EOS
        return encode(backend, texts)

    def pieces() -> Iterator[tuple[str, bool]]:
        for blocks_ in docs:
            yield from splitter.pieces(blocks_)

    workers = tokenizer_processes(backend, in_process, num_proc, size, lambda: path.parent)
    try:
        for ids, last in workers.map(pieces()):
            packer.add(ids, last)
            if progress is not None:
                progress.tokens += len(ids)
                progress.tick()
    except BaseException:
        workers.close(kill=True)
        packer.finish()
        raise
    workers.close()
    stats = packer.finish()
    if splitter.unverified:
        logger.warning(f"{where}: {splitter.unverified} of {splitter.cuts} cuts of documents longer than {PIECE_CHARS:,} "
                       f"characters are not where this tokenizer treats text as split; tokens there may differ from "
                       f"tokenizing those documents whole")
    return stats


def tokenize_and_pack(ds, tokenizer, seq_len: int, num_proc: int, desc: str):
    """Tokenize (EOS after every document) and pack into ``seq_len`` blocks a ``datasets.Dataset``
    with a ``text`` column, in memory; return (blocks as a ``datasets.Dataset``, stats). For small
    data and tests: :func:`prepare_packed` streams."""
    import datasets
    import pyarrow as pa

    with tempfile.TemporaryDirectory() as tmp:
        docs = (iter((text,)) for batch in ds.iter(batch_size=1000) for text in batch["text"])
        stats = pack_documents(docs, tokenizer, seq_len, num_proc, Path(tmp) / "blocks", where=desc)
        packed = np.array(blocks(Path(tmp) / "blocks", seq_len))
    offsets = pa.array(np.arange(0, (len(packed) + 1) * seq_len, seq_len, dtype=np.int32))
    table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(packed.reshape(-1)))})
    return datasets.Dataset(datasets.table.InMemoryTable(table)), stats


def data_cache_key(recipe: Recipe, tokenizer) -> str:
    d = recipe.data
    return fingerprint({"sources": [asdict(s) for s in d.sources], "files": source_stamps(recipe), "seq_len": d.seq_len,
                  "val_fraction": d.val_fraction, "val_source": d.val_source and asdict(d.val_source),
                  "max_samples": d.max_samples, "tokenizer": tokenizer_fingerprint(tokenizer),
                  "seed": recipe.run.seed, "v": DATA_FORMAT_VERSION})


def prepare_packed(recipe: Recipe, tokenizer,
                   share: Optional[tuple[int, int]] = None) -> Optional[PreparedData]:
    """Tokenize and pack the recipe's data once; later calls load the cached Arrow files. ``share``
    (task, tasks): tokenize that task's share into the entry's shards (:mod:`train.data.shards`) and
    join them if it is the last to finish; ``None`` when the entry is not written yet."""
    from train.data.shards import ShardsBusy, joined, tokenize_share

    d = recipe.data
    key = data_cache_key(recipe, tokenizer)
    out = Path(d.cache_dir).expanduser() / key
    if (out / "stats.json").exists():
        return _cached(out, tokenizer, key, cache_hit=True)
    if share is not None:
        missing = tokenize_share(recipe, tokenizer, out, *share, pack_documents)
        if missing:
            logger.info(f"data: task(s) {', '.join(map(str, missing))} of {share[1]} have not finished; the last to finish joins")
            return None
    try:
        with joined(recipe, tokenizer, out) as join:
            if join is None and (out / "stats.json").exists():  # another process joined it meanwhile
                return _cached(out, tokenizer, key, cache_hit=True)
            if join is None:
                pack = lambda k, src, where, path: _pack_source(recipe, src, where, tokenizer, path)  # noqa: E731
            else:
                logger.info(f"data: joining the shards of {out}")
                pack = lambda k, src, where, path: join(k, path)  # noqa: E731
            stats = _write_packed(recipe, out, pack)
    except ShardsBusy as err:
        if share is None:
            raise
        logger.info(str(err))
        return None
    logger.info(f"data: {stats['tokens_kept']:,} tokens kept in {stats['train_samples']:,} train + "
                f"{stats['val_samples']:,} val samples of {d.seq_len}; {stats['tokens_dropped']:,} dropped "
                f"(cache {out})")
    return _cached(out, tokenizer, key, cache_hit=False)


def _write_packed(recipe: Recipe, out: Path, pack) -> dict:
    """Pack every source with ``pack(key, src, where, path) -> (blocks, token counts)``, mix, split
    and write the cache entry ``out``; its stats."""
    d = recipe.data
    start = time.time()
    folder = scratch_dir("packed")
    assert folder is not None  # prepare_data and prepare_share prepare inside scratch_in
    parts, weights = [], []
    stats: dict[str, Any] = {"tokens_total": 0, "tokens_kept": 0, "tokens_dropped": 0}
    for i, src in enumerate(d.sources):
        where = f"data.sources[{i}]"
        packed, st = pack(f"s{i}", src, where, folder / f"source{i}")
        if len(packed) == 0:
            raise DataError(f"{where}: {src.path!r} has {st['tokens_total']} tokens, fewer "
                            f"than one sample of data.seq_len={d.seq_len}; lower data.seq_len or add data")
        parts.append(packed)
        weights.append(src.weight)
        for k in stats:
            stats[k] += st[k]
    mixed = _mix_index([len(p) for p in parts], weights, recipe.run.seed)  # None: one source, all rows
    if d.val_source is not None:
        val_parts = [pack("val", d.val_source, "data.val_source", folder / "val")[0]]
        val_index = None
        train_index = mixed if mixed is not None else np.arange(len(parts[0]), dtype=np.int64)
    else:
        n = len(mixed) if mixed is not None else len(parts[0])
        n_val = max(1, int(round(n * d.val_fraction))) if d.val_fraction > 0 else 0
        if n - n_val < 1:
            raise DataError(f"data: only {n} packed samples of {d.seq_len} tokens; "
                            f"lower data.seq_len or data.val_fraction, or add data")
        order = np.random.default_rng([recipe.run.seed, 7]).permutation(n)
        val_index, train_index = np.sort(order[:n_val]), np.sort(order[n_val:])
        del order
        if mixed is not None:
            val_index, train_index = mixed[val_index], mixed[train_index]
        val_parts = parts
    if d.max_samples is not None:
        train_index = train_index[: d.max_samples]
    tmp = staging(out)
    tmp.mkdir(parents=True)
    stats.update(train_samples=write_split(tmp / "train", parts, train_index, "train"),
                 val_samples=write_split(tmp / "val", val_parts, val_index, "validation"),
                 seq_len=d.seq_len, seconds=round(time.time() - start, 2))
    publish(tmp, out, stats)
    return stats


def _pack_source(recipe: Recipe, src: SourceConfig, where: str, tokenizer, path: Path) -> tuple:
    """(packed blocks of one source, memory-mapped; its token counts)."""
    d = recipe.data
    files = local_files(src.path)
    size = sum(os.path.getsize(f) for f in files if os.path.isfile(f)) if files is not None else None
    progress = Progress(where)
    stats = pack_documents(documents(src, where, d.max_record_mb, progress), tokenizer, d.seq_len,
                           d.num_proc or available_cpus(), path, size, progress, where)
    if time.monotonic() - progress.start >= progress.every_s:
        logger.info(progress.line())
    return blocks(path, d.seq_len), stats


def _cached(out: Path, tokenizer, key: str, cache_hit: bool) -> PreparedData:
    stats, load = read_cache(out, ("train", "val"), ("input_ids",))
    stats["cache_hit"] = cache_hit
    return PreparedData(load("train"), load("val"), tokenizer, key, stats)


def _mix_index(lengths: list[int], weights: list[float], seed: int) -> Optional[np.ndarray]:
    """Rows (numbered across the sources in order) of the mixed training samples: each source's
    share follows its weight, drawn by a seeded permutation (repeated when a source is too small)
    and kept in order; ``None`` for one source (all its rows)."""
    if len(lengths) == 1:
        return None
    total, wsum = sum(lengths), sum(weights)
    starts = np.cumsum([0, *lengths[:-1]])
    chosen = []
    for i, (n, w) in enumerate(zip(lengths, weights)):
        want = max(1, int(round(total * w / wsum)))
        idx = np.resize(np.random.default_rng([seed, 11, i]).permutation(n), want)
        chosen.append(starts[i] + np.sort(idx))
    return np.concatenate(chosen).astype(np.int64)
