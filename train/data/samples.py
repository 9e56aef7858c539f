"""A prepared split as the trainer reads it: the cache's Arrow files, memory-mapped, rows gathered
as numpy arrays, without importing ``datasets`` (about 0.35 s of every rank's start-up).

The cache is written by ``datasets`` (``Dataset.save_to_disk``: one Arrow IPC stream per shard,
listed in ``state.json``). Every column of a prepared split is an integer or a fixed-width list of
integers (packed pre-training samples; padded fine-tuning samples), so a row is a slice of a
numpy view of the Arrow buffers, with no copy until a batch is gathered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from train.data.sources import DataError


class Samples:
    """The samples of one split: ``len(samples)`` and ``samples.rows(indices)``."""

    def __init__(self, table: pa.Table, where: str = "samples"):
        self.table = table
        self._columns = {name: _column_view(table.column(name), f"{where}: column {name!r}")
                         for name in table.column_names}

    @classmethod
    def read(cls, directory: Path) -> "Samples":
        """The split ``datasets`` saved in ``directory``, memory-mapped."""
        state = json.loads((directory / "state.json").read_text())
        tables = [pa.ipc.open_stream(pa.memory_map(str(directory / f["filename"]))).read_all()
                  for f in state["_data_files"]]
        return cls(pa.concat_tables(tables) if len(tables) > 1 else tables[0], str(directory))

    @classmethod
    def from_dict(cls, columns: dict[str, Sequence]) -> "Samples":
        """Samples from Python lists (an empty split: ``{name: []}``)."""
        return cls(pa.table({name: pa.array(values, type=None if len(values) else pa.int64())
                             for name, values in columns.items()}))

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``indices`` (in that order, repeats allowed) of every column: 1-D for integer
        columns, 2-D (rows × width) for list columns."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample indices {idx.min()}..{idx.max()} outside the {len(self)} samples")
        return {name: _gather(starts, chunks, idx) for name, (starts, chunks) in self._columns.items()}


def _column_view(column: pa.ChunkedArray, where: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(first row of each chunk, each chunk as a numpy view): 1-D for integers, 2-D for fixed-width
    integer lists."""
    views = []
    for chunk in column.chunks:
        if not len(chunk):
            continue
        if chunk.null_count:
            raise DataError(f"{where} has missing values; delete that cache directory and prepare again")
        if pa.types.is_integer(chunk.type):
            views.append(chunk.to_numpy(zero_copy_only=True))
            continue
        if not (pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type)) \
                or not pa.types.is_integer(chunk.type.value_type):
            raise DataError(f"{where} holds {chunk.type}, not integers or lists of integers; "
                            f"delete that cache directory and prepare again")
        offsets = chunk.offsets.to_numpy()
        widths = np.diff(offsets)
        if (widths != widths[0]).any():
            raise DataError(f"{where} holds lists of {widths.min()} to {widths.max()} tokens, not one width; "
                            f"delete that cache directory and prepare again")
        values = chunk.flatten().to_numpy(zero_copy_only=True)
        views.append(values.reshape(len(chunk), int(widths[0])))
    if len({v.shape[1:] for v in views}) > 1:
        raise DataError(f"{where} changes width between Arrow chunks; delete that cache directory and prepare again")
    starts = np.cumsum([0, *(len(v) for v in views[:-1])]).astype(np.int64)
    return starts, views


def _gather(starts: np.ndarray, chunks: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    if len(chunks) == 1:
        return chunks[0][idx]
    if not chunks:
        return np.zeros((0,), dtype=np.int64)
    which = np.searchsorted(starts, idx, side="right") - 1
    out = np.empty((len(idx), *chunks[0].shape[1:]), dtype=chunks[0].dtype)
    for c in np.unique(which):
        mine = which == c
        out[mine] = chunks[c][idx[mine] - starts[c]]
    return out
