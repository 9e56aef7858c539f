"""Text → token ids in bounded pieces, on ``data.num_proc`` processes.

Pieces. A document longer than :data:`PIECE_CHARS` is cut into pieces of at most that many
characters (plus :data:`CONTEXT`), only where the tokenizer itself treats the cut as a boundary: a
candidate cut (before a space, or after a line break, searched back from the bound) is taken only
if tokenizing :data:`CONTEXT` characters on each side of it gives the same ids whole as in two
halves. For tokenizers whose pre-tokenizer splits text locally (byte-level BPE such as GPT-2's,
Llama 3's and the one shardforge trains, WordPiece, Metaspace) a piece-wise document is therefore
tokenized token for token as the whole document; a document up to the bound is one piece, as
before. A tokenizer for which no candidate checks out (one that prepends a space to every input)
is cut after a line break anyway; those cuts are counted and reported.

Processes. With ``num_proc`` > 1 each piece goes to one of ``num_proc`` worker processes
(``python -c`` running :func:`worker_main`, one-threaded, no other import than ``tokenizers`` and
numpy), at most two pieces per worker in flight, and the ids come back in order.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

PIECE_CHARS = 512 << 10
"""Longest piece of a document tokenized in one call (a worker needs ~130 MB at this size)."""
CONTEXT = 512
"""Characters each side of a cut that the boundary check tokenizes."""
MAX_TRIES = 16
"""Candidate cuts checked per piece before falling back to a line break."""
_ERROR = (1 << 64) - 1


def backend_of(tokenizer):
    """A copy of the fast tokenizer's ``tokenizers.Tokenizer`` that never truncates or pads (as
    ``tokenizer(texts)`` behaves)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def encode(backend, texts: list[str]) -> list[np.ndarray]:
    """Token ids (int32) of each text, without special tokens; ``encode_batch_fast`` skips offsets."""
    fast = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    return [np.array(e.ids, dtype=np.int32) for e in fast(texts, add_special_tokens=False)]


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Splitter:
    """Cuts documents into pieces at boundaries the tokenizer agrees with (see the module)."""

    def __init__(self, backend, piece_chars: Optional[int] = None):
        self.backend, self.piece_chars = backend, piece_chars or PIECE_CHARS
        self.cuts = self.unverified = 0

    def pieces(self, blocks: Iterable[str]) -> Iterator[tuple[str, bool]]:
        """(piece, is the document's last) for one document given as text blocks; nothing for an
        empty document."""
        buf = ""
        for block in blocks:
            buf = buf + block if buf else block
            while len(buf) >= self.piece_chars + CONTEXT:
                cut = self._cut(buf, self.piece_chars)
                yield buf[:cut], False
                buf = buf[cut:]
        if buf:
            yield buf, True

    def agrees(self, text: str, cut: int) -> bool:
        left, right = text[max(0, cut - CONTEXT):cut], text[cut:cut + CONTEXT]
        whole, a, b = encode(self.backend, [left + right, left, right])
        return len(whole) == len(a) + len(b) and bool((whole == np.concatenate([a, b])).all())

    def _cut(self, text: str, target: int) -> int:
        self.cuts += 1
        lo, hi, line_break = max(1, target // 2), target, None
        tries = 0 if self.cuts <= 8 or self.unverified < self.cuts - 1 else MAX_TRIES  # none ever agreed
        while tries < MAX_TRIES:
            space, newline = text.rfind(" ", lo, hi), text.rfind("\n", lo - 1, hi - 1)
            cut = max(space, newline + 1 if newline >= 0 else -1)
            if cut < lo:
                break
            if line_break is None and newline >= 0 and cut == newline + 1:
                line_break = cut
            if self.agrees(text, cut):
                return cut
            tries, hi = tries + 1, cut
        self.unverified += 1
        if line_break is None:
            newline = text.rfind("\n", lo - 1, target - 1)
            line_break = newline + 1 if newline >= 0 else target
        return line_break


class InProcess:
    """Tokenizes pieces in this process, one at a time, with ``encode_fn(texts) -> ids``."""

    def __init__(self, encode_fn: Callable[[list[str]], list]):
        self.encode_fn = encode_fn

    def map(self, items: Iterable[tuple[str, object]]) -> Iterator[tuple[np.ndarray, object]]:
        for text, meta in items:
            yield np.asarray(self.encode_fn([text])[0], dtype=np.int32), meta

    def close(self, kill: bool = False) -> None:
        pass


class Workers:
    """``procs`` tokenizer processes; :meth:`map` keeps two pieces per process in flight, in order."""

    def __init__(self, backend, procs: int, folder: Path):
        tokenizer_file = folder / "tokenizer.json"
        backend.save(str(tokenizer_file))
        root = str(Path(__file__).resolve().parents[2])
        code = f"import sys; sys.path.insert(0, {root!r}); from train.data.encode import worker_main; worker_main()"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
        self.procs = [subprocess.Popen([sys.executable, "-c", code, str(tokenizer_file)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=env) for _ in range(procs)]
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for proc in self.procs:
            self._idle.put(proc)
        self._threads = ThreadPoolExecutor(procs, thread_name_prefix="tokenize")

    def _call(self, text: str) -> np.ndarray:
        proc = self._idle.get()
        try:
            data = text.encode("utf-8", "surrogatepass")
            proc.stdin.write(len(data).to_bytes(8, "little"))
            proc.stdin.write(data)
            proc.stdin.flush()
            n = int.from_bytes(_read(proc, 8), "little")
            if n == _ERROR:
                message = _read(proc, int.from_bytes(_read(proc, 8), "little")).decode()
                raise RuntimeError(f"tokenizer: {message}")
            return np.frombuffer(_read(proc, 4 * n), dtype=np.int32)
        finally:
            self._idle.put(proc)

    def map(self, items: Iterable[tuple[str, object]]) -> Iterator[tuple[np.ndarray, object]]:
        pending: deque = deque()
        for text, meta in items:
            pending.append((self._threads.submit(self._call, text), meta))
            if len(pending) >= 2 * len(self.procs):
                future, meta = pending.popleft()
                yield future.result(), meta
        while pending:
            future, meta = pending.popleft()
            yield future.result(), meta

    def close(self, kill: bool = False) -> None:
        """End the workers (their input closes and they exit; ``kill``: at once, after an error) and the threads."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        for proc in self.procs:
            if kill:
                proc.kill()
            try:
                assert proc.stdin is not None  # started with stdin=PIPE
                proc.stdin.close()
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if not kill and proc.stdout is not None:  # after a kill a thread may still be reading
                proc.stdout.close()


def _read(proc: subprocess.Popen, n: int) -> bytes:
    assert proc.stdout is not None  # started with stdout=PIPE
    data = proc.stdout.read(n)
    if len(data) < n:
        raise RuntimeError(f"a tokenizer process ended (exit code {proc.wait()}); its error is above")
    return data


def worker_main() -> None:
    """A tokenizer process: pieces in on stdin, ids out on stdout, until stdin closes. Stop signals
    are the parent's to act on (a stop during data preparation lets it finish)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(sys.argv[1])
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while len(head := inp.read(8)) == 8:
        text = inp.read(int.from_bytes(head, "little")).decode("utf-8", "surrogatepass")
        try:
            ids = encode(backend, [text])[0]
        except Exception as err:  # tokenizers raises plain Exceptions
            message = str(err).encode()
            out.write(_ERROR.to_bytes(8, "little") + len(message).to_bytes(8, "little") + message)
        else:
            out.write(len(ids).to_bytes(8, "little"))
            out.write(ids.tobytes())
        out.flush()


def tokenizer_processes(backend, encode_fn: Callable, procs: int, size: Optional[int], folder_fn: Callable):
    """Worker processes when there is enough text to pay for starting them (``size`` bytes, ``None``
    when unknown), else :class:`InProcess`."""
    if procs > 1 and (size is None or size > 2 * PIECE_CHARS):
        return Workers(backend, procs, folder_fn())
    return InProcess(encode_fn)
