"""Packing token streams into ``seq_len`` blocks on disk, and writing prepared splits, in bounded memory.

The packing rule is the one the cache has always held (``DATA_FORMAT_VERSION`` 2): every non-empty
document's ids and one EOS are concatenated, consecutive groups of :data:`GROUP_DOCS` non-empty
documents are cut into ``seq_len`` blocks, and each group's remainder (< ``seq_len`` tokens) is
dropped. Blocks go to a flat int32 file as they fill; a split is then written from those files by
row indices, as the Arrow stream files ``Dataset.save_to_disk`` writes (``input_ids``: list<int32>),
so :class:`train.data.samples.Samples` and ``datasets.load_from_disk`` both read it.
"""

from __future__ import annotations

import json
import mmap
import uuid
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

GROUP_DOCS = 1000
"""Non-empty documents packed together before a remainder is dropped (``datasets.map``'s batch size)."""
WRITE_BYTES = 8 << 20
"""Bytes of blocks buffered before they are written; also the size of an Arrow record batch."""
SHARD_BYTES = 500 << 20
"""Largest Arrow file of a split (``save_to_disk``'s default shard size)."""
FEATURES = {"input_ids": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"}}


class Packer:
    """Packs one source's documents, fed as pieces of ids, into ``seq_len`` blocks in ``path``."""

    def __init__(self, path: Path, seq_len: int, eos_id: int):
        self.path, self.seq_len, self.eos = path, seq_len, np.array([eos_id], dtype=np.int32)
        self.file = open(path, "wb")
        self.parts: list[np.ndarray] = []  # tokens of the current group not yet in a block
        self.held = self.group = 0
        self.doc_has_tokens = False
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.tokens_total = self.blocks = 0

    def add(self, ids: np.ndarray, last: bool) -> None:
        """The ids of one piece of the current document; ``last`` ends the document."""
        if len(ids):
            self._take(ids)
            self.doc_has_tokens = True
        if last and self.doc_has_tokens:  # an empty document adds no bare EOS and is not counted
            self._take(self.eos)
            self.doc_has_tokens = False
            self.group += 1
            if self.group == GROUP_DOCS:
                self._drop_remainder()

    def _take(self, ids: np.ndarray) -> None:
        self.tokens_total += len(ids)
        self.parts.append(ids)
        self.held += len(ids)
        if self.held >= self.seq_len:
            flat = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
            n = len(flat) // self.seq_len
            self._write(flat[: n * self.seq_len])
            self.blocks += n
            rest = flat[n * self.seq_len:]
            self.parts, self.held = ([rest] if len(rest) else []), len(rest)

    def _drop_remainder(self) -> None:
        self.parts, self.held, self.group = [], 0, 0

    def _write(self, tokens: np.ndarray) -> None:
        self.out.append(tokens.astype(np.int32, copy=False).tobytes())
        self.out_bytes += tokens.nbytes
        if self.out_bytes >= WRITE_BYTES:
            self._flush()

    def _flush(self) -> None:
        self.file.write(b"".join(self.out))
        self.out, self.out_bytes = [], 0

    def finish(self) -> dict:
        """Drop the last remainder, close the file; the source's token counts."""
        self._drop_remainder()
        self._flush()
        self.file.close()
        kept = self.blocks * self.seq_len
        return {"tokens_total": self.tokens_total, "tokens_kept": kept, "tokens_dropped": self.tokens_total - kept}


def blocks(path: Path, seq_len: int) -> np.ndarray:
    """The packed blocks of a :class:`Packer` file, memory-mapped (rows × ``seq_len``)."""
    n = path.stat().st_size // (4 * seq_len)
    if n == 0:
        return np.zeros((0, seq_len), dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r", shape=(n, seq_len))


def write_split(folder: Path, parts: list[np.ndarray], index: Optional[np.ndarray], split: str = "train") -> int:
    """Write rows ``index`` of the concatenated ``parts`` (all rows in order when ``None``) as a
    ``save_to_disk`` folder; nothing when there are no rows (as before: an empty split is not
    written). Returns the number of rows."""
    import pyarrow as pa

    starts = np.cumsum([0] + [len(p) for p in parts])
    rows = int(starts[-1]) if index is None else len(index)
    if rows == 0:
        return 0
    seq_len = parts[0].shape[1]
    folder.mkdir(parents=True)
    per_batch = max(1, WRITE_BYTES // (4 * seq_len))
    shards = max(1, -(-rows * (4 * seq_len + 4) // SHARD_BYTES))
    bounds = np.linspace(0, rows, shards + 1).astype(np.int64)
    schema = pa.schema([pa.field("input_ids", pa.list_(pa.int32()))],
                       metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    for shard, name in enumerate(names):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for a, b in _batches(index, int(bounds[shard]), int(bounds[shard + 1]), per_batch):
                values = _gather(parts, starts, np.arange(a, b) if index is None else index[a:b])
                offsets = pa.array(np.arange(0, (b - a + 1) * seq_len, seq_len, dtype=np.int32))
                column = pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))
                writer.write_batch(pa.record_batch([column], schema=schema))
                _release(parts)
    nbytes = rows * (4 * seq_len + 4)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": uuid.uuid4().hex[:16],
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
        "_output_all_columns": False, "_split": split}, indent=2))
    (folder / "dataset_info.json").write_text(json.dumps({
        "builder_name": "shardforge", "citation": "", "config_name": "default", "dataset_name": "shardforge",
        "dataset_size": nbytes, "description": "", "features": FEATURES, "homepage": "", "license": "",
        "splits": {split: {"name": split, "num_bytes": nbytes, "num_examples": rows}},
        "version": {"version_str": "0.0.0", "major": 0, "minor": 0, "patch": 0}}, indent=2))
    return rows


def _batches(index: Optional[np.ndarray], start: int, end: int, per_batch: int) -> Iterator[tuple[int, int]]:
    """[a, b) ranges of at most ``per_batch`` rows whose source rows (ascending) also span at most
    ``per_batch`` rows, so a batch of scattered rows (a validation split) maps a bounded stretch of
    the packed files."""
    a = start
    while a < end:
        b = min(a + per_batch, end)
        if index is not None and index[b - 1] - index[a] >= per_batch:
            b = a + max(1, int(np.searchsorted(index[a:b], index[a] + per_batch)))
        yield a, b
        a = b


def _release(parts: list[np.ndarray]) -> None:
    """Unmap the pages of the memory-mapped parts read so far (they stay in the page cache), so the
    process's resident memory does not grow with the corpus."""
    for part in parts:
        mapped = getattr(part, "_mmap", None)
        if mapped is not None and hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_DONTNEED)


def _gather(parts: list[np.ndarray], starts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows (global numbers, ascending within each part) of the concatenated parts."""
    if len(parts) == 1:
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1:  # a run: one slice
            return np.asarray(parts[0][rows[0]: rows[-1] + 1])
        return parts[0][rows]
    which = np.searchsorted(starts, rows, side="right") - 1
    out = np.empty((len(rows), parts[0].shape[1]), dtype=np.int32)
    for p in np.unique(which):
        mine = which == p
        out[mine] = parts[p][rows[mine] - starts[p]]
    return out
