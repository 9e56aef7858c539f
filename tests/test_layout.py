"""The layout rules of the code base, checked with ``ast`` so they stay true (issue 18 adds more
as the redesign lands: loop length, file sizes, no import cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_train_never_imports_launch():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "launch")
                 for p in (REPO / "train").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_launch_reaches_the_rank_program_only_through_its_entry_point():
    """``launch`` starts ``python -m train``; it never imports the loop for its constants."""
    offenders = {str(p.relative_to(REPO)) for p in (REPO / "launch").rglob("*.py")
                 if {"train.loop", "train.__main__"} & imported_modules(p)}
    assert not offenders


def test_the_run_directory_vocabulary_imports_nothing_heavy():
    """launch, the agent and the Slurm job script read status.json through train.rundir."""
    top_level = {n.names[0].name if isinstance(n, ast.Import) else n.module
                 for n in ast.parse((REPO / "train" / "rundir.py").read_text()).body
                 if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert not {m for m in top_level if m and m.split(".")[0] in ("torch", "transformers", "datasets", "deepspeed")}
