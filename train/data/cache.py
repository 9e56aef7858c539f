"""The prepared-data cache: a directory per fingerprint of everything that shapes the samples,
written under a temporary name and renamed into place, so readers never see half of it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from train.data.files import local_files
from train.config.recipe import Recipe

DATA_FORMAT_VERSION = 2
"""Bump when packed pre-training samples change for the same recipe (old caches are then ignored).
2: empty documents no longer add a bare EOS."""


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data: the name of a cache directory."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class PreparedData:
    train: Any
    """Packed training samples (a :class:`train.data.samples.Samples` of ``input_ids``)."""
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
    """(file, size, mtime) of every local data file, so editing data in place refreshes the cache: the
    files of a path, folder or glob in every format, and of a ``save_to_disk`` folder the files it
    wrote (saving again rewrites them; the ``cache-*`` files ``datasets`` may add are left out, or
    every read would change the key)."""
    d = recipe.data
    stamps = []
    for src in [*d.sources, d.val_source, d.test_source]:
        for f in (local_files(src.path) or []) if src is not None else []:
            st = os.stat(f)
            stamps.append([f, st.st_size, st.st_mtime_ns])
    return stamps


def staging(out: Path) -> Path:
    """The temporary folder a cache entry is written in before :func:`publish` renames it."""
    tmp = out.with_name(out.name + f".tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def publish(tmp: Path, out: Path, stats: dict) -> None:
    """Write ``stats.json`` into ``tmp`` and rename it to ``out`` (another process that got there first
    wins; its copy is kept)."""
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    if out.exists():
        shutil.rmtree(tmp)
        return
    try:
        os.replace(tmp, out)
    except OSError:  # renamed there between the check and now
        if not (out / "stats.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def write_cache(out: Path, splits: dict, stats: dict) -> None:
    """Save the non-empty ``datasets`` ``splits`` and ``stats.json`` into ``out`` atomically."""
    tmp = staging(out)
    for name, split in splits.items():
        if len(split):  # an empty split is not written (datasets cannot reload one)
            split.flatten_indices().save_to_disk(str(tmp / name))
    publish(tmp, out, stats)


def read_cache(out: Path, names: tuple[str, ...], columns: tuple[str, ...]) -> tuple[dict, Callable]:
    """(``stats.json`` with ``cache_hit`` unset, ``load(name)``: a :class:`Samples`); a missing
    split loads empty."""
    from train.data.samples import Samples

    def load(name: str) -> Samples:
        if not (out / name).exists():
            return Samples.from_dict({c: [] for c in columns})
        return Samples.read(out / name)

    return json.loads((out / "stats.json").read_text()), load
