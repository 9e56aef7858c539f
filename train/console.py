"""The ``shardforge`` logger on the console.

Every part logs to ``logging.getLogger("shardforge")``; the entry points (the rank program, the
CLI) call :func:`show_on_console`, which prints its records as plain lines on stdout, ``warning: ``
before a warning: what users read in a job log stays one line per event, from rank 0 only.
A program that imports the parts without calling it gets the library default (warnings on stderr).
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "shardforge"

_HIDDEN = logging.CRITICAL + 1


class ConsoleHandler(logging.Handler):
    """Writes to the ``sys.stdout`` of the moment, not the one at start (tests and the agent's pipes
    replace it), and flushes each line so a job log is current when a rank is killed. A closed
    stdout (a broken pipe) drops the lines quietly: training goes on, its files say the rest."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):  # closed, or a pipe nobody reads any more
            pass
        except Exception:  # noqa: BLE001 - logging never raises into the training loop
            self.handleError(record)


class PlainFormatter(logging.Formatter):
    """The message alone; ``warning: `` / ``error: `` before those levels."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            text = f"error: {text}"
        elif record.levelno >= logging.WARNING:
            text = f"warning: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def show_on_console(shown: bool) -> None:
    """Print the ``shardforge`` records of INFO and above on stdout, or (``shown`` false: a rank
    other than 0, whose lines would repeat rank 0's) nothing at all. Idempotent. Shown records do
    not also go on to a handler of the root logger (a program's ``basicConfig``): one copy each."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, (ConsoleHandler, logging.NullHandler))]:
        logger.removeHandler(handler)
    if shown:
        handler = ConsoleHandler()
        handler.setFormatter(PlainFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(_HIDDEN)
        logger.propagate = True
