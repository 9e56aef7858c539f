"""Which local files a data source names, and whether shardforge can read them; kept free of torch
and datasets so the launcher can check paths quickly (``plan`` refuses what the ranks could not read)."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Optional

FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet"}
"""File suffix (any case) → its format; ``train.data.sources`` reads each with a ``datasets`` builder.
A folder written by ``Dataset.save_to_disk`` is the format ``arrow`` (see :func:`saved_dataset`)."""

SUPPORTED = f"{' '.join(FORMATS)} files, or a folder written by Dataset.save_to_disk"
"""What a source may be, for the messages that refuse one."""

LOCAL_LOOKING = (".xlsx", ".xls", ".ods", ".docx", ".doc", ".pdf", ".xml", ".html", ".zip", ".gz",
                 ".tar", ".arrow", ".pkl", ".npy")
"""Suffixes of files users have but shardforge cannot read: a missing ``data.xlsx`` is a missing file
to fix, not a hub dataset name."""


def file_format(path: str) -> Optional[str]:
    """The format of one data file by its suffix, or ``None`` when shardforge cannot read it."""
    return FORMATS.get(Path(path).suffix.lower())


def saved_dataset(path: str) -> Optional[Path]:
    """The folder, when ``path`` is one that ``Dataset.save_to_disk`` (``state.json``) or
    ``DatasetDict.save_to_disk`` (``dataset_dict.json``) wrote; else ``None``."""
    p = Path(path).expanduser()
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
        return p
    return None


def saved_splits(folder: Path) -> Optional[list[str]]:
    """The splits of a saved ``DatasetDict`` (``[]`` when its ``dataset_dict.json`` is unreadable), or
    ``None`` for a saved ``Dataset``, which has no splits."""
    if not (folder / "dataset_dict.json").is_file():
        return None
    try:
        return [str(s) for s in json.loads((folder / "dataset_dict.json").read_text())["splits"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def saved_data_files(folder: Path) -> list[str]:
    """The Arrow files of a saved ``Dataset`` in their order, as its ``state.json`` lists them (the
    ``cache-*.arrow`` files ``datasets`` may add beside them are not data)."""
    try:
        names = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):  # datasets says what is wrong when it reads it
        return sorted(str(f) for f in folder.glob("data-*.arrow"))
    return [str(folder / name) for name in names]


def _saved_files(folder: Path) -> list[str]:
    """Every file ``save_to_disk`` wrote (all splits): what a change of the data shows in."""
    splits = saved_splits(folder)
    parts = [folder] if splits is None else [folder / s for s in splits]
    files = [str(folder / "dataset_dict.json")] if splits is not None else []
    for part in parts:
        files += [str(part / name) for name in ("state.json", "dataset_info.json") if (part / name).is_file()]
        files += [f for f in saved_data_files(part) if Path(f).is_file()]
    return files


def local_files(path: str) -> Optional[list[str]]:
    """The files a local path, folder or glob names; ``None`` when it is not local (a hub name).

    A folder yields its readable data files (others, such as a README, are left out); a file or a
    glob yields what it names, readable or not (:func:`path_problem` refuses the others); a folder
    written by ``save_to_disk`` yields the files it wrote.
    """
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        return sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if saved_dataset(path):
        return _saved_files(p)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if file_format(str(f)) and f.is_file())
    if p.exists():
        return [str(p)]
    looks_local = path.startswith((".", "/", "~")) or Path(path).suffix.lower() in (*FORMATS, *LOCAL_LOOKING)
    return [] if looks_local else None


def path_problem(where: str, path: str, split: str) -> Optional[str]:
    """One line saying what stops the local source ``where`` (``data.sources[0]``) from being read,
    or ``None``; a hub name is left to ``datasets``."""
    folder = saved_dataset(path)
    if folder is not None:
        splits = saved_splits(folder)
        if splits is not None and split not in splits:
            return (f"{where}.split: {split!r} is not a split of the DatasetDict saved in {path!r} "
                    f"(splits: {', '.join(splits) or 'none readable'}); set {where}.split to one of them")
        return None
    files = local_files(path)
    if files is None:
        return None
    if not files:
        p = Path(path).expanduser()
        others = sorted({f.suffix.lower() or f.name for f in p.rglob("*") if f.is_file()}) if p.is_dir() else []
        held = f" (it holds {' '.join(others[:8])})" if others else ""
        return f"{where}.path: no such file or no {' '.join(FORMATS)} files in {path!r}{held}; fix the path"
    saved = [Path(f).parent for f in files if Path(f).name == "state.json" and saved_dataset(str(Path(f).parent))]
    saved = [s.parent if (s.parent / "dataset_dict.json").is_file() else s for s in saved]  # a split's DatasetDict
    if saved:  # its json files are not records: read as json they fail
        return (f"{where}.path: {path!r} holds a dataset written by save_to_disk in {str(saved[0])!r}; make that "
                f"folder a source of its own")
    unreadable = [f for f in files if file_format(f) is None]
    if unreadable:
        f = unreadable[0]
        kind = f"a {Path(f).suffix} file" if Path(f).suffix else "a file without a suffix"
        return (f"{where}.path: {f!r} is {kind}, which shardforge cannot read; convert it to one of "
                f"{SUPPORTED}")
    formats = sorted({fmt for f in files if (fmt := file_format(f)) is not None})  # all are, here
    if len(formats) > 1:
        return (f"{where}.path: {path!r} mixes {' and '.join(formats)} files; one source reads one format: "
                f"split it into one source per format")
    return None
