"""Marks every test that launches training (``-m launch``), so ``make test-fast`` can leave them out.

A test launches when its body calls one of the launching helpers or it uses a fixture that
launches. Read from the source, so a new test is marked without anyone remembering to.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "function", None)
        if function is None:
            continue
        if _called_names(function) & LAUNCHING_CALLS or set(item.fixturenames) & LAUNCHING_FIXTURES:
            item.add_marker(pytest.mark.launch)
