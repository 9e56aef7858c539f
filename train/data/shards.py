"""Pre-training data prepared by many tasks (``shardforge submit RECIPE --prepare``: a Slurm array).

The sources are cut into units: each file of a local source (its records, or its one document for
``.txt``), or the whole source where a file alone would not read the same (a template, a
``save_to_disk`` folder, a hub dataset, a glob character in a file name). Task *i* of *N* tokenizes
units *i*, *i* + *N*, ... exactly as one process would (:func:`train.data.pretraining.pack_documents`,
the same pieces and workers) but keeps every document's ids instead of packing them, into
``<cache entry>.shards/task-XXXX/`` (written under a temporary name, then renamed: a task folder
that exists is complete). The last task to finish joins: it replays the documents of every unit in
the one-process order through the same :class:`train.data.packing.Packer`, and the cache entry is
then written by the one-process code (mix, split, Arrow files, ``stats.json``), so its key, samples,
their order and its token counts are those of ``shardforge prepare`` in one process.

A cache entry with shards and no ``stats.json`` is refused by every other preparation (a training
start, ``shardforge prepare``) naming the tasks that have not finished; it never tokenizes over them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from train.data.documents import Progress, documents, streams_text
from train.data.files import file_format, local_files, path_problem, saved_dataset
from train.data.packing import Packer, blocks
from train.data.sources import DataError
from train.config.recipe import Recipe, SourceConfig
from train.rundir import process_alive

logger = logging.getLogger("shardforge")

SHARDS_SUFFIX = ".shards"
LOCK = "join.lock"


@dataclass(frozen=True)
class Unit:
    source: str
    """``s0``, ``s1``, ... (``data.sources[i]``) or ``val`` (``data.val_source``)."""
    where: str
    src: SourceConfig
    """The source, or the source narrowed to one of its files."""
    whole: bool
    """Whether ``src`` is the whole source."""


def shards_dir(out: Path) -> Path:
    """The folder of the shards of cache entry ``out``."""
    return out.with_name(out.name + SHARDS_SUFFIX)


def units(recipe: Recipe) -> list[Unit]:
    """The units of the recipe's pre-training sources, in the order one process reads them."""
    d = recipe.data
    named = [(f"s{i}", f"data.sources[{i}]", s) for i, s in enumerate(d.sources)]
    if d.val_source is not None:
        named.append(("val", "data.val_source", d.val_source))
    return [Unit(key, where, part, part is src) for key, where, src in named for part in _parts(src)]


def _parts(src: SourceConfig) -> list[SourceConfig]:
    """The source as files read one at a time (an empty one adds nothing and is left out), or whole."""
    files = local_files(src.path)
    if (not files or len(files) == 1 or saved_dataset(src.path) is not None or src.template is not None
            or len({file_format(f) for f in files}) != 1 or file_format(files[0]) is None
            or any(ch in f for f in files for ch in "*?[")):
        return [src]
    text = file_format(files[0]) == "text"  # a text file of blanks is a document; a json file of blanks holds none
    parts = [replace(src, path=f) for f in files if os.path.getsize(f) > 0 and (text or not _blank(f))]
    return parts or [src]


def _blank(path: str) -> bool:
    """Whether a small file holds only white space."""
    if os.path.getsize(path) > 4096:
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


def _check_whole(recipe: Recipe) -> None:
    """What reading a split source whole checks across its files (a file alone passes them)."""
    d = recipe.data
    for where, src in [*((f"data.sources[{i}]", s) for i, s in enumerate(d.sources)), ("data.val_source", d.val_source)]:
        if src is not None and (problem := path_problem(where, src.path, src.split)):
            raise DataError(problem)


def _task_dir(folder: Path, task: int) -> Path:
    return folder / f"task-{task:04d}"


def missing_tasks(folder: Path, tasks: int) -> list[int]:
    return [t for t in range(tasks) if not (_task_dir(folder, t) / "done.json").exists()]


