"""The checkpoint format on disk: step directories, the manifest (the commit marker) with a
digest per file, hashing as files are written, verification, and listing what is committed.
Nothing here needs a process group: ``export`` and the tests read checkpoints offline."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import xxhash

logger = logging.getLogger("shardforge")

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
DIGEST = "xxh3_128"
"""The manifest's per-file digest: xxh3-128 runs at memory speed, so hashing adds little to a save
or a load. It detects corruption (a torn, truncated or bit-flipped file), not tampering: loading
is weights-only (``train.checkpoint.safe_load``), so a forged file can hold data, never code. Manifests
written before this field existed used sha256 and are still verified with it."""


MANIFEST_FORMAT = 2
"""Format 2 manifests record each file's size (checked before any byte is hashed) and carry their
own digest (``manifest_digest``), so an edited or damaged manifest is refused as such. Manifests
without ``format`` were written before both and are verified as before."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from as asked: one line for the user, exit 2."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def new_hash(algorithm: str = DIGEST):
    """A streaming hasher for ``algorithm`` (``xxh3_128``, or ``sha256`` for older manifests)."""
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checkpoint digest {algorithm!r}; expected xxh3_128 or sha256")


def file_digest(path: Path, algorithm: str = DIGEST) -> str:
    h = new_hash(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "manifest_digest"}
    h = new_hash(DIGEST)
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def sealed_manifest(record: dict, ckpt: Path) -> dict:
    """``record`` (with ``files``: path → digest) as a format-2 manifest: the size of each listed
    file under ``ckpt`` and the manifest's own digest added."""
    body = {k: v for k, v in record.items() if k not in ("manifest_digest", "sizes")}
    body.update(format=MANIFEST_FORMAT, sizes={rel: (ckpt / rel).stat().st_size for rel in record["files"]})
    return {**body, "manifest_digest": _manifest_digest(body)}


def _seal_problem(record: dict) -> Optional[str]:
    """What is wrong with a format-2 manifest's seal or sizes (the rest of a line), or ``None``."""
    if record.get("format", 1) == 1 and "manifest_digest" not in record:
        return None  # written before the seal existed
    if record.get("format") != MANIFEST_FORMAT or record.get("manifest_digest") != _manifest_digest(record):
        return "does not match its own digest (edited or damaged after the save)"
    sizes, files = record.get("sizes"), record["files"]
    if (not isinstance(sizes, dict) or set(sizes) != set(files)
            or not all(type(n) is int and n >= 0 for n in sizes.values())):
        return "gives no byte size for each file it lists"
    return None


def io_threads() -> int:
    """Threads per rank for writing and hashing checkpoint files: this rank's share of the CPUs, 1-4.

    Reading (and hashlib's sha256) release the GIL, so files are read and hashed in parallel.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, cpus // local))


def file_digests(paths: list[Path], algorithm: str = DIGEST) -> list[str]:
    """The digest of each file, :func:`io_threads` at a time."""
    if len(paths) <= 1:
        return [file_digest(p, algorithm) for p in paths]
    with ThreadPoolExecutor(min(io_threads(), len(paths))) as pool:
        return list(pool.map(lambda p: file_digest(p, algorithm), paths))


class HashingStream:
    """A file being written whose bytes also feed the digest on their way out (hash-on-write), so a
    save need not read its files back to checksum them. A seek voids the digest (then the file is
    hashed from disk as usual)."""

    def __init__(self, raw):
        self.raw, self.hash, self.sequential = raw, new_hash(), True

    def write(self, data) -> int:
        self.hash.update(data)
        return self.raw.write(data)

    def seek(self, *args) -> int:
        self.sequential = False
        return self.raw.seek(*args)

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


def hashing_file_system(digests: dict[str, str]):
    """DCP's local file system, recording the digest of every file it writes into ``digests``
    (absolute path → hex digest). Built on first use: importing DCP costs seconds, and only a
    save needs it."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        @contextmanager
        def create_stream(self, path, mode: str):
            if "w" not in mode:
                with super().create_stream(path, mode) as reading:
                    yield reading
                return
            with Path(path).open(mode) as raw:
                stream = HashingStream(raw)
                yield stream
            if stream.sequential:
                digests[str(Path(path).absolute())] = stream.hash.hexdigest()

        def rename(self, path, new_path) -> None:
            super().rename(path, new_path)
            digest = digests.pop(str(Path(path).absolute()), None)
            if digest:
                digests[str(Path(new_path).absolute())] = digest

    return HashingFileSystem()


