"""Marks every test that launches training (``-m launch``), so ``make test-fast`` can leave them out,
and groups the tests for ``make test``'s two workers (pytest-xdist, ``--dist loadfile``).

A test launches when its body calls one of the launching helpers or it uses a fixture that
launches. Read from the source, so a new test is marked without anyone remembering to.

Workers: a file's tests stay together (its module fixtures train once), and the Slurm files
share one worker, since they spend most of their time waiting on the scheduler (requeue delays,
time-limit checks): they go first, so that waiting overlaps the other worker's CPU-bound files,
which follow with the most launches first (the longest files do not end up last, alone).
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import World, make_corpus

LAUNCHING_CALLS = {"run_recipe", "launch_in_process", "launch", "submit", "Popen", "_cli", "torchrun_program"}
"""Helpers (in tests/helpers.py and the test files) that start ``shardforge run``, a job or the ranks."""
LAUNCHING_FIXTURES = {"straight", "reference", "cluster", "logged_run"}
"""Module fixtures that train once and are shared by the tests of their file."""


def _called_names(function) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return {node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Name, ast.Attribute))}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "launch: starts training processes (left out by `make test-fast`)")
    config.addinivalue_line("markers", "slow: runs for 10 s or more without launching (left out by `make test-fast`)")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> World:
    """One per test module: a temp folder named after the module, a corpus, a shared data cache."""
    tmp = tmp_path_factory.mktemp(Path(request.module.__file__).stem.removeprefix("test_"))
    return World(tmp, make_corpus(tmp / "corpus"), tmp / "cache")


WAITING_FILES = ("test_slurm.py", "test_slurm_nodes.py", "test_slurm_prepare.py")
"""Files whose tests mostly wait on Slurm: one unit of work, scheduled first."""


def _group(path: str) -> str:
    """The unit of work a test file belongs to (a test's path, or its node id)."""
    file = path.split("::", 1)[0]
    return "slurm" if Path(file).name in WAITING_FILES else file


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook; `make test` runs with --dist loadfile
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile``, with the Slurm files as one unit. (Marking tests ``xdist_group`` for
    ``--dist loadgroup`` does nothing with pytest 9.2: pytest-xdist issue #1386.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return FileGroups(config, log)


def _fixture_launches(item: pytest.Item, name: str) -> bool:
    """Whether the fixture ``name`` calls a launching helper itself (a module fixture that trains)."""
    info = getattr(item, "_fixtureinfo", None)
    for definition in (info.name2fixturedefs.get(name, ()) if info is not None else ()):
        func = getattr(definition, "func", None)
        try:
            if func is not None and _called_names(func) & LAUNCHING_CALLS:
                return True
        except (OSError, TypeError, SyntaxError):  # a fixture without Python source (pytest's own)
            continue
    return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    launches: dict[str, int] = {}
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and (_called_names(function) & LAUNCHING_CALLS
                                     or set(item.fixturenames) & LAUNCHING_FIXTURES
                                     or any(_fixture_launches(item, name) for name in item.fixturenames)):
            item.add_marker(pytest.mark.launch)
            launches[_group(item.nodeid)] = launches.get(_group(item.nodeid), 0) + 1
    # A stable sort: each file's tests keep their order (and each module fixture its life).
    items.sort(key=lambda item: (_group(item.nodeid) != "slurm", -launches.get(_group(item.nodeid), 0)))


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(autouse=True)
def _shardforge_logger_restored() -> Iterator[None]:
    """An in-process launch (``cli.main``) shows the ``shardforge`` logger on the console; the next
    test starts from the logger as it was, so what it prints does not depend on the order."""
    logger = logging.getLogger("shardforge")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The messages the ``shardforge`` logger gets during the test, INFO and above, in order
    (whatever an earlier in-process launch set its console to)."""
    logger, lines = logging.getLogger("shardforge"), []
    handler, level = _Lines(lines), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
