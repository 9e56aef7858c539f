"""Nothing in a checkpoint runs code when it is loaded.

``torch.load`` runs pickled code unless ``weights_only=True``; DeepSpeed and DCP's byte items
pass ``weights_only=False``, and DCP reads its ``.metadata`` with plain ``pickle.load``. So:

* :func:`forbid_code_in_checkpoints` makes every ``torch.load`` of this process weights-only
  (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, read by torch at each call and inherited by the processes
  it starts) and allowlists the few plain types DeepSpeed pickles into its checkpoints;
* :class:`SafeFileSystemReader` reads DCP's ``.metadata`` with an unpickler that builds only
  DCP's metadata classes, torch sizes, dtypes and layouts, and paths, and each tensor record with
  :func:`load_tensor_record` (a plain tensor in place, anything else weights-only).
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import pickle
import struct
import zipfile
from contextlib import contextmanager
from typing import Any, Iterator, Optional

DEEPSPEED_CHECKPOINT_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""Found by loading ZeRO-1/2/3 checkpoints (fp32, fp16, bf16, CPU offload) with weights_only=True:
plain state holders (an enum, a dataclass, two loss-scaler records), nothing that runs code."""


def forbid_code_in_checkpoints(deepspeed: bool = False) -> None:
    """Every later ``torch.load`` in this process (and the processes it starts) is weights-only."""
    import torch.serialization

    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    if deepspeed:
        types = []
        for name in DEEPSPEED_CHECKPOINT_TYPES:
            module, _, attr = name.rpartition(".")
            types.append(getattr(importlib.import_module(module), attr))
        torch.serialization.add_safe_globals(types)


REFUSED = "which a DCP checkpoint never holds"
"""In :class:`_MetadataUnpickler`'s refusal; DCP turns that error into text inside its own exception."""


def rank_errors(err: BaseException) -> list[BaseException]:
    """The failing ranks' own errors inside DCP's ``CheckpointException`` (which names only the
    ranks), first rank first; ``[err]`` for any other error."""
    failures = getattr(err, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return [err]
    inner = [f[0] if isinstance(f, tuple) else f for f in failures.values()]  # (exception, traceback)
    return [e for e in inner if isinstance(e, BaseException)] or [err]


@contextmanager
def refusing_code(ckpt, error_type: type, hint: str = "restore it from a trusted copy") -> Iterator[None]:
    """Turn a weights-only or metadata refusal while loading ``ckpt`` into one ``error_type`` line."""
    from torch.distributed.checkpoint.api import CheckpointException  # DCP: a BaseException

    try:
        yield
    except (pickle.UnpicklingError, CheckpointException) as err:
        if not any(isinstance(e, pickle.UnpicklingError) or REFUSED in str(e) for e in [err, *rank_errors(err)]):
            raise
        raise error_type(f"{ckpt}: refused: a file holds objects that would run code when loaded; it was "
                         f"altered after the save: {hint}") from None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                                  ("torch.serialization", "_get_layout"), ("torch", "Size"),
                                  ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                                  ("pathlib", "PurePosixPath"), ("builtins", "set"), ("builtins", "frozenset"),
                                  ("builtins", "slice")}
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed or name.startswith("__"):
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, {REFUSED}; "
                                         f"refusing to load it (tampered?)")
        return super().find_class(module, name)


class _NotPlain(Exception):
    """A tensor record holds more than a plain tensor: torch's weights-only unpickler judges it."""


class _StorageKind:
    """What a tensor record's storage class stands for here: its dtype, and nothing callable."""

    def __init__(self, dtype):
        self.dtype = dtype


class _TensorRecordUnpickler(pickle.Unpickler):
    """Rebuilds the plain tensor of a DCP tensor record (a ``torch.save`` archive) with Python's C
    unpickler, allowing three names; anything else is left to torch's weights-only unpickler. That
    one is pure Python and costs ~0.5 ms per tensor, most of a small model's load."""

    def __init__(self, pickled: bytes, archive: bytearray, records: dict):
        super().__init__(io.BytesIO(pickled))
        self.archive, self.records = archive, records

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return _EmptyHooks
        if module == "torch" and name in _storage_dtypes():
            return _StorageKind(_storage_dtypes()[name])
        raise _NotPlain(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageKind)
                and pid[2] in self.records and pid[3] == "cpu" and isinstance(pid[4], int)):
            raise _NotPlain(repr(pid))
        dtype, (start, size), numel = pid[1].dtype, self.records[pid[2]], pid[4]
        if numel * dtype.itemsize != size:
            raise _NotPlain(f"{size} bytes for {numel} elements of {dtype}")
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self.archive, dtype=dtype, count=numel, offset=start)