def dcp_writer(directory: Path, digests: dict[str, str]):
    """DCP's file writer (fsyncing each file, :func:`io_threads` files at once) that hashes as it writes."""
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(str(directory), thread_count=io_threads())
    writer.fs = hashing_file_system(digests)
    return writer


# files written by one rank: DCP's data files, DeepSpeed's ZeRO shards, our per-rank state
_RANK_FILE = re.compile(r"(?:__(\d+)_\d+\.distcp|zero_pp_rank_(\d+)_mp_rank_\d+_\w+\.pt|rank-(\d+)\.pt)$")


def share_of(files: list[str], rank: int, world: int) -> list[str]:
    """This rank's share of ``files`` to fsync or hash: what rank r wrote goes to rank r (on shared
    storage each node then reads its own shards once: the checksum read leaves them in its page
    cache for the load); the rest are dealt out in turn."""
    own, rest = [], []
    for rel in sorted(files):
        m = _RANK_FILE.search(rel)
        writer = int(next(g for g in m.groups() if g is not None)) if m else None
        if writer is None or writer >= world:
            rest.append(rel)
        elif writer == rank:
            own.append(rel)
    return own + rest[rank::world]


def verify(ckpt: Path, rank: int = 0, world: int = 1) -> Optional[str]:
    """``None`` when ``ckpt`` is committed and intact, else one line saying what is wrong.

    With ``world`` > 1 this checks only this rank's share of the files (:func:`share_of`), so
    ranks verify a large checkpoint in parallel.
    """
    manifest = ckpt / MANIFEST
    if not manifest.exists():
        return f"{ckpt}: no {MANIFEST} (the save never committed)"
    try:
        record = json.loads(manifest.read_text())
        files, saved_world = record["files"], record["world_size"]
        algorithm = record.get("digest", "sha256")  # manifests before the field: sha256
        new_hash(algorithm)
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{ckpt}: {MANIFEST} is unreadable"
    if (problem := manifest_problem(files, saved_world) or _seal_problem(record)) is not None:
        return f"{ckpt}: {MANIFEST} {problem}"
    unlisted = unlisted_files(ckpt, files, saved_world)
    if unlisted:  # a loader would open it unchecked
        return f"{ckpt}: {unlisted} is not listed in {MANIFEST} (added or renamed after the save?)"
    mine = [(rel, files[rel]) for rel in share_of(list(files), rank, world)]
    inside = ckpt.resolve()
    for rel, _ in mine:
        path = ckpt / rel
        if not path.exists() and not path.is_symlink():
            return f"{ckpt}: {rel} is missing"
        if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(inside):
            return f"{ckpt}: {rel} is not a regular file of the checkpoint (a link, device or folder); never read"
        if "sizes" in record and (size := path.stat().st_size) != record["sizes"][rel]:  # before hashing it
            return (f"{ckpt}: {rel} holds {size:,} bytes, {MANIFEST} says {record['sizes'][rel]:,} "
                    f"(truncated or altered)")
    for (rel, digest), actual in zip(mine, file_digests([ckpt / rel for rel, _ in mine], algorithm)):
        if actual != digest:
            return f"{ckpt}: {rel} does not match its {algorithm} digest in {MANIFEST} (truncated or altered)"
    if "dcp/.metadata" in dict(mine):
        from train.checkpoint.safe_load import dcp_size_problem

        if (problem := dcp_size_problem(ckpt / "dcp")) is not None:
            return f"{ckpt}: {problem}"
    return None


