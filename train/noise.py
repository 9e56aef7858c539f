"""Known noise from the libraries, filtered by message and source so their real warnings still show.

* transformers' ``is_gradient_checkpointing`` FutureWarning: peft reads the deprecated property
  on every LoRA run (``getattr(model, "is_gradient_checkpointing", True)``); nothing a recipe can change.
* transformers' ``LOAD REPORT`` table on ``from_pretrained`` of a pretrained model with a task
  head of its own: the new head's weights are MISSING from the checkpoint and a pooler it does not
  use is UNEXPECTED, which is what fine-tuning means. That report becomes one line naming those
  keys; any other report (a missing or mismatched backbone weight, a conversion error, extra
  layers) is left as transformers prints it.
* datasets' ``Flattening the indices`` and ``Saving the dataset`` progress bars while the data
  cache is written: each lasts a fraction of a second and prints three lines per split.
  Its other bars (tokenizing, generating a split) are left alone: on a large corpus they are the progress.

* torch.distributed.checkpoint's "torch.distributed is disabled, ... assuming the intent is to load
  in a single process" UserWarning: ``shardforge export`` reads a checkpoint in one process on
  purpose; the ranks, which hold a process group, never raise it.

:func:`silence_known_noise` installs all four; call it before datasets is imported (the bars'
class is chosen at its import). It imports nothing heavy.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Optional

GRADIENT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"
TRANSFORMERS_MODELING = "transformers.modeling_utils"
"""The module that raises that warning and whose logger prints the load report."""
SINGLE_PROCESS_DCP_WARNING = r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the intent is to"
QUIET_BARS = re.compile(r"(Flattening the indices|Saving the dataset \(\d+/\d+ shards\))$")
"""Descriptions of the datasets progress bars that are turned off."""

NEW_HEAD_MODULES = ("classifier", "score", "pre_classifier")
"""Task heads that ``AutoModelFor{Sequence,Token}Classification`` adds on top of a pretrained backbone."""
UNUSED_PARTS = ("pooler",)
"""Parts of a pretrained checkpoint that a token-classification model leaves out."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STATUSES = ("MISSING", "UNEXPECTED", "MISMATCH", "CONVERSION", "OWNED", "SKIPPED")


def load_report_line(message: str) -> Optional[str]:
    """One line for a ``LOAD REPORT`` that only says "a new task head" (and "an unused pooler"),
    or ``None`` for any other message, which must stay as it is."""
    text = _ANSI.sub("", message)
    head = re.match(r"(\S+) LOAD REPORT from: (.*)", text)
    if head is None:
        return None
    rows: dict[str, list[str]] = {}
    for line in text.splitlines()[1:]:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 2 and cells[1] in _STATUSES:
            rows.setdefault(cells[1], []).append(cells[0])
    missing, unexpected = sorted(rows.pop("MISSING", [])), sorted(rows.pop("UNEXPECTED", []))  # set order varies
    if rows or not missing:  # a mismatch, a conversion error, or no new head: not the known case
        return None
    if not all(key.split(".")[0] in NEW_HEAD_MODULES for key in missing):
        return None  # a backbone weight is missing: the checkpoint does not fit the model
    if not all(set(key.split(".")[:2]) & set(UNUSED_PARTS) for key in unexpected):
        return None  # e.g. extra layers in the checkpoint: worth the full report
    unused = f"; not used from the checkpoint: {', '.join(unexpected)}" if unexpected else ""
    return (f"{head.group(1)} from {head.group(2).strip()}: new task head {', '.join(missing)} "
            f"initialised from run.seed{unused}")


class LoadReportFilter(logging.Filter):
    """Turns transformers' known new-head ``LOAD REPORT`` into one line (see :func:`load_report_line`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            line = load_report_line(record.getMessage())
        except Exception:  # a report this code cannot read stays as it was
            return True
        if line is not None:
            record.msg, record.args = line, None
        return True


def quiet_bar_class(base: type) -> type:
    """A subclass of the tqdm class ``base`` that starts the :data:`QUIET_BARS` bars disabled."""

    class QuietBars(base):
        def __init__(self, *args, **kwargs):
            if QUIET_BARS.match(str(kwargs.get("desc") or "")):
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    QuietBars.__name__ = QuietBars.__qualname__ = base.__name__
    return QuietBars


def silence_known_noise() -> None:
    """Install the four filters of this module (idempotent)."""
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_WARNING, category=FutureWarning,
                            module=re.escape(TRANSFORMERS_MODELING))
    warnings.filterwarnings("ignore", message=SINGLE_PROCESS_DCP_WARNING, category=UserWarning,
                            module=r"torch\.distributed\.checkpoint\.")
    logger = logging.getLogger(TRANSFORMERS_MODELING)
    if not any(isinstance(f, LoadReportFilter) for f in logger.filters):
        logger.addFilter(LoadReportFilter())
    import tqdm.auto

    if not getattr(tqdm.auto.tqdm, "_shardforge_quiet", False):
        # datasets' bar class subclasses tqdm.auto.tqdm when datasets is imported: it inherits this
        tqdm.auto.tqdm = quiet_bar_class(tqdm.auto.tqdm)
        tqdm.auto.tqdm._shardforge_quiet = True
