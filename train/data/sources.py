"""Data sources: one recipe source → a ``datasets.Dataset`` (its records, or one ``text`` column),
with one-line errors that name the source and the fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from train.data.files import BUILDERS, local_files
from train.recipe import SourceConfig
from train.rundir import first_line


class DataError(ValueError):
    """A data problem with one line naming the source and the fix."""


def load_records(src: SourceConfig, where: str):
    """Load one source as a ``datasets.Dataset`` with its own columns (checked to be non-empty)."""
    import datasets

    files = local_files(src.path)
    if files is not None:
        if not files:
            raise DataError(f"{where}.path: no such file or no txt/json/jsonl/parquet files in "
                            f"{src.path!r}; fix the path")
        kinds = {BUILDERS.get(Path(f).suffix) for f in files}
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
                            f"{first_line(err)}; check the file") from None
    else:
        try:
            ds = datasets.load_dataset(src.path, src.name, split=src.split)
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


def load_source(src: SourceConfig, where: str):
    """Load one source as a ``datasets.Dataset`` with a single ``text`` column."""
    ds = load_records(src, where)
    if src.template is None and src.text_field not in ds.column_names:
        raise DataError(f"{where}.text_field: {src.text_field!r} is not a column of {src.path!r} "
                        f"(columns: {', '.join(ds.column_names)}); set {where}.text_field")
    check_template(src, ds, where)
    template, field_name = src.template, src.text_field

    def to_text(batch: dict, indices: list[int]) -> dict:
        if template is None:
            missing = [i for i, t in zip(indices, batch[field_name]) if t is None]
            if missing:  # str(None) would train on the document "None"
                raise DataError(f"{where}.text_field: record {missing[0] + 1} of {src.path!r} has no "
                                f"{field_name!r} value ({len(missing)} such records in this block); fix "
                                f"the data or set {where}.template")
            return {"text": [str(t) for t in batch[field_name]]}
        rows = [{k: batch[k][i] for k in batch} for i in range(len(indices))]
        return {"text": [template.format_map(r) for r in rows]}

    return ds.map(to_text, batched=True, with_indices=True, remove_columns=ds.column_names,
                  desc=f"{where}: text")
