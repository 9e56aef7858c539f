"""Hostile inputs and tampered checkpoints through the real CLI; counts what went wrong.

    python -m benchmarks.adversarial [--only NAME,...] [--out benchmarks/results/adversarial.json]

Each case runs ``shardforge plan|run|submit|export`` as a user (or an attacker) would and is
classified by what came back:

* ``exit2``: refused cleanly: exit 2, no Python traceback, the last line names the problem;
* ``ok``: a case that must work did (exit 0), touching nothing it must not;
* ``traceback``: a traceback reached the console, or an exit code other than 2;
* ``hang``: no answer within the case's time limit (the process tree is killed);
* ``silent``: exit 0: the bad input was accepted;
* ``data_lost``: a committed checkpoint or the run's ``recipe.yaml`` changed or vanished;
* ``code_executed``: a planted pickle created its marker file.

The goal is 0 in every column but ``exit2`` and ``ok``. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("exit2", "ok", "traceback", "hang", "silent", "data_lost", "code_executed")


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Case:
    name: str
    args: Callable[["World"], list[str]]
    """The CLI arguments (after ``python -m launch``), given the prepared world."""
    prepare: Optional[Callable[["World"], None]] = None
    """Tamper with files before the command (plant a pickle, write bad data)."""
    timeout_s: float = 180.0
    guarded: list[str] = field(default_factory=list)
    """Run directories whose checkpoints and recipe.yaml must come through unchanged."""
    cwd: Optional[str] = None
    """Where the command runs (under the world's temp dir; default: the repository), through the
    installed ``shardforge`` script rather than ``python -m launch``, as a user in that folder runs it."""
    untouched: list[str] = field(default_factory=list)
    """Folders (under the world's temp dir) whose every file must come through unchanged: a user's."""
    succeeds: bool = False
    """A case that must work (exit 0), like a launch from a project folder holding its own train.py."""


class World:
    """A corpus, recipes, and stopped runs (ddp, zero2) to tamper with, in one temp dir."""

    def __init__(self, tmp: Path):
        sys.path.insert(0, str(REPO))
        from tests.helpers import make_corpus, tiny_recipe

        self.tmp, self.tiny_recipe = tmp, tiny_recipe
        self.corpus = make_corpus(tmp / "corpus")
        self.marker = tmp / "pwned"
        self._stopped: dict[str, Path] = {}

    def stopped(self, engine: str) -> Path:
        """The recipe of a run of ``engine`` stopped with a checkpoint at step 2 (launched on first use)."""
        if engine not in self._stopped:
            path = self.recipe(f"stopped-{engine}", parallel={"engine": engine, "precision": "fp32", "nproc": 2},
                               train={"max_steps": 4, "stop_after": 2})
            code, out, _ = run_cli(["run", str(path)], 600)
            if code != 75:
                raise SystemExit(f"adversarial: preparing the {engine} run failed (exit {code}):\n{out[-3000:]}")
            self._stopped[engine] = path
        return self._stopped[engine]

    def recipe(self, name: str, text: Optional[str] = None, **sections) -> Path:
        import yaml

        path = self.tmp / f"{name}.yaml"
        if text is not None:
            path.write_text(text)
        else:
            r = self.tiny_recipe(self.corpus, self.tmp / "cache", self.tmp / name, **sections)
            path.write_text(yaml.safe_dump(r))
        return path

    def copy_run(self, engine: str, name: str) -> Path:
        """A copy of the stopped ``engine`` run as ``name`` (recipe file and run directory)."""
        import yaml

        r = yaml.safe_load(self.stopped(engine).read_text())
        shutil.copytree(r["run"]["dir"], self.tmp / name)
        r["run"]["dir"] = str(self.tmp / name)
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r))
        return path

    def plant(self, run: str, rel: str, torch_format: bool) -> None:
        import torch

        from train.checkpoint.files import MANIFEST, file_digest, sealed_manifest

        ckpt = self.tmp / run / "checkpoints" / "step-000002"
        with open(ckpt / rel, "wb") as f:
            torch.save({"x": Exploit(self.marker)}, f) if torch_format else pickle.dump(Exploit(self.marker), f)
        manifest = json.loads((ckpt / MANIFEST).read_text())
        manifest["files"][rel] = file_digest(ckpt / rel)
        (ckpt / MANIFEST).write_text(json.dumps(sealed_manifest(manifest, ckpt)))  # resealed by the attacker


def run_cli(args: list[str], timeout_s: float, cwd: Optional[Path] = None) -> tuple[Optional[int], str, float]:
    """(exit code or None on a hang, output, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    start = time.monotonic()
    command = [str(Path(sys.executable).parent / "shardforge")] if cwd else [sys.executable, "-m", "launch"]
    proc = subprocess.Popen([*command, *args], cwd=cwd or REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out, time.monotonic() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out, time.monotonic() - start


def fingerprint(run_dir: Path) -> dict:
    """Digests of the committed checkpoints' manifests and of recipe.yaml: what must not change."""
    files = [run_dir / "recipe.yaml", *sorted((run_dir / "checkpoints").glob("step-*/manifest.json"))]
    return {str(f.relative_to(run_dir)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}


def tree(root: Path) -> dict:
    """Every file under ``root`` (links not followed) with its digest: a user's folder, whole."""
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file() and not f.is_symlink()} if root.exists() else {}


def _user_file_cases() -> list[Case]:
    """Issue 35: a user's folders are never adopted, written into or followed into."""
    def users_folder(w: World) -> list[str]:
        folder = w.tmp / "my-folder"
        (folder / "checkpoints" / "step-000002").mkdir(parents=True, exist_ok=True)
        (folder / "checkpoints" / "step-000002" / "weights.bin").write_bytes(b"mine")
        (folder / "checkpoints" / ".tmp-mine").mkdir(exist_ok=True)
        (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
        (folder / "logs").mkdir(exist_ok=True)
        return ["run", "tiny-cpu", f"run.dir={folder}", "train.max_steps=2"]

    def inside_a_checkpoint(w: World) -> list[str]:
        w.copy_run("ddp", "host") if not (w.tmp / "host").exists() else None
        return ["run", str(w.recipe("nested")), f"run.dir={w.tmp / 'host' / 'checkpoints' / 'step-000002' / 'run'}"]

    def export_into_checkpoints(w: World) -> list[str]:
        w.copy_run("ddp", "host") if not (w.tmp / "host").exists() else None
        return ["export", str(w.tmp / "host"), str(w.tmp / "host" / "checkpoints" / "exported")]

    def linked_step(w: World) -> list[str]:
        w.copy_run("ddp", "linked") if not (w.tmp / "linked").exists() else None
        outside = w.tmp / "outside" / "step-000001"
        outside.mkdir(parents=True, exist_ok=True)
        (outside / "manifest.json").write_text('{"step": 1, "files": {}}')
        link = w.tmp / "linked" / "checkpoints" / "step-000001"
        link.unlink(missing_ok=True)
        link.symlink_to(outside)
        return ["export", str(w.tmp / "linked"), str(w.tmp / "linked-export"), "--step", "1"]

    def resume_past_a_link(w: World) -> list[str]:
        linked_step(w)
        path = w.tmp / "linked.yaml"  # the copy's recipe: resumes from step 2, saves and prunes (keep_last 1)
        return ["run", str(path), "train.stop_after=0", "checkpoint.every_steps=1", "checkpoint.keep_last=1"]

    def project_folder(w: World) -> list[str]:
        project = w.tmp / "project"
        project.mkdir(exist_ok=True)
        for name in ("train.py", "launch.py"):
            (project / name).write_text(f"open({str(w.marker)!r}, 'w').write('{name} ran')\n")
        return ["run", str(w.recipe("from-project")), f"run.dir={project / 'runs' / 'p'}"]

    return [
        Case("run: run.dir is a user's folder", users_folder, untouched=["my-folder"]),
        Case("run: run.dir inside another run's checkpoint", inside_a_checkpoint, guarded=["host"],
             untouched=["host/checkpoints"]),
        Case("export: into a run's checkpoints", export_into_checkpoints, guarded=["host"]),
        Case("export: --step of a step directory linked out of the run", linked_step, untouched=["outside"]),
        Case("run: resume, save and prune beside a linked step directory", resume_past_a_link, untouched=["outside"],
             succeeds=True),
        Case("run: from a project folder holding train.py and launch.py", project_folder, succeeds=True,
             cwd="project"),
        Case("plan: train.max_steps beyond int64",
             lambda w: ["plan", "tiny-cpu", "train.max_steps=99999999999999999999999"]),
        Case("plan: run.name of 300 characters", lambda w: ["plan", "tiny-cpu", "run.name=" + "r" * 300]),
        Case("submit: slurm.partition ending in a newline (quoted in the recipe file)",
             lambda w: ["submit", str(w.recipe("partition", (REPO / "configs" / "tiny-cpu.yaml").read_text()
                                               + 'slurm:\n  partition: "gpu\\n"\n')), f"run.dir={w.tmp / 'sub'}",
                        "--dry-run"]),
    ]


def _yaml_cases() -> list[Case]:
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{k}: &{k} [{', '.join(['*' + p] * 10)}]\n" for p, k in zip("abcdefgh", "bcdefghi"))
    cases = [Case(f"plan {o}", (lambda w, o=o: ["plan", "tiny-cpu", *o.split()])) for o in (
        "checkpoint.every_steps=-1", "checkpoint.every_minutes=-5", "data.val_fraction=0", "data.num_workers=-1",
        "data.max_samples=0", "run.seed=-1", "optim.lr=.nan", "optim.lr=.inf", "train.global_batch_size=10",
        "parallel.engine=zero4", "model.config=null model.pretrained=data/minilm")]
    cases += [
        Case("plan: duplicate section", lambda w: ["plan", str(w.recipe("dup", "train: {max_steps: 3}\ntrain: {log_every: 1}\n"))]),
        Case("plan: YAML alias bomb", lambda w: ["plan", str(w.recipe("bomb", bomb))], timeout_s=60),
        Case("plan: run.name ending in a newline",
             lambda w: ["plan", str(w.recipe("newline", (REPO / "configs" / "tiny-cpu.yaml").read_text().replace(
                 "name: tiny-cpu", 'name: "x\\n"')))]),
        Case("run: parallel.nproc=1000 on CPU", lambda w: ["run", "tiny-cpu", f"run.dir={w.tmp / 'n1000'}",
                                                           "parallel.nproc=1000", "train.global_batch_size=16000"]),
    ]
    return cases


def _data_cases() -> list[Case]:
    def source(name: str, data: bytes, suffix: str = ".txt"):
        def make(w: World) -> list[str]:
            f = w.tmp / f"{name}{suffix}"
            f.write_bytes(data)
            return ["run", str(w.recipe(name, data={"sources": [{"path": str(f)}], "seq_len": 32}))]
        return make

    return [
        Case("run: empty .txt", source("empty", b"")),
        Case("run: binary file as .txt", source("binary", os.urandom(100_000))),
        Case("run: jsonl record without the text field",
             source("holes", b'{"text": "to be or not"}\n' * 200 + b'{"other": 1}\n', ".jsonl")),
        Case("run: global batch larger than the data",
             lambda w: ["run", str(w.recipe("big-batch", data={"max_samples": 4}))]),
        Case("run: checkpoint.resume is not a checkpoint",
             lambda w: ["run", str(w.recipe("not-ckpt", checkpoint={"resume": str(w.tmp)}))]),
    ]


def _lock_case() -> Case:
    def args(w: World) -> list[str]:
        path = w.copy_run("ddp", "locked")
        lock = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": None, "token": "x", "heartbeat": time.time()}
        (w.tmp / "locked" / "lock.json").write_text(json.dumps(lock))  # this (live) process holds it
        return ["run", str(path), "train.stop_after=0"]
    return Case("run: second launch on a live run directory", args, guarded=["locked"])


def classify(case: Case, world: World) -> dict:
    world.marker.unlink(missing_ok=True)
    args = case.args(world)
    before = {name: fingerprint(world.tmp / name) for name in case.guarded}
    whole = {name: tree(world.tmp / name) for name in case.untouched}
    code, out, seconds = run_cli(args, case.timeout_s, world.tmp / case.cwd if case.cwd else None)
    lines = [line for line in out.strip().splitlines() if line.strip()]
    result = {"case": case.name, "exit": code, "seconds": round(seconds, 1), "last_line": lines[-1][:300] if lines else ""}
    if world.marker.exists():
        result["class"] = "code_executed"
    elif any(fingerprint(world.tmp / name) != before[name] for name in case.guarded) or \
            any(tree(world.tmp / name) != whole[name] for name in case.untouched):
        result["class"] = "data_lost"
    elif code is None:
        result["class"] = "hang"
    elif case.succeeds:
        result["class"] = "ok" if code == 0 else "traceback"
        result.update({} if code == 0 else {"tail": out[-2000:]})
    elif code == 0:
        result["class"] = "silent"
    elif code == 2 and "Traceback" not in out:
        result["class"] = "exit2"
    else:
        result["class"] = "traceback"
        result["tail"] = out[-2000:]
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adversarial", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "adversarial.json")
    args = parser.parse_args(argv)
    from benchmarks.adversarial_checkpoints import checkpoint_cases  # imports Case and World from here

    cases = _yaml_cases() + _data_cases() + checkpoint_cases() + [_lock_case()] + _user_file_cases()
    if args.only:
        cases = [c for c in cases if any(s in c.name for s in args.only.split(","))]
        if not cases:
            print(f"adversarial: no case matches --only {args.only!r}", file=sys.stderr)
            return 2
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="adversarial-") as tmp:
        world = World(Path(tmp))
        results = []
        for case in cases:
            results.append(classify(case, world))
            r = results[-1]
            print(f"{r['class']:>13}  exit {r['exit']!s:>4}  {r['seconds']:6.1f}s  {r['case']}: {r['last_line'][:110]}",
                  flush=True)
    counts = {c: sum(r["class"] == c for r in results) for c in COLUMNS}
    print("\n| tried | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 1))
    print(f"| {len(results)} | " + " | ".join(str(counts[c]) for c in COLUMNS) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
                                    "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
                                    "command": "python -m benchmarks.adversarial " + " ".join(argv or sys.argv[1:]),
                                    "seconds": round(time.time() - start), "counts": counts, "tried": len(results),
                                    "cases": results}, indent=1))
    return 0 if counts["exit2"] + counts["ok"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