def _plan(folder: Path, tasks: int, names: list[str]) -> None:
    """Record (first task) or check (the others) how the units are shared out."""
    path = folder / "plan.json"
    if not path.exists():
        tmp = folder / f".plan-{socket.gethostname()}-{os.getpid()}"
        tmp.write_text(json.dumps({"tasks": tasks, "units": names}))
        try:
            os.link(tmp, path)  # first writer wins, never half a file
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    theirs = json.loads(path.read_text())
    if theirs["tasks"] != tasks:
        raise DataError(f"data: {folder} holds the shards of {theirs['tasks']} tasks, not {tasks}; prepare with "
                        f"--tasks {theirs['tasks']}, or delete {folder} to start over")
    if theirs["units"] != names:
        raise DataError(f"data: {folder} was planned for other data files; delete {folder} to start over")


class _DocWriter:
    """Takes :func:`pack_documents`' pieces in place of a :class:`Packer`: every document's ids, its
    length and its unit (``pending``: the units of the non-empty documents, in order)."""

    def __init__(self, folder: Path, key: str, pending: deque):
        self.ids = open(folder / f"{key}.ids", "wb")
        self.folder, self.key, self.pending = folder, key, pending
        self.lens: list[int] = []
        self.units: list[int] = []
        self.length = self.tokens = 0

    def add(self, ids: np.ndarray, last: bool) -> None:
        if len(ids):
            self.ids.write(np.asarray(ids, dtype=np.int32).tobytes())
            self.length += len(ids)
        if last:
            self.units.append(self.pending.popleft())
            self.lens.append(self.length)
            self.tokens += self.length
            self.length = 0

    def finish(self) -> dict:
        self.ids.close()
        np.asarray(self.lens, dtype=np.int64).tofile(self.folder / f"{self.key}.lens")
        np.asarray(self.units, dtype=np.int64).tofile(self.folder / f"{self.key}.units")
        return {"documents": len(self.lens), "tokens": self.tokens}


def _noted(blocks_: Iterator[str], unit: int, pending: deque) -> Iterator[str]:
    """The blocks of one document; once they are read, a non-empty document's unit joins ``pending``
    (:class:`train.data.encode.Splitter` yields its last piece after that, and the pieces of an empty
    document are none)."""
    seen = False
    for block in blocks_:
        seen = seen or bool(block)
        yield block
    if seen:
        pending.append(unit)


class _PartProgress(Progress):
    """The progress :func:`documents` reports for one unit, counted into its task's ``group``
    (bytes or records read before this unit started, a total that covers every file)."""

    def __init__(self, group: Progress):  # no super().__init__(): the counts are the group's
        self.group, self.base = group, group.done

    @property
    def done(self) -> int:
        return self.group.done - self.base

    @done.setter
    def done(self, value: int) -> None:
        self.group.done = self.base + value

    @property
    def total(self) -> int:
        return self.group.total

    @total.setter
    def total(self, value: int) -> None:
        self.group.total = max(self.group.total, self.base + value)

    @property
    def unit(self) -> str:
        return self.group.unit

    @unit.setter
    def unit(self, value: str) -> None:
        self.group.unit = value


def _documents(unit: Unit, max_record_mb: int, progress: Progress) -> Iterator[Iterator[str]]:
    """The unit's documents; a file of a split source that holds no records (a csv header) gives none,
    as it does read with the others."""
    try:
        yield from documents(unit.src, unit.where, max_record_mb, progress)
    except DataError as err:
        empty = ("has no records; point it at non-empty data", "corresponds to no data")  # ours, datasets'
        if unit.whole or not any(e in str(err) for e in empty):
            raise


