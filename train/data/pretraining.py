"""Pre-training data (``causal_lm``): sources → tokens (EOS after every document) → packed
``seq_len`` blocks, mixed by weight, with a held-out validation share; cached."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from train.data.cache import DATA_FORMAT_VERSION, PreparedData, fingerprint, read_cache, source_stamps, write_cache
from train.data.sources import DataError, load_source
from train.data.tokenizer import tokenizer_fingerprint
from train.recipe import Recipe


def _tokenize_batch(batch: dict, tokenizer, eos_id: int) -> dict:
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [x + [eos_id] for x in ids if x]}  # an empty document adds no bare EOS


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


def data_cache_key(recipe: Recipe, tokenizer) -> str:
    d = recipe.data
    return fingerprint({"sources": [asdict(s) for s in d.sources], "files": source_stamps(recipe), "seq_len": d.seq_len,
                  "val_fraction": d.val_fraction, "val_source": d.val_source and asdict(d.val_source),
                  "max_samples": d.max_samples, "tokenizer": tokenizer_fingerprint(tokenizer),
                  "seed": recipe.run.seed, "v": DATA_FORMAT_VERSION})


def prepare_packed(recipe: Recipe, tokenizer, log=print) -> PreparedData:
    """Tokenize and pack the recipe's data once; later calls load the cached Arrow files."""
    d = recipe.data
    key = data_cache_key(recipe, tokenizer)
    out = Path(d.cache_dir).expanduser() / key
    if (out / "stats.json").exists():
        return _cached(out, tokenizer, key, cache_hit=True)
    start = time.time()
    parts, stats = [], {"tokens_total": 0, "tokens_kept": 0, "tokens_dropped": 0}
    for i, src in enumerate(d.sources):
        blocks, st = tokenize_and_pack(load_source(src, f"data.sources[{i}]", d.max_record_mb), tokenizer,
                                       d.seq_len, d.num_proc, f"data.sources[{i}]")
        if len(blocks) == 0:
            raise DataError(f"data.sources[{i}]: {src.path!r} has {st['tokens_total']} tokens, fewer "
                            f"than one sample of data.seq_len={d.seq_len}; lower data.seq_len or add data")
        parts.append((blocks, src.weight))
        for k in stats:
            stats[k] += st[k]
    train = _mix(parts, recipe.run.seed)
    if d.val_source is not None:
        val, _ = tokenize_and_pack(load_source(d.val_source, "data.val_source", d.max_record_mb), tokenizer,
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
    write_cache(out, {"train": train, "val": val}, stats)
    log(f"data: {stats['tokens_kept']:,} tokens kept in {stats['train_samples']:,} train + "
        f"{stats['val_samples']:,} val samples of {d.seq_len}; {stats['tokens_dropped']:,} dropped "
        f"(cache {out})")
    return _cached(out, tokenizer, key, cache_hit=False)


def _cached(out: Path, tokenizer, key: str, cache_hit: bool) -> PreparedData:
    stats, load = read_cache(out, ("train", "val"), ("input_ids",))
    stats["cache_hit"] = cache_hit
    return PreparedData(load("train"), load("val"), tokenizer, key, stats)


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
