"""Atomic, verified checkpoints.

Commit protocol for ``checkpoints/step-000120``:

1. every rank writes into the sibling ``checkpoints/.tmp-step-000120``
   (the engine's sharded state plus one small ``rank-XXXXX.pt`` per rank);
2. every file is fsynced and hashed (DCP's writer hashes its files as it writes them, in
   :func:`io_threads` threads; the ranks share out the rest); rank 0 renames the directory
   to ``step-000120``;
3. rank 0 writes ``manifest.json`` (step, tokens, world size, engine, recipe hash,
   a digest per file) last, atomically: the manifest *is* the commit marker.

Only directories with a manifest whose checksums match count as checkpoints.
Pruning happens only after the new checkpoint is committed: a pruned checkpoint loses its
manifest first, then rank 0 deletes its files in a thread while training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import AbstractSet, Any, NamedTuple, Optional

import torch
import torch.distributed as dist

from train.checkpoint.files import (DIGEST, CheckpointError, MANIFEST, STEP_DIR, committed_checkpoints, file_digests, links_note,
                                    newest_valid, sealed_manifest, share_of, step_dir_name, verify)
from train.distributed import all_ranks_agree
from train.faults import fault_point
from train.rundir import atomic_write, first_line, fsync_path
from train.checkpoint.safe_load import rank_errors, refusing_code
from train.checkpoint.state import Stateful

logger = logging.getLogger("shardforge")



class PendingSave(NamedTuple):
    """A save whose engine state is being written in the background, and what its commit needs."""

    future: Any
    step: int
    keep_last: int
    keep_every: int
    extra_manifest: dict
    protect: AbstractSet[int]
    started: float


class CheckpointSaveError(CheckpointError):
    """A save failed on some rank; nothing of it was committed. ``symptom``: not on this rank."""

    def __init__(self, message: str, symptom: bool = False):
        super().__init__(message)
        self.symptom = symptom


PER_RANK_PARTS = ("rng", "log_window")
"""Parts whose state is this rank's own: restored only on the same world size."""