def tokenize_share(recipe: Recipe, tokenizer, out: Path, task: int, tasks: int, pack_documents: Callable,
                   ) -> list[int]:
    """Tokenize task ``task`` of ``tasks``' units into the shards of ``out`` with
    :func:`train.data.pretraining.pack_documents` (passed in: that module calls this one); the tasks
    still missing."""
    folder = shards_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    _check_whole(recipe)
    every = units(recipe)
    _plan(folder, tasks, [f"{u.source}:{u.src.path}" for u in every])
    done = _task_dir(folder, task)
    if (done / "done.json").exists():
        logger.info(f"data: task {task} of {tasks} was tokenized before ({done})")
        return missing_tasks(folder, tasks)
    tmp = folder / f".task-{task:04d}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mine = [(j, u) for j, u in enumerate(every) if j % tasks == task]
    try:
        counts = _tokenize_units(recipe, tokenizer, mine, tmp, f"task {task} of {tasks}", pack_documents)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "done.json").write_text(json.dumps({"task": task, "tasks": tasks, "units": [j for j, _ in mine],
                                               "sources": counts, "host": socket.gethostname()}))
    try:
        os.replace(tmp, done)
    except OSError:  # the same task ran twice and the other copy finished first
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"data: task {task} of {tasks} tokenized {len(mine)} of {len(every)} units "
                f"({sum(c['tokens'] for c in counts.values()):,} tokens) into {done}")
    return missing_tasks(folder, tasks)


def _tokenize_units(recipe: Recipe, tokenizer, mine: list[tuple[int, Unit]], tmp: Path, name: str,
                    pack_documents: Callable) -> dict:
    """Tokenize the numbered units into ``tmp``, a stream per source; each source's counts."""
    from train.data.encode import available_cpus

    d, counts = recipe.data, {}
    for key in dict.fromkeys(u.source for _, u in mine):
        group = [(j, u) for j, u in mine if u.source == key]
        where = group[0][1].where
        pending: deque = deque()
        progress = Progress(f"{where} ({name})")
        files = [f for _, u in group for f in (local_files(u.src.path) or [])]
        size = sum(os.path.getsize(f) for f in files if os.path.isfile(f)) if files else None
        if files and streams_text(group[0][1].src, file_format(files[0])):
            progress.total = size or 0  # the bytes of text files; records are counted as each file is read
        docs = (_noted(b, j, pending) for j, u in group
                for b in _documents(u, d.max_record_mb, _PartProgress(progress)))
        counts[key] = pack_documents(docs, tokenizer, d.seq_len, d.num_proc or available_cpus(), tmp / key, size,
                                     progress, where, sink=_DocWriter(tmp, key, pending))
    return counts


class _Stream:
    """One task's documents of one source, read in order."""

    def __init__(self, base: Path):
        size = base.with_suffix(".ids").stat().st_size
        self.ids = np.memmap(base.with_suffix(".ids"), dtype=np.int32, mode="r") if size else np.zeros(0, np.int32)
        self.lens = np.fromfile(base.with_suffix(".lens"), dtype=np.int64)
        self.units = np.fromfile(base.with_suffix(".units"), dtype=np.int64)
        self.doc = self.offset = 0

    def take(self, unit: int) -> Iterator[np.ndarray]:
        """The ids of the unit's documents (the next ones of this stream)."""
        while self.doc < len(self.lens) and self.units[self.doc] == unit:
            length = int(self.lens[self.doc])
            yield self.ids[self.offset: self.offset + length]
            self.offset += length
            self.doc += 1


def _join_source(folder: Path, tasks: int, key: str, unit_ids: list[int], seq_len: int, eos: int,
                 path: Path) -> tuple[np.ndarray, dict]:
    """Pack source ``key``'s documents from the shards, in the one-process order: (blocks, token counts)."""
    streams: list[Optional[_Stream]] = []
    for t in range(tasks):
        base = _task_dir(folder, t) / key
        streams.append(_Stream(base) if base.with_suffix(".lens").exists() else None)
    packer = Packer(path, seq_len, eos)
    for j in unit_ids:
        stream = streams[j % tasks]
        for ids in stream.take(j) if stream is not None else ():
            packer.add(ids, True)
    stats = packer.finish()
    if any(stream is not None and stream.doc != len(stream.lens) for stream in streams):
        raise DataError(f"data: the shards in {folder} do not match their plan.json; delete {folder} and "
                        f"prepare again")
    return blocks(path, seq_len), stats