MAX_WORLD = 1 << 20
"""More ranks than any job has: a manifest saying so was edited."""


def manifest_problem(files, saved_world) -> Optional[str]:
    """What makes a manifest's file list or world size unusable (the rest of a line), or ``None``:
    every listed path must stay inside the checkpoint, and the world size be a count of ranks."""
    if isinstance(saved_world, bool) or not isinstance(saved_world, int) or not 1 <= saved_world <= MAX_WORLD:
        return f"gives world_size {repr(saved_world)[:40]}, not a count of ranks (1 to {MAX_WORLD:,})"
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return "lists its files as something other than path: digest pairs"
    for rel in files:
        parts = rel.split("/")
        if not rel or rel.startswith("/") or "\\" in rel or ".." in parts or "" in parts or "\x00" in rel:
            return f"lists {rel[:80]!r}, a path outside the checkpoint or not a plain relative one"
    return None


DERIVED = ("deepspeed/state_universal/", "deepspeed/.tmp-state_universal/")
"""Made from the verified files at resume (a ZeRO reshard), always anew; never read as saved."""


def unlisted_files(ckpt: Path, files: dict, saved_world: int) -> Optional[str]:
    """The first file the loaders could open that the manifest does not list (every file on disk,
    and each rank's ``rank-XXXXX.pt`` of the world that saved it), or ``None``."""
    expected = {f"rank-{r:05d}.pt" for r in range(saved_world)}
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST}
    for rel in sorted(expected | on_disk):
        if rel not in files and not rel.startswith(DERIVED):
            return rel
    return None


def committed_checkpoints(root: Path) -> list[Path]:
    """Directories with a manifest, oldest first (not yet checksum-verified). A step directory that
    is a symbolic link is none of them (see :func:`linked_steps`)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and not p.is_symlink() and (p / MANIFEST).exists()]
    return [p for _, p in sorted(found)]


def linked_steps(root: Path) -> list[str]:
    """``step-N -> target`` for each step directory under ``root`` that is a symbolic link. Such a
    link may point at another run's checkpoint: it is never resumed from, exported, pruned or
    written through (pruning would uncommit and delete what it points at), only reported."""
    if not root.is_dir():
        return []
    return [f"{p.name} -> {os.readlink(p)}" for p in sorted(root.iterdir())
            if p.is_symlink() and (STEP_DIR.match(p.name) or p.name.startswith(".tmp-step-"))]


def links_note(root: Path) -> Optional[str]:
    """One line naming the step links under ``root`` that are left alone; ``None`` without any."""
    links = linked_steps(root)
    if not links:
        return None
    return (f"checkpoint: ignoring {len(links)} symbolic link(s) among the step directories of {root} "
            f"({', '.join(links)}): a link is never resumed from, exported, pruned or written through; "
            f"move the checkpoint into the run, or remove the link")


def newest_valid(candidates: list[Path], check: Callable[[Path], Optional[str]] = verify,
                 ) -> tuple[Optional[Path], list[str]]:
    """The newest of ``candidates`` (oldest first) that ``check`` passes, and the problem of each
    newer one (newest first), each also logged as a warning. The one search for a checkpoint to
    resume from or export: offline with :func:`verify`, in a run with the ranks sharing the work."""
    problems: list[str] = []
    for ckpt in reversed(candidates):
        problem = check(ckpt)
        if problem is None:
            return ckpt, problems
        logger.warning(f"checkpoint: skipping {problem}; trying the previous one")
        problems.append(problem)
    return None, problems


def latest_valid(root: Path) -> Optional[Path]:
    """The newest committed checkpoint under ``root`` whose files pass their checksums."""
    return newest_valid(committed_checkpoints(root), verify)[0]
