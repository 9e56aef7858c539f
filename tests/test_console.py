"""The ``shardforge`` logger on the console (train/console.py): rank 0's lines as plain text on the
stdout of the moment, ``warning: `` before a warning; on the other ranks nothing, not even the
warnings Python's last-resort handler would print to stderr."""

from __future__ import annotations

import logging

import pytest

from train.console import ConsoleHandler, show_on_console


@pytest.fixture
def restored():
    logger = logging.getLogger("shardforge")
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_rank0_prints_plain_lines_and_names_warnings(restored, capsys):
    show_on_console(True)
    show_on_console(True)  # idempotent: one handler, one copy of each line
    restored.info("checkpoint: saved step-000004 (periodic, 0.1s)")
    restored.warning("telemetry: NVML read failed (lost); GPU metrics off")
    restored.debug("not shown")
    out, err = capsys.readouterr()
    assert out == ("checkpoint: saved step-000004 (periodic, 0.1s)\n"
                   "warning: telemetry: NVML read failed (lost); GPU metrics off\n")
    assert err == "" and sum(isinstance(h, ConsoleHandler) for h in restored.handlers) == 1


def test_other_ranks_print_nothing(restored, capsys):
    show_on_console(False)
    restored.info("data: 1,000 tokens kept")
    restored.warning("a warning every rank would repeat")
    assert capsys.readouterr() == ("", "")
    show_on_console(True)  # a later call may show it again (the CLI after an in-process launch)
    restored.info("shown")
    assert capsys.readouterr().out == "shown\n"


def test_shown_lines_are_not_repeated_by_a_root_handler(restored, capsys):
    """A program that configured logging itself (``basicConfig``) gets each line once."""
    seen: list[str] = []
    root_handler = logging.Handler()
    root_handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger().addHandler(root_handler)
    try:
        show_on_console(True)
        restored.warning("once")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert capsys.readouterr().out == "warning: once\n" and seen == []