class ShardsBusy(DataError):
    """Another process holds the join lock."""


def _take_lock(folder: Path) -> None:
    lock = folder / LOCK
    me = f"{socket.gethostname()} {os.getpid()} {os.environ.get('SLURM_JOB_ID', '-')}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock.read_text().split() if lock.exists() else []
            if _stale(holder):
                lock.unlink(missing_ok=True)  # a join that was killed
                continue
            raise ShardsBusy(f"data: {folder.parent / folder.name[:-len(SHARDS_SUFFIX)]} is being joined from its "
                             f"shards by {' '.join(holder[:2]) or 'another process'} (Slurm job "
                             f"{holder[2] if len(holder) > 2 else '-'}); start again when it has finished, or "
                             f"delete {lock} if that process is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return


def _stale(holder: list[str]) -> bool:
    """Whether the lock's holder (host, pid, Slurm job) is known to be gone: a process of this host
    that ended, or a Slurm job that ``squeue`` no longer lists."""
    if len(holder) < 3 or not holder[1].isdigit():
        return False
    if holder[0] == socket.gethostname():
        return not process_alive(int(holder[1]))
    if holder[2].isdigit() and shutil.which("squeue"):
        import subprocess

        proc = subprocess.run(["squeue", "-h", "-j", holder[2]], capture_output=True, text=True)
        return not proc.stdout.strip() and (proc.returncode == 0 or "Invalid job id" in proc.stderr)
    return False


@contextlib.contextmanager
def joined(recipe: Recipe, tokenizer, out: Path):
    """``None`` when ``out`` has no shards (prepare in one process); else, when every task has finished,
    ``pack(key, path) -> (blocks, stats)`` packing a source from the shards, under the join lock (the
    shards are removed once the entry is written). Incomplete shards or another join: :class:`DataError`."""
    folder = shards_dir(out)
    if not folder.is_dir() or (out / "stats.json").exists():  # none, or just joined by another process
        yield None
        return
    plan = json.loads((folder / "plan.json").read_text()) if (folder / "plan.json").exists() else {}
    missing = missing_tasks(folder, plan["tasks"]) if plan else ["?"]
    if missing:
        tasks = plan.get("tasks", "?")
        raise DataError(f"data: the cache {out} is being prepared by {tasks} tasks (`shardforge submit --prepare`) "
                        f"and task(s) {', '.join(map(str, missing))} have not finished ({folder}); wait for that job "
                        f"and start again (`shardforge submit --after JOB` waits in the queue), run a missing task "
                        f"with `shardforge prepare RECIPE --task I --tasks {tasks}`, or delete {folder} to prepare "
                        f"in one process")
    _take_lock(folder)
    try:
        by_source: dict[str, list[int]] = {}
        for j, name in enumerate(plan["units"]):
            by_source.setdefault(name.split(":", 1)[0], []).append(j)

        def pack(key: str, path: Path) -> tuple[np.ndarray, dict]:
            return _join_source(folder, plan["tasks"], key, by_source.get(key, []), recipe.data.seq_len,
                                tokenizer.eos_token_id, path)

        yield pack
    except BaseException:
        (folder / LOCK).unlink(missing_ok=True)
        raise
    gone = folder.with_name(f".{folder.name}.removed-{socket.gethostname()}-{os.getpid()}")
    os.replace(folder, gone)  # at once: no reader sees half of the shards as tasks not finished
    shutil.rmtree(gone, ignore_errors=True)


def share_arg(task: Optional[int], tasks: Optional[int]) -> Optional[tuple[int, int]]:
    """``(task, tasks)`` from ``--task``/``--tasks`` (``None``: one process), or :class:`DataError`."""
    if task is None and tasks is None:
        return None
    if task is None or tasks is None or tasks < 1 or not 0 <= task < tasks:
        raise DataError(f"prepare: --task {task} --tasks {tasks}: give both, with 0 <= task < tasks "
                        f"(a Slurm array passes --task $SLURM_ARRAY_TASK_ID)")
    return task, tasks