@functools.cache
def _storage_dtypes() -> dict:
    """torch's legacy storage class names (``FloatStorage``, ...) and their dtypes."""
    import warnings

    import torch

    with warnings.catch_warnings():  # reading a legacy class's dtype warns that TypedStorage is deprecated
        warnings.simplefilter("ignore")
        return {name: cls.dtype for name, cls in vars(torch).items() if name.endswith("Storage")
                and isinstance(cls, type) and issubclass(cls, torch.storage.TypedStorage)
                and isinstance(getattr(cls, "dtype", None), torch.dtype)}


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` for a plain tensor: a strided view of its storage."""
    if hooks or metadata or requires_grad:
        raise _NotPlain("hooks, metadata or requires_grad")
    try:
        return storage.as_strided(size, stride, offset)
    except (RuntimeError, TypeError) as err:  # e.g. a view that leaves its storage
        raise _NotPlain(str(err)) from None


class _EmptyHooks(dict):
    """What a pickled tensor's ``collections.OrderedDict`` of backward hooks becomes (it must be empty)."""


def load_tensor_record(record: bytearray):
    """The tensor of one ``torch.save`` archive, as DCP writes each tensor. A plain CPU tensor in
    the zip layout torch writes is read in place from ``record``; anything else goes to
    ``torch.load(weights_only=True)``, which refuses what could run code."""
    import torch

    try:
        return _plain_tensor(record)
    except Exception:  # not a plain tensor as torch writes one (or altered): torch's weights-only loader judges it
        return torch.load(io.BytesIO(record), map_location="cpu", weights_only=True)


class _ReadOnlyView(io.RawIOBase):
    """A seekable file over a buffer without copying it (``io.BytesIO`` copies a bytearray), for
    zipfile, which reads only the directory at the end of the archive."""

    def __init__(self, buffer: bytearray):
        self.view, self.position = memoryview(buffer), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self.view)}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, out) -> int:
        chunk = self.view[self.position:self.position + len(out)]
        out[:len(chunk)] = chunk
        self.position += len(chunk)
        return len(chunk)


def _plain_tensor(record: bytearray):
    with zipfile.ZipFile(_ReadOnlyView(record)) as zf:
        infos = zf.infolist()
    prefix = infos[0].filename.split("/", 1)[0] + "/" if infos else ""
    records, pickled = {}, None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise _NotPlain("a compressed record")
        name_len, extra_len = struct.unpack_from("<HH", record, info.header_offset + 26)  # the local header's own
        start = info.header_offset + 30 + name_len + extra_len
        if info.filename == prefix + "data.pkl":
            pickled = bytes(record[start:start + info.file_size])
        elif info.filename.startswith(prefix + "data/"):
            records[info.filename[len(prefix) + 5:]] = (start, info.file_size)
        elif info.filename == prefix + "byteorder" and record[start:start + info.file_size] != b"little":
            raise _NotPlain("big-endian")
    if pickled is None:
        raise _NotPlain("no data.pkl")
    return _TensorRecordUnpickler(pickled, record, records).load()


def dcp_size_problem(dcp_dir) -> Optional[str]:
    """What in ``dcp_dir/.metadata`` does not fit the data files beside it (a record beyond a file's
    end, a tensor declared larger than every file together), or ``None``. Checked before loading:
    DCP would allocate what the metadata declares. Metadata that does not unpickle is left to
    :func:`safe_reader`, which refuses it."""
    import math
    from pathlib import Path

    dcp_dir = Path(dcp_dir)
    try:
        with open(dcp_dir / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        storage, tensors = dict(metadata.storage_data), dict(metadata.state_dict_metadata)
    except Exception:  # noqa: BLE001 - refused or unreadable: the loader reports it
        return None
    sizes = {p.name: p.stat().st_size for p in dcp_dir.iterdir() if p.is_file() and not p.is_symlink()}
    for info in storage.values():
        size = sizes.get(str(info.relative_path))
        if size is None or "/" in str(info.relative_path):
            return f"dcp/.metadata points into {str(info.relative_path)[:80]!r}, which is not a file of the checkpoint"
        if info.offset < 0 or info.length < 0 or info.offset + info.length > size:
            return (f"dcp/.metadata places a record at bytes {info.offset:,}-{info.offset + info.length:,} of "
                    f"{info.relative_path}, which holds {size:,}")
    total = sum(size for name, size in sizes.items() if name != ".metadata")
    for name, meta in tensors.items():
        if hasattr(meta, "size") and hasattr(meta, "properties"):
            declared = math.prod(meta.size) * meta.properties.dtype.itemsize
            if declared > total:
                return (f"dcp/.metadata declares {str(name)[:80]!r} of shape {tuple(meta.size)} ({declared:,} bytes), "
                        f"more than the checkpoint's data files hold ({total:,} bytes)")
    return None


def safe_reader(path):
    """A DCP ``FileSystemReader`` for ``path`` whose ``.metadata`` is read by :class:`_MetadataUnpickler`
    and whose tensors by :func:`load_tensor_record`."""
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.futures import Future

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            """DCP's own loop, for records without storage transforms, with each file read in
            order of offsets and each tensor decoded in place (DCP's loop is used otherwise)."""
            if any(self.storage_data[r.storage_index].transform_descriptors for r in plan.items):
                return super().read_data(plan, planner)
            per_file: dict[str, list] = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for relative_path, items in per_file.items():
                with open(self.fs.concat_path(self.path, relative_path), "rb") as f:
                    for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                        info = self.storage_data[item.storage_index]
                        f.seek(info.offset)
                        record = bytearray(info.length)
                        if f.readinto(record) != info.length:
                            raise EOFError(f"{relative_path}: ends inside a record at byte {info.offset}")
                        if item.type == LoadItemType.BYTE_IO:
                            planner.load_bytes(item, io.BytesIO(record))
                            continue
                        tensor = narrow_tensor_by_index(load_tensor_record(record), item.storage_offsets, item.lengths)
                        target = planner.resolve_tensor(item).detach()
                        if target.size() != tensor.size():
                            raise ValueError(f"{relative_path}: {item.storage_index} has size {tuple(tensor.size())}, "
                                             f"the model wants {tuple(target.size())}")
                        target.copy_(tensor)
                        planner.commit_tensor(item, target)
            done: Future = Future()
            done.set_result(None)
            return done

    with open(f"{path}/.metadata", "rb") as f:  # refused here, before DCP (which logs tracebacks), if tampered
        _MetadataUnpickler(f).load()
    return SafeFileSystemReader(str(path))
