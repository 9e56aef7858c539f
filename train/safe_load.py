"""Nothing in a checkpoint runs code when it is loaded.

``torch.load`` runs pickled code unless ``weights_only=True``; DeepSpeed and DCP's byte items
pass ``weights_only=False``, and DCP reads its ``.metadata`` with plain ``pickle.load``. So:

* :func:`forbid_code_in_checkpoints` makes every ``torch.load`` of this process weights-only
  (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, read by torch at each call and inherited by the processes
  it starts) and allowlists the few plain types DeepSpeed pickles into its checkpoints;
* :class:`SafeFileSystemReader` reads DCP's ``.metadata`` with an unpickler that builds only
  DCP's metadata classes, torch sizes, dtypes and layouts, and paths.
"""

from __future__ import annotations

import importlib
import os
import pickle
from contextlib import contextmanager
from typing import Any, Iterator

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


def safe_reader(path):
    """A DCP ``FileSystemReader`` for ``path`` whose ``.metadata`` is read by :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    with open(f"{path}/.metadata", "rb") as f:  # refused here, before DCP (which logs tracebacks), if tampered
        _MetadataUnpickler(f).load()
    return SafeFileSystemReader(str(path))
