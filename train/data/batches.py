"""Per-rank batches from a prepared split.

Order of samples is defined globally, independent of the world size: epoch ``e`` uses a
permutation of all packed samples keyed by ``(seed, e)``; each optimizer step takes the next
``global_batch_size`` indices of it. The permutation is a keyed bijection computed per position
(:func:`shuffled_positions`), never materialised: start-up does not grow with the data (a
permutation array of 6 M samples cost 0.17 s and 50 MB per epoch). Rank ``r`` of ``W`` takes the ``r``-th slice of those and
splits it into micro-batches. The position is the number of samples consumed, so resuming is
O(1) and works on any world size.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import Iterator, Optional

import numpy as np
import torch

from train.data.samples import Samples
from train.data.sources import DataError
from train.stop_signals import ignore_stop_signals, stop_signals_blocked
from train.config.recipe import accumulation


class GlobalSampleStream:
    """Which global sample indices each optimizer step consumes.

    The position is ``consumed`` samples in total; the stream is a pure
    function of ``(num_samples, seed)`` and the position, never of the world size.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed

    def permutation(self, epoch: int, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Positions ``start:stop`` of epoch ``epoch``'s permutation of the samples (all by default)."""
        stop = self.num_samples if stop is None else min(stop, self.num_samples)
        return shuffled_positions(np.arange(start, stop, dtype=np.uint64), self.num_samples, (self.seed, epoch))

    def locate(self, consumed: int, global_batch: int) -> tuple[int, int]:
        """(epoch, offset in that epoch) of the step starting after ``consumed`` samples."""
        per_epoch = (self.num_samples // global_batch) * global_batch
        return consumed // per_epoch, consumed % per_epoch

    def step_indices(self, consumed: int, global_batch: int) -> np.ndarray:
        """The ``global_batch`` sample indices of the step that starts at position ``consumed``.

        An epoch holds ``num_samples // global_batch`` whole steps; the
        ``num_samples % global_batch`` samples left in its permutation are skipped.
        """
        if global_batch > self.num_samples:
            raise DataError(f"train.global_batch_size={global_batch} exceeds the {self.num_samples} "
                            f"training samples; lower it or add data")
        epoch, offset = self.locate(consumed, global_batch)
        return self.permutation(epoch, offset, offset + global_batch)


SAMPLE_ORDER = "feistel-6"
"""Names how epochs are shuffled, recorded in each checkpoint's manifest: a resume under another
rule would take other samples (``train.loop.trainer.check_fingerprint`` says which changed)."""
FEISTEL_ROUNDS = 6
_MASK64 = np.uint64(2**64 - 1)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit mixing function of ``x`` and ``key`` (splitmix64's finaliser)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as intended
        z = (x + key) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def shuffled_positions(positions: np.ndarray, n: int, key: tuple[int, int]) -> np.ndarray:
    """Where a keyed random permutation of ``range(n)`` sends each of ``positions`` (int64).

    A balanced Feistel network over the smallest even number of bits that holds ``n`` is a
    bijection of that power-of-two range; cycle-walking (apply it again while a value is ``≥ n``)
    restricts it to a bijection of ``range(n)``, at under 4 applications per value on average.
    Each position costs O(1): no array of ``n`` is built, so a step's indices cost the same on any
    amount of data (the idea of Grain's ``index_shuffle``)."""
    if n <= 1:
        return np.zeros(len(positions), dtype=np.int64)
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half, mask = np.uint64(bits // 2), np.uint64(2 ** (bits // 2) - 1)
    keys = [np.uint64(k) for k in np.random.default_rng([key[0], 3, key[1]]).integers(0, 2**63, FEISTEL_ROUNDS)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << half) | right

    out = feistel(positions.astype(np.uint64))
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


def rank_slice(step_indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of one step's global indices."""
    per_rank = len(step_indices) // world
    return step_indices[rank * per_rank: (rank + 1) * per_rank]


class _PackedSamples(torch.utils.data.Dataset):
    """Batches of :class:`Samples` as a dict of int64 tensors, one per column.

    Padded (fine-tuning) samples are trimmed to the longest in the batch, so a batch of short
    records costs what it holds, not ``seq_len``.
    """

    def __init__(self, samples: Samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = self.samples.rows(indices)
        batch = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in rows.items()}
        mask = batch.get("attention_mask")
        if mask is not None and len(mask):
            width = int(mask.sum(1).max())
            batch = {k: v[:, :width] if v.ndim == 2 else v for k, v in batch.items()}
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def _identity(batch):
    return batch


class _ReadAhead:
    """Iterates ``batches`` in a thread of this process, ``depth`` batches ahead (pinned on GPUs):
    pre-tokenized batches are a few rows of a memory-mapped Arrow table, cheaper to read here than
    to receive from a worker process through its queue (a pickle and shared-memory handles per
    tensor)."""

    _END = object()

    def __init__(self, batches: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches,), name="batch-read-ahead", daemon=True)
        self._thread.start()

    def _offer(self, item) -> bool:
        """Queue ``item`` once there is room (:meth:`close` makes some); ``False`` once closed. The
        thread sleeps in ``put`` without polling: a thread that woke up on a timer would take the
        GIL from the training thread every time."""
        self._queue.put(item)
        return not self._closed.is_set()

    def _fill(self, batches: Iterator) -> None:
        try:
            for batch in batches:
                if not self._offer(batch):
                    return
        except BaseException as err:  # noqa: BLE001 - raised again on the training thread
            self._offer(err)
        else:
            self._offer(self._END)

    def __iter__(self) -> "_ReadAhead":
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._closed.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()  # room for a put the thread may be waiting in
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)


class _MicroBatchSampler:
    """Yields this rank's micro-batches of indices from position ``start`` on, forever."""

    def __init__(self, stream: GlobalSampleStream, start: int, global_batch: int, micro: int,
                 rank: int, world: int):
        self.stream, self.start, self.gb, self.micro = stream, start, global_batch, micro
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.start
        while True:
            mine = rank_slice(self.stream.step_indices(consumed, self.gb), self.rank, self.world)
            for j in range(0, len(mine), self.micro):
                yield mine[j: j + self.micro].tolist()
            consumed += self.gb


class TrainBatches:
    """Stateful iterator over this rank's micro-batches; the state is the global sample position.

    Only batches handed to the caller count: prefetched ones do not, so a checkpoint
    taken at a step boundary resumes at exactly the next unseen step.
    """

    sample_order = SAMPLE_ORDER
    """How epochs are shuffled (recorded with each checkpoint)."""

    def __init__(self, dataset: Samples, seed: int, global_batch: int, micro: int, rank: int, world: int,
                 num_workers: int = 0, pin_memory: bool = False):
        self.dataset, self.seed = dataset, seed
        self.global_batch, self.micro, self.rank, self.world = global_batch, micro, rank, world
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.stream = GlobalSampleStream(len(dataset), seed)
        self.stream.step_indices(0, global_batch)  # validates the sizes up front
        self.micro_per_step = accumulation(global_batch, micro, world)
        self.consumed = 0
        self._yielded = 0
        self._it: Optional[Iterator] = None

    @property
    def epoch(self) -> int:
        return self.stream.locate(self.consumed, self.global_batch)[0]

    def _start(self) -> Iterator:
        sampler = _MicroBatchSampler(self.stream, self.consumed, self.global_batch, self.micro,
                                     self.rank, self.world)
        if self.num_workers == 0:
            samples, pin = _PackedSamples(self.dataset), self.pin_memory
            batches = ({k: v.pin_memory() for k, v in b.items()} if pin else b
                       for b in map(samples.__getitems__, sampler))
            return _ReadAhead(batches, depth=4)
        loader = torch.utils.data.DataLoader(
            _PackedSamples(self.dataset), batch_sampler=sampler, collate_fn=_identity,
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            worker_init_fn=ignore_stop_signals if self.num_workers else None,
            persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
            # its own generator: starting an iterator draws the workers' base seed from it, and a
            # draw from the global one would shift dropout after every resume (the straight run
            # draws once at step 1, a resumed run once more after the RNG state was restored)
            generator=torch.Generator().manual_seed(self.seed * 100_003 + self.rank))
        with stop_signals_blocked():  # the workers start with them blocked; see train.stop_signals
            return iter(loader)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        self._yielded += 1
        if self._yielded == self.micro_per_step:
            self._yielded = 0
            self.consumed += self.global_batch
        return batch

    def next_step_indices(self) -> np.ndarray:
        """Global indices of the next step (for fingerprints and tests)."""
        return self.stream.step_indices(self.consumed, self.global_batch)

    def fingerprint(self, steps_back: int = 0) -> str:
        """sha256 of the token ids of the next optimizer step's global batch (or of one ``steps_back``)."""
        idx = self.stream.step_indices(self.consumed - steps_back * self.global_batch, self.global_batch)
        tokens = self.dataset.rows(np.sort(idx))["input_ids"]
        return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()[:16]

    def state_dict(self) -> dict:
        if self._yielded:
            raise RuntimeError("data position saved mid-step; checkpoints happen at step boundaries")
        return {"consumed": self.consumed, "epoch": self.epoch, "num_samples": len(self.dataset),
                "global_batch": self.global_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.consumed = int(state["consumed"])
        self._yielded = 0

    def close(self) -> None:
        """Shut this rank's DataLoader workers down; the trainer calls it on every ending.

        The workers ignore the stop signals (see ``train.stop_signals``), so one that does not leave
        through its queue is killed: multiprocessing's exit handler, which ends children with
        SIGTERM and joins them, would otherwise wait for it forever.
        """
        it, self._it = self._it, None
        if isinstance(it, _ReadAhead):
            it.close()
            return
        workers = list(getattr(it, "_workers", ()))
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's own orderly shutdown (also run by __del__)
        if shutdown is not None:
            shutdown()  # also stops torch's SIGCHLD check for these workers before any is killed
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)

    def __enter__(self) -> "TrainBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def eval_batches(dataset: Samples, micro: int, rank: int, world: int, num_samples: int = 0) -> list[dict]:
    """A fixed, rank-sharded list of validation micro-batches (the same at every evaluation).

    The first ``num_samples`` samples of the split (0: all of them), whatever the world size:
    every rank gets the same number of micro-batches (sharded engines run collectives in
    forward), the last ones filled up with repeats whose ``sample_weight`` is 0, so every
    sample counts exactly once.
    """
    n = len(dataset) if num_samples <= 0 else min(len(dataset), num_samples)
    if n == 0:
        return []
    samples = _PackedSamples(dataset)
    per_rank = -(-n // world)
    per_rank = -(-per_rank // micro) * micro
    mine = [rank * per_rank + i for i in range(per_rank)]
    batches = []
    for j in range(0, per_rank, micro):
        chunk = mine[j: j + micro]
        real = [i < n for i in chunk]
        batch = samples.__getitems__([i if ok else 0 for i, ok in zip(chunk, real)])
        batch["sample_weight"] = torch.tensor(real, dtype=torch.float32)
        batches.append(batch)
    return batches
