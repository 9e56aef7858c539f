"""Which local files a data source names; kept free of torch and datasets so the launcher can check
paths quickly."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional

BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
"""File suffix → the ``datasets`` builder that reads it."""


def local_files(path: str) -> Optional[list[str]]:
    """The files a local path, folder or glob names; ``None`` when it is not local (a hub name)."""
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        return sorted(glob.glob(str(p), recursive=True))
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.suffix in BUILDERS and f.is_file())
    if p.exists():
        return [str(p)]
    looks_local = path.startswith((".", "/", "~")) or Path(path).suffix in BUILDERS
    return [] if looks_local else None
