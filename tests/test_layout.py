"""The layout rules of the code base (issue 18), checked with ``ast`` so they stay true."""

from __future__ import annotations

import ast
import re
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
                 if {"train.loop.trainer", "train.__main__"} & imported_modules(p)}
    assert not offenders


def test_the_run_directory_vocabulary_imports_nothing_heavy():
    """launch, the agent and the Slurm job script read status.json through train.rundir."""
    top_level = {n.names[0].name if isinstance(n, ast.Import) else n.module
                 for n in ast.parse((REPO / "train" / "rundir.py").read_text()).body
                 if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert not {m for m in top_level if m and m.split(".")[0] in ("torch", "transformers", "datasets", "deepspeed")}


def _py_files(*tops: str) -> list[Path]:
    return [p for top in tops for p in (REPO / top).rglob("*.py")]


def test_no_file_is_longer_than_400_lines():
    long = {str(p.relative_to(REPO)): n for p in _py_files("train", "launch", "benchmarks", "tests", "examples")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_the_training_function_fits_on_one_screen():
    """``train.loop.trainer.train`` builds the parts and runs the loop: at most 80 lines."""
    tree = ast.parse((REPO / "train" / "loop" / "trainer.py").read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert fn.end_lineno - fn.lineno + 1 <= 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_train_has_no_import_cycle():
    """Every import counts, also one inside a function (a cycle dodged that way is still a cycle)."""
    modules = {_module_name(p): p for p in _py_files("train")}
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name}
             for name, path in modules.items()}
    for name in graph:  # a package's __init__ is not a dependency of its own submodules
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, " → ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_only_the_engines_package_knows_engine_names():
    """Callers ask ``train.engines.capabilities``; nobody tests ``parallel.engine`` by name."""
    pattern = re.compile(r"""startswith\(\s*["']zero|engine\s*(==|!=|in|not in)\s*[("']|engine\[-1\]""")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in _py_files("train", "launch")
                 if "engines" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders


def test_launch_builds_no_trainer_part():
    """The launcher starts ``python -m train``; the step, its parts and the engine classes stay out of it."""
    forbidden = {"train.loop.trainer", "train.loop.step", "train.loop.save_schedule", "train.metrics.step_metrics",
                 "train.loop.agreement", "train.loop.nonfinite",
                 "train.engines.base", "train.engines.torch_engines", "train.engines.deepspeed_engine"}
    offenders = {str(p.relative_to(REPO)): sorted(forbidden & imported_modules(p)) for p in _py_files("launch")}
    assert not {k: v for k, v in offenders.items() if v}


ROOMS = ("checkpoint", "config", "data", "engines", "loop", "metrics")
"""train/'s rooms; every other module of train/ (model, rundir, tasks, distributed, ...) is ``core``."""
MAY_IMPORT = {
    "core": {"checkpoint", "config", "data", "engines", "metrics"},  # run files, model building, task scores
    "config": {"core", "checkpoint", "data", "engines"},  # model checks, data paths, the memory plan, saved engines
    "data": {"core", "config"},
    "engines": {"core", "config", "checkpoint"},  # checkpoint: the file format and safe loading
    "checkpoint": {"core", "config", "engines"},  # how a checkpoint is written and read; when: loop.save_schedule
    "metrics": {"core", "config", "checkpoint"},  # checkpoint: the test split's best weights
    "loop": {"core", "config", "checkpoint", "data", "engines", "metrics"},  # the trainer puts the parts together
}
"""Which room of train/ may import which (``train/__main__.py``, the entry point, may import any).
Nothing imports ``launch``, and no room imports ``loop``: the loop puts the parts together and
decides when each acts (the save schedule, the agreement, the stop); stop signals and fault hooks,
which parts below it need, are core (``train/stop_signals.py``, ``train/faults.py``)."""


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "core"


def test_each_room_of_train_imports_only_the_rooms_it_may():
    offenders = {}
    for path in _py_files("train"):
        name = _module_name(path)
        if name == "train.__main__":
            continue
        rooms = {_room(m) for m in imported_modules(path) if m.split(".")[0] == "train"} - {_room(name)}
        if extra := rooms - MAY_IMPORT[_room(name)]:
            offenders[name] = sorted(extra)
    assert not offenders, offenders


def test_only_the_entry_point_imports_the_loop():
    """The loop is the top of train/: a part that needs it (a type, a hook) has it in its own room."""
    offenders = {_module_name(p): sorted(m for m in imported_modules(p) if m.startswith("train.loop"))
                 for p in _py_files("train") if _room(_module_name(p)) != "loop" and p.name != "__main__.py"}
    assert not {k: v for k, v in offenders.items() if v}
