"""The scratch folder of a data preparation: ``datasets``' own cache and temporary files, kept inside
``data.cache_dir`` and removed at the end (nothing else under ``~/.cache``, nothing left behind)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

from train.rundir import process_alive

_SCRATCH: list[list] = []
"""The open :func:`scratch_in` contexts: [folder, made yet]."""
SCRATCH_PREFIX = ".scratch-"


@contextlib.contextmanager
def scratch_in(root: Path):
    """While data is prepared, ``datasets``' own cache (its Arrow copy of each source, ``map``
    results) and the temporary token files go to ``root/.scratch-<host>-<pid>/``, made on first use
    and removed at the end, so nothing is written outside ``data.cache_dir`` and nothing is left.
    Scratch folders of this host's processes that ended without removing theirs are removed first."""
    host = socket.gethostname()
    folder = root / f"{SCRATCH_PREFIX}{host}-{os.getpid()}"
    entry = [folder, False]
    _SCRATCH.append(entry)
    try:
        yield folder
    finally:
        _SCRATCH.remove(entry)
        if entry[1]:
            shutil.rmtree(folder, ignore_errors=True)


def scratch_dir(name: str) -> Optional[Path]:
    """The folder ``name`` in the innermost open :func:`scratch_in` (made now), or ``None`` outside one."""
    if not _SCRATCH:
        return None
    entry = _SCRATCH[-1]
    folder = entry[0]
    if not entry[1]:
        _remove_stale(folder.parent, socket.gethostname())
        entry[1] = True
    (folder / name).mkdir(parents=True, exist_ok=True)
    return folder / name


def _remove_stale(root: Path, host: str) -> None:
    """Remove ``root``'s scratch folders of this host whose process has ended (killed mid-prepare)."""
    for old in root.glob(f"{SCRATCH_PREFIX}{host}-*") if root.is_dir() else []:
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
