"""A pre-training source as a stream of documents, each a stream of text blocks, in bounded memory.

A ``.txt`` file is one document, read a block at a time exactly as ``datasets``' text builder reads
it whole (UTF-8, universal newlines), so a file of any size never sits in memory at once. Other
formats are records: ``datasets`` converts them to Arrow (in the scratch folder of the data cache,
see :func:`train.data.cache.scratch_in`) and each record's text is read from the memory-mapped
table one record at a time; a record is one document.
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import Callable, Iterator, Optional, cast

from train.data.files import file_format, local_files, saved_dataset
from train.data.sources import DataError, check_local, record_texts, text_records
from train.config.recipe import SourceConfig

logger = logging.getLogger("shardforge")

READ_CHARS = 1 << 20
"""Characters of a text file read at a time."""
RECORD_BLOCK = 1000
"""Records checked for missing values at a time (as ``datasets.map`` batches did)."""


class Progress:
    """Bytes (or records) read and tokens made, with a rate and an ETA, logged every ``every_s``."""

    def __init__(self, where: str, every_s: float = 10.0):
        self.where, self.every_s = where, every_s
        self.total, self.unit, self.done, self.tokens = 0, "bytes", 0, 0
        self.start = self.last = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            logger.info(self.line(now))

    def line(self, now: Optional[float] = None) -> str:
        spent = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / spent
        if self.unit == "bytes":
            amount = f"{self.done / 2**20:,.1f}/{self.total / 2**20:,.1f} MiB, {rate / 2**20:.2f} MiB/s"
        else:
            amount = f"{self.done:,}/{self.total:,} records, {rate:,.0f} records/s"
        share = min(self.done / self.total, 1.0) if self.total else 0.0
        eta = f", ETA {_clock((self.total - self.done) / rate)}" if rate > 0 and self.total > self.done else ""
        return (f"{self.where}: tokenize {share:.0%} ({amount}, {self.tokens / 1e6:,.1f}M tokens, "
                f"{self.tokens / spent / 1e6:.2f}M tokens/s{eta})")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def streams_text(src: SourceConfig, fmt: Optional[str]) -> bool:
    """Whether the source is plain text files read a block at a time (no template, no other column)."""
    return fmt == "text" and src.template is None and src.text_field == "text"


def documents(src: SourceConfig, where: str, max_record_mb: int,
              progress: Optional[Progress] = None) -> Iterator[Iterator[str]]:
    """The source's documents in order, each as an iterator of text blocks (never all at once)."""
    files = local_files(src.path)
    if files and saved_dataset(src.path) is None and streams_text(src, file_format(files[0])):
        local = check_local(src, where, max_record_mb)  # what load_records checks, then read here
        assert local is not None  # a local source (files were found)
        files = local[0]
        if progress is not None:
            progress.total, progress.unit = sum(os.path.getsize(f) for f in files), "bytes"
        base = [0]
        for f in files:
            yield _file_blocks(f, src, where, progress, base)
            base[0] += os.path.getsize(f)
        return
    yield from _records(src, where, max_record_mb, progress)


def _file_blocks(path: str, src: SourceConfig, where: str, progress: Optional[Progress],
                 base: list) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:  # datasets' text builder: universal newlines, strict UTF-8
            while block := f.read(READ_CHARS):
                if progress is not None:
                    progress.done = base[0] + cast(io.BufferedReader, f.buffer).tell()
                yield block
    except UnicodeDecodeError as err:
        raise DataError(f"{where}.path: could not read {src.path!r} as text: {path!r} is not UTF-8 "
                        f"({err.reason}); convert it to UTF-8") from None


def _records(src: SourceConfig, where: str, max_record_mb: int,
             progress: Optional[Progress]) -> Iterator[Iterator[str]]:
    ds = text_records(src, where, max_record_mb)
    if progress is not None:
        progress.total, progress.unit = len(ds), "records"
    start = 0
    for table in ds.with_format("arrow").iter(batch_size=RECORD_BLOCK):
        for i, text in enumerate(record_texts(src, where, table.to_pydict(), start)):
            yield iter((text,))
            _advance(progress, start + i + 1)
        start += table.num_rows


def _advance(progress: Optional[Progress], done: int) -> None:
    if progress is not None:
        progress.done = done


def leading_text(src: SourceConfig, where: str, max_record_mb: int, limit: int) -> Iterator[str]:
    """The source's documents cut to at most ``limit`` characters in all (a tokenizer's training text):
    only what is used is read."""
    seen = 0
    for blocks in documents(src, where, max_record_mb):
        parts, length = [], 0
        for block in blocks:
            parts.append(block[: limit - seen - length])
            length += len(parts[-1])
            if seen + length >= limit:
                break
        seen += length
        yield "".join(parts)
        if seen >= limit:
            return
