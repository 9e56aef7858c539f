"""Data sources: one recipe source → a ``datasets.Dataset`` (its records, or one ``text`` column),
with one-line errors that name the source and the fix."""

from __future__ import annotations

import os
from typing import Any, Optional

from train.data.files import (file_format, local_files, path_problem, saved_data_files, saved_dataset,
                              saved_splits)
from train.data.scratch import scratch_dir
from train.config.recipe import SourceConfig
from train.rundir import first_line


class DataError(ValueError):
    """A data problem with one line naming the source and the fix."""


READERS: dict[str, tuple[str, dict[str, Any]]] = {
    "text": ("text", {"sample_by": "document"}),  # a text file is one document
    "json": ("json", {}),
    # keep_default_na=False: a cell "NA", "null" or "None" is that text, and an empty one is "", not a
    # missing value
    "csv": ("csv", {"keep_default_na": False}),
    "tsv": ("csv", {"keep_default_na": False, "sep": "\t"}),
    "parquet": ("parquet", {}),
    "arrow": ("arrow", {}),  # a folder written by save_to_disk
}
"""Format (:data:`train.data.files.FORMATS`) → the ``datasets`` builder that reads it, and its options."""


LINE_FORMATS = ("json", "csv", "tsv")
"""Formats read a record (a line) at a time, whose parsers need many times a line's size in memory."""


def overlong_line(path: str, limit: int) -> Optional[int]:
    """The number of the first line of ``path`` longer than ``limit`` bytes, or ``None``. Holds at
    most ``limit`` + 1 bytes of a line in memory."""
    with open(path, "rb") as f:
        number = 0
        while line := f.readline(limit + 1):
            number += 1
            if len(line) > limit and not line.endswith(b"\n"):
                return number
    return None


def check_local(src: SourceConfig, where: str, max_record_mb: int = 16) -> Optional[tuple[list[str], str]]:
    """(files, format) of a local source, checked as :func:`load_records` reads it (path, permissions,
    not all empty, no overlong line), or ``None`` for a hub dataset."""
    files = local_files(src.path)
    if files is None:
        return None
    problem = path_problem(where, src.path, src.split)
    if problem:
        raise DataError(problem)
    folder = saved_dataset(src.path)
    if folder is not None:  # read as Arrow files, like any local file: the user's folder stays as it is
        splits = saved_splits(folder)
        files, fmt = saved_data_files(folder if splits is None else folder / src.split), "arrow"
    else:
        fmt = file_format(files[0]) or ""  # path_problem refused a file of no known format
    for f in files:
        if not os.access(f, os.R_OK):
            raise DataError(f"{where}.path: cannot read {f!r}; check its permissions")
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"{where}: {src.path!r} is empty; point it at non-empty data")
    if fmt in LINE_FORMATS:
        for f in files:
            if (line := overlong_line(f, max_record_mb << 20)) is not None:
                raise DataError(f"{where}.path: line {line} of {f!r} is longer than data.max_record_mb="
                                f"{max_record_mb} MiB; split that record, or raise data.max_record_mb")
    return files, fmt


def load_records(src: SourceConfig, where: str, max_record_mb: int = 16):
    """Load one source as a ``datasets.Dataset`` with its own columns (checked to be non-empty).
    Inside :func:`train.data.cache.scratch_in`, datasets keeps its Arrow copy in that scratch folder."""
    import datasets

    scratch = scratch_dir("datasets")
    cache_dir = str(scratch) if scratch is not None else None
    local = check_local(src, where, max_record_mb)
    if local is not None:
        files, fmt = local
        builder, kwargs = READERS[fmt]
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
        except Exception as err:  # datasets wraps parser errors in many types
            raise DataError(f"{where}.path: could not read {src.path!r} as {fmt}: "
                            f"{first_line(err)}; check the file") from None
    else:
        try:
            ds = datasets.load_dataset(src.path, src.name, split=src.split, cache_dir=cache_dir)
        except Exception as err:
            raise DataError(f"{where}.path: could not load hub dataset {src.path!r} "
                            f"(split {src.split!r}): {first_line(err)}") from None
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


def _holds(feature: Any) -> str:
    """What a column of this ``datasets`` feature holds, in words."""
    if isinstance(feature, dict):
        return f"mappings ({', '.join(feature)})"
    if hasattr(feature, "feature"):  # List, LargeList (and Sequence, which makes a List)
        return f"lists of {_holds(feature.feature)}"
    if isinstance(feature, list) and feature:
        return f"lists of {_holds(feature[0])}"
    dtype = getattr(feature, "dtype", None)
    return f"{dtype} values" if dtype else type(feature).__name__


def check_text_column(src: SourceConfig, ds, where: str) -> None:
    """Refuse, in one line, a ``text_field`` column that holds no text (chat messages, mappings,
    numbers): ``str()`` of it would train on Python's spelling of a list. Read from the column's
    type, so it costs nothing and fails before a tokenizer is trained on it."""
    feature = ds.features[src.text_field]
    if getattr(feature, "dtype", None) in ("string", "large_string", "null"):  # null: every value missing,
        return  # which to_text names per record
    first = repr(ds[0][src.text_field])
    first = first if len(first) <= 60 else first[:57] + "..."
    raise DataError(f"{where}.text_field: column {src.text_field!r} of {src.path!r} holds "
                    f"{_holds(feature)}, not text (first record: {first}); pre-training reads text: set "
                    f"{where}.text_field to a text column or {where}.template to render the record; "
                    f"chat/messages data needs task: sft (with data.messages_field={src.text_field})")


def text_records(src: SourceConfig, where: str, max_record_mb: int = 16):
    """The source's records (a ``datasets.Dataset``), checked to give text: the text field is a
    column of text, or the template fits the columns."""
    ds = load_records(src, where, max_record_mb)
    if src.template is None and src.text_field not in ds.column_names:
        raise DataError(f"{where}.text_field: {src.text_field!r} is not a column of {src.path!r} "
                        f"(columns: {', '.join(ds.column_names)}); set {where}.text_field")
    if src.template is None:
        check_text_column(src, ds, where)
    check_template(src, ds, where)
    return ds


def record_texts(src: SourceConfig, where: str, batch: dict[str, list], first: int) -> list[str]:
    """The documents of a block of records (column → values; ``first``: the block's first record's
    index): the text field, or the template filled with each record."""
    if src.template is None:
        values = batch[src.text_field]
        missing = [first + i for i, t in enumerate(values) if t is None]
        if missing:  # str(None) would train on the document "None"
            raise DataError(f"{where}.text_field: record {missing[0] + 1} of {src.path!r} has no "
                            f"{src.text_field!r} value ({len(missing)} such records in this block); fix "
                            f"the data or set {where}.template")
        return [str(t) for t in values]
    rows = len(next(iter(batch.values()), []))
    return [src.template.format_map({k: batch[k][i] for k in batch}) for i in range(rows)]


def load_source(src: SourceConfig, where: str, max_record_mb: int = 16):
    """Load one source as a ``datasets.Dataset`` with a single ``text`` column."""
    ds = text_records(src, where, max_record_mb)

    def to_text(batch: dict, indices: list[int]) -> dict:
        return {"text": record_texts(src, where, batch, indices[0] if indices else 0)}

    return ds.map(to_text, batched=True, with_indices=True, remove_columns=ds.column_names,
                  desc=f"{where}: text")
