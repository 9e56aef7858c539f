"""Atomic, verified checkpoints.

Commit protocol for ``checkpoints/step-000120``:

1. every rank writes into the sibling ``checkpoints/.tmp-step-000120``
   (the engine's sharded state plus one small ``rank-XXXXX.pt`` per rank);
2. every file is fsynced and hashed (DCP's writer hashes its files as it writes them, in
   :func:`io_threads` threads; the ranks share out the rest); rank 0 renames the directory
   to ``step-000120``;
3. rank 0 writes ``manifest.json`` (step, tokens, world size, engine, recipe hash,
   sha256 per file) last, atomically: the manifest *is* the commit marker.

Only directories with a manifest whose checksums match count as checkpoints.
Pruning happens only after the new checkpoint is committed: a pruned checkpoint loses its
manifest first, then rank 0 deletes its files in a thread while training goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from train.distributed import all_ranks_agree
from train.faults import fault_point

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Counters:
    """Progress counters saved with every checkpoint."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_s}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.elapsed_s = state["step"], state["tokens"], state["elapsed_s"]


class RNGState:
    """Python, numpy, torch CPU and CUDA generator states of this rank."""

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        return {"python": random.getstate(),
                "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])


class PendingSave(NamedTuple):
    """A save whose engine state is being written in the background, and what its commit needs."""

    future: Any
    step: int
    keep_last: int
    keep_every: int
    extra_manifest: dict
    protect: set
    started: float


class CheckpointError(RuntimeError):
    pass


class CheckpointSaveError(CheckpointError):
    """A save failed on some rank; nothing of it was committed."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:200] if text else type(err).__name__)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def io_threads() -> int:
    """Threads per rank for writing and hashing checkpoint files: this rank's share of the CPUs, 1-4.

    hashlib releases the GIL on large buffers, so sha256 runs in parallel across threads.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, cpus // local))


def sha256_files(paths: list[Path]) -> list[str]:
    """sha256 of each file, :func:`io_threads` at a time."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(min(io_threads(), len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


class _HashingStream:
    """A file being written whose bytes also feed sha256 on their way out (hash-on-write), so a save
    need not read its files back to checksum them. A seek voids the digest (then the file is hashed
    from disk as usual)."""

    def __init__(self, raw):
        self.raw, self.hash, self.sequential = raw, hashlib.sha256(), True

    def write(self, data) -> int:
        self.hash.update(data)
        return self.raw.write(data)

    def seek(self, *args) -> int:
        self.sequential = False
        return self.raw.seek(*args)

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


class _HashingFileSystem(FileSystem):
    """DCP's local file system, recording the sha256 of every file it writes into ``digests``
    (absolute path → hex digest)."""

    def __init__(self, digests: dict[str, str]):
        super().__init__()
        self.digests = digests

    @contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with Path(path).open(mode) as raw:
            stream = _HashingStream(raw)
            yield stream
        if stream.sequential:
            self.digests[str(Path(path).absolute())] = stream.hash.hexdigest()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        digest = self.digests.pop(str(Path(path).absolute()), None)
        if digest:
            self.digests[str(Path(new_path).absolute())] = digest


def dcp_writer(directory: Path, digests: dict[str, str]) -> FileSystemWriter:
    """DCP's file writer (fsyncing each file, :func:`io_threads` files at once) that hashes as it writes."""
    writer = FileSystemWriter(str(directory), thread_count=io_threads())
    writer.fs = _HashingFileSystem(digests)
    return writer


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


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
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return f"{ckpt}: {MANIFEST} is unreadable"
    mine = [(rel, files[rel]) for rel in share_of(list(files), rank, world)]
    for rel, _ in mine:
        if not (ckpt / rel).exists():
            return f"{ckpt}: {rel} is missing"
    for (rel, digest), actual in zip(mine, sha256_files([ckpt / rel for rel, _ in mine])):
        if actual != digest:
            return f"{ckpt}: {rel} does not match its sha256 in {MANIFEST} (truncated or altered)"
    return None


def committed_checkpoints(root: Path) -> list[Path]:
    """Directories with a manifest, oldest first (not yet checksum-verified)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).exists()]
    return [p for _, p in sorted(found)]


def latest_valid(root: Path, warn=print) -> Optional[Path]:
    """The newest committed checkpoint whose files pass their checksums."""
    for ckpt in reversed(committed_checkpoints(root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"checkpoint: skipping {problem}; trying the previous one")
    return None


class Checkpointer:
    """Collects the engine and every stateful part; saves and restores them atomically."""

    def __init__(self, root: Path, engine, parts: dict[str, Stateful], rank: int, world: int,
                 meta: dict, log=print):
        self.root, self.engine, self.parts = root, engine, parts
        self.rank, self.world, self.meta, self.log = rank, world, meta, log
        self.last_save_s: Optional[float] = None
        self.last_commit_s: Optional[float] = None
        self.pending: Optional[PendingSave] = None
        self._digests: dict[str, str] = {}  # filled by the engine's writer during a save
        self._deleter: Optional[threading.Thread] = None  # rank 0 deleting pruned checkpoints

    def save(self, step: int, keep_last: int, keep_every: int, extra_manifest: dict,
             protect: set[int] = frozenset(), background: bool = False) -> Path:
        """Save and commit ``step``, then prune all but the newest ``keep_last``, every ``keep_every``
        multiple and the steps in ``protect`` (the best checkpoint).

        ``background`` (DDP/FSDP): the engine copies its state to CPU memory and writes it in a
        thread; :meth:`wait` commits it (the loop calls it once every rank reports
        :meth:`write_in_flight` false). Until then the previous checkpoint stays the latest.
        """
        self.wait()  # one save at a time: a background one commits first
        start = time.time()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            self._join_deleter()
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        from torch.distributed.checkpoint.api import CheckpointException  # DCP: a BaseException

        dist.barrier()
        error, future, self._digests = None, None, {}
        try:
            future = self.engine.save(tmp, background=background, digests=self._digests)
            fault_point("write", step, self.rank)
            torch.save({name: part.state_dict() for name, part in self.parts.items()},
                       tmp / f"rank-{self.rank:05d}.pt")
        except (OSError, RuntimeError, CheckpointException) as err:  # how ENOSPC surfaces in each writer
            error = err
        if all_ranks_agree(error is not None):  # every rank gives up together
            raise self._save_failed(step, tmp, error)
        if future is not None:
            self.pending = PendingSave(future, step, keep_last, keep_every, extra_manifest, protect, start)
            self.last_save_s = time.time() - start  # the training stall
            return final
        self._commit(step, keep_last, keep_every, extra_manifest, protect)
        self.last_save_s = time.time() - start
        return final

    def write_in_flight(self) -> bool:
        """Whether this rank is still writing a background save (no collective)."""
        return self.pending is not None and not self.pending.future.done()

    def wait(self) -> Optional[Path]:
        """Block until the background save (if any) is written, then commit it; return its path."""
        if self.pending is None:
            return None
        p, self.pending = self.pending, None
        error = None
        try:
            p.future.result()
        except Exception as err:  # the writer thread's ENOSPC / I/O error, re-raised here
            error = err
        if all_ranks_agree(error is not None):
            raise self._save_failed(p.step, self.root / f".tmp-{step_dir_name(p.step)}", error)
        self._commit(p.step, p.keep_last, p.keep_every, p.extra_manifest, p.protect)
        self.last_commit_s = time.time() - p.started
        return self.root / step_dir_name(p.step)

    def _commit(self, step: int, keep_last: int, keep_every: int, extra_manifest: dict, protect: set[int]) -> None:
        """fsync + hash (shared out), then rank 0 renames and writes the manifest; a collective."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        digests = self._fsync_and_hash(tmp)
        if self.rank == 0:
            fault_point("rename", step, self.rank)
            if final.exists():  # an uncommitted or older copy of the same step
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.root)
            fault_point("manifest", step, self.rank)
            manifest = {"step": step, "world_size": self.world, **self.meta, **extra_manifest,
                        "saved_at": time.time(), "files": digests}
            _write_atomic(final / MANIFEST, json.dumps(manifest, indent=1))
            self._prune(keep_last, keep_every, step, protect)
        dist.barrier()

    def _fsync_and_hash(self, tmp: Path) -> dict[str, str]:
        """fsync and sha256 every file of the save; a collective. The engine's writer hashed its own
        files as it wrote them; the other files are shared out (:func:`share_of`), so a large
        checkpoint is hashed in parallel, not by rank 0 alone."""
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        own = {str(Path(p).relative_to(tmp.absolute())): d for p, d in self._digests.items()}
        shares: list = [None] * self.world
        dist.all_gather_object(shares, own)
        written = {rel: digest for share in shares for rel, digest in share.items()}
        rest = share_of([rel for rel in files if rel not in written], self.rank, self.world)
        for rel in [*own, *rest]:
            _fsync(tmp / rel)  # DCP fsynced its files already: this costs nothing there
        dist.all_gather_object(shares, dict(zip(rest, sha256_files([tmp / rel for rel in rest]))))
        return dict(sorted({**written, **{rel: d for share in shares for rel, d in share.items()}}.items()))

    def verify_all(self, ckpt: Path) -> Optional[str]:
        """:func:`verify` with the files shared out over the ranks; every rank gets the answer."""
        problems: list = [None] * self.world
        dist.all_gather_object(problems, verify(ckpt, self.rank, self.world))
        return next((p for p in problems if p), None)

    def _save_failed(self, step: int, tmp: Path, error: Optional[BaseException]) -> "CheckpointSaveError":
        """Remove the partial save; say what failed, how much space it needs and what is kept."""
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
        previous = committed_checkpoints(self.root)
        needed = sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file()) if previous else written
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(self.root).free
        reason = f"rank {self.rank}: {_first_line(error)}" if error else "another rank failed to write"
        kept = previous[-1].name if previous else "none"
        return CheckpointSaveError(
            f"checkpoint {step_dir_name(step)} failed ({reason}); it needs about {needed / 2**20:.1f} MiB "
            f"and {free / 2**20:.1f} MiB are free on {self.root}; the partial save was removed and the "
            f"latest checkpoint is still {kept}. Free space (or lower checkpoint.keep_last), then run again")

    def _prune(self, keep_last: int, keep_every: int, saving_step: int, protect: set[int]) -> None:
        ckpts = committed_checkpoints(self.root)
        newest = set(ckpts[-keep_last:]) if keep_last > 0 else set(ckpts)
        doomed = []
        for ckpt in ckpts:
            step = int(_STEP_DIR.match(ckpt.name).group(1))
            if ckpt in newest or (keep_every and step % keep_every == 0) or step in protect:
                continue
            fault_point("prune", saving_step, self.rank)
            (ckpt / MANIFEST).unlink()  # uncommit first: a crash mid-delete leaves no half checkpoint
            doomed.append(ckpt)
        doomed += [p for p in self.root.iterdir() if p.name.startswith(".tmp-step-")  # left by crashes
                   or (_STEP_DIR.match(p.name) and not (p / MANIFEST).exists())]
        self._join_deleter()
        self._deleter = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in doomed],
                                         name="checkpoint-prune")
        self._deleter.start()  # freeing the disk need not stall training; joined before the next save

    def _join_deleter(self) -> None:
        if self._deleter is not None:
            self._deleter.join()
            self._deleter = None

    def find_resume_point(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from (``auto``: the newest that verifies; ``never``; or a path),
        the same on every rank. The ranks share the checksum work."""
        if resume == "never":
            return None
        candidates: list = [[str(p) for p in committed_checkpoints(self.root)] if resume == "auto" else [resume]]
        dist.broadcast_object_list(candidates, src=0)  # rank 0's listing is the one everyone checks
        for path in map(Path, reversed(candidates[0])):
            problem = self.verify_all(path)
            if problem is None:
                return path
            if resume != "auto":
                raise CheckpointError(f"checkpoint.resume: {problem}")
            self.log(f"checkpoint: skipping {problem}; trying the previous one")
        return None

    def load(self, ckpt: Path) -> dict:
        """Restore everything from ``ckpt``; return its manifest."""
        manifest = json.loads((ckpt / MANIFEST).read_text())
        self.engine.load(ckpt, manifest["world_size"])
        same_world = manifest["world_size"] == self.world
        own = ckpt / f"rank-{self.rank:05d}.pt"
        state = torch.load(own if same_world and own.exists() else ckpt / "rank-00000.pt",
                           weights_only=True)
        for name, part in self.parts.items():
            if name == "rng" and not same_world:
                continue  # per-rank RNG streams cannot map onto another world size; reseeded instead
            if name not in state:  # saved by an older version that did not track this part
                self.log(f"checkpoint: {ckpt.name} has no {name!r} state; {name} starts afresh")
                continue
            part.load_state_dict(state[name])
        return manifest