class Checkpointer:
    """Collects the engine and every stateful part; saves and restores them atomically."""

    def __init__(self, root: Path, engine, parts: dict[str, Stateful], rank: int, world: int,
                 meta: dict):
        self.root, self.engine, self.parts = root, engine, parts
        self.rank, self.world, self.meta = rank, world, meta
        self.last_save_s: Optional[float] = None
        self.last_commit_s: Optional[float] = None
        self.pending: Optional[PendingSave] = None
        self._digests: dict[str, str] = {}  # filled by the engine's writer during a save
        self._deleter: Optional[threading.Thread] = None  # rank 0 deleting pruned checkpoints

    def save(self, step: int, keep_last: int, keep_every: int, extra_manifest: dict,
             protect: AbstractSet[int] = frozenset(), background: bool = False) -> Path:
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

    def _commit(self, step: int, keep_last: int, keep_every: int, extra_manifest: dict, protect: AbstractSet[int]) -> None:
        """fsync + hash (shared out), then rank 0 renames and writes the manifest; a collective."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        digests = self._fsync_and_hash(tmp)
        error = None
        if self.rank == 0:
            fault_point("rename", step, self.rank)
            try:
                if final.is_symlink():  # the link goes, never what it points at
                    logger.warning(f"checkpoint: {final} was a symbolic link to {os.readlink(final)}; replaced the "
                                   f"link with this save (its target is untouched)")
                    final.unlink()
                elif final.exists():  # an uncommitted or older copy of the same step
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_path(self.root)
                fault_point("manifest", step, self.rank)
                manifest = sealed_manifest({"step": step, "world_size": self.world, **self.meta, **extra_manifest,
                                            "saved_at": time.time(), "digest": DIGEST, "files": digests}, final)
                atomic_write(final / MANIFEST, json.dumps(manifest, indent=1), fsync=True)
            except OSError as err:  # disk full writing the manifest: this step never committed
                error = err
                shutil.rmtree(final, ignore_errors=True)
            else:
                self._prune(keep_last, keep_every, step, protect)
        if all_ranks_agree(error is not None):
            raise self._save_failed(step, tmp, error)

    def _fsync_and_hash(self, tmp: Path) -> dict[str, str]:
        """fsync and hash every file of the save; a collective. The engine's writer hashed its own
        files as it wrote them; the other files are shared out (:func:`share_of`), so a large
        checkpoint is hashed in parallel, not by rank 0 alone."""
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        own = {str(Path(p).relative_to(tmp.absolute())): d for p, d in self._digests.items()}
        shares: list = [None] * self.world
        dist.all_gather_object(shares, own)
        written = {rel: digest for share in shares for rel, digest in share.items()}
        rest = share_of([rel for rel in files if rel not in written], self.rank, self.world)
        for rel in [*own, *rest]:
            fsync_path(tmp / rel)  # DCP fsynced its files already: this costs nothing there
        dist.all_gather_object(shares, dict(zip(rest, file_digests([tmp / rel for rel in rest]))))
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
        reason = f"rank {self.rank}: {first_line(rank_errors(error)[0])}" if error else "another rank failed to write"
        if free < needed and "No space left" not in reason:  # torch.save says only "file write failed"
            reason += "; No space left on device"
        kept = previous[-1].name if previous else "none"
        return CheckpointSaveError(
            f"checkpoint {step_dir_name(step)} failed ({reason}); it needs about {needed / 2**20:.1f} MiB "
            f"and {free / 2**20:.1f} MiB are free on {self.root}; the partial save was removed and the "
            f"latest checkpoint is still {kept}. Free space on that file system (older runs' checkpoints, "
            f"or a lower checkpoint.keep_last once this run can save again), then run again to resume",
            symptom=error is None)

    def _prune(self, keep_last: int, keep_every: int, saving_step: int, protect: AbstractSet[int]) -> None:
        ckpts = committed_checkpoints(self.root)
        newest = set(ckpts[-keep_last:]) if keep_last > 0 else set(ckpts)
        doomed = []
        for ckpt in ckpts:
            match = STEP_DIR.match(ckpt.name)
            assert match is not None  # committed_checkpoints lists step-N directories only
            step = int(match.group(1))
            if ckpt in newest or (keep_every and step % keep_every == 0) or step in protect:
                continue
            fault_point("prune", saving_step, self.rank)
            (ckpt / MANIFEST).unlink()  # uncommit first: a crash mid-delete leaves no half checkpoint
            doomed.append(ckpt)
        doomed += [p for p in self.root.iterdir() if not p.is_symlink() and (p.name.startswith(".tmp-step-")
                   or (STEP_DIR.match(p.name) and not (p / MANIFEST).exists()))]  # left by crashes
        self._join_deleter()

        def delete() -> None:
            for p in doomed:
                shutil.rmtree(p, ignore_errors=True)

        self._deleter = threading.Thread(target=delete, name="checkpoint-prune")
        self._deleter.start()  # freeing the disk need not stall training; joined before the next save and at exit

    def _join_deleter(self) -> None:
        if self._deleter is not None:
            self._deleter.join()
            self._deleter = None

    def close(self) -> None:
        """Finish deleting pruned checkpoints: the trainers end with ``os._exit``, which would leave
        them half deleted (uncommitted, but holding their disk)."""
        self._join_deleter()

    def find_resume_point(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from (``auto``: the newest that verifies; ``never``; or a path),
        the same on every rank. The ranks share the checksum work."""
        if resume == "never":
            return None
        if self.rank == 0 and (note := links_note(self.root)):
            logger.warning(note)
        candidates: list = [[str(p) for p in committed_checkpoints(self.root)] if resume == "auto" else [resume]]
        dist.broadcast_object_list(candidates, src=0)  # rank 0's listing is the one everyone checks
        if resume != "auto":
            if (problem := self.verify_all(Path(candidates[0][0]))) is not None:
                raise CheckpointError(f"checkpoint.resume: {problem}")
            return Path(candidates[0][0])
        found, problems = newest_valid([Path(p) for p in candidates[0]], self.verify_all)
        if found is None and problems:  # starting over would overwrite the run's step directories
            raise CheckpointError(
                f"resume: none of the {len(problems)} committed checkpoints in {self.root} verifies (newest: "
                f"{problems[0]}); restore them, or start over with checkpoint.resume=never or another run.dir")
        return found

    def _check_engine(self, ckpt: Path, manifest: dict) -> None:
        """Refuse a checkpoint whose format this engine cannot read (DeepSpeed's vs DCP), naming both."""
        from train.engines import resumes_from

        saved, now = manifest.get("engine"), self.meta.get("engine")
        if isinstance(saved, str) and isinstance(now, str) and (why := resumes_from(saved, now)) is not None:
            raise CheckpointError(
                f"resume: {ckpt.name} was written by parallel.engine={saved} ({why}); resume with "
                f"parallel.engine={saved}, or start over with checkpoint.resume=never or another run.dir")

    def load(self, ckpt: Path) -> dict:
        """Restore everything from ``ckpt``; return its manifest."""
        manifest = json.loads((ckpt / MANIFEST).read_text())
        self._check_engine(ckpt, manifest)
        same_world = manifest["world_size"] == self.world
        own = ckpt / f"rank-{self.rank:05d}.pt"
        with refusing_code(ckpt, CheckpointError, "restore the checkpoint from a trusted copy or resume from "
                                                  "another (checkpoint.resume=PATH)"):
            self.engine.load(ckpt, manifest["world_size"])
            state = torch.load(own if same_world and own.exists() else ckpt / "rank-00000.pt", weights_only=True)
        for name, part in self.parts.items():
            if name in PER_RANK_PARTS and not same_world:
                continue  # per-rank streams and sums cannot map onto another world size; they start afresh
            if name not in state:  # saved by an older version that did not track this part
                logger.warning(f"checkpoint: {ckpt.name} has no {name!r} state; {name} starts afresh")
                continue
            part.load_state_dict(state[name])
        return manifest
