"""``shardforge submit``: render the sbatch script (a pure function) and hand it to ``sbatch``.

:func:`render_sbatch` turns a recipe into the job script from ``slurm/job.sbatch`` and nothing
else: no clock, no environment, no file system, so golden files pin its output. Values that
end up in ``#SBATCH`` lines must be plain tokens (Slurm does not parse shell quoting there);
anything else is refused with the key and the fix. Values in shell lines are quoted.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, cast

from train.config.loading import RecipeError
from train.config.recipe import SLURM_SIGNAL_SLACK_S, Recipe
from train.rundir import EXIT_REQUEUE

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "job.sbatch"
_PLAIN = re.compile(r"^[A-Za-z0-9._:@+=,/-]+$")  # safe inside an #SBATCH line, unquoted
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_IFNAMES = re.compile(r"[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*")  # GLOO_/NCCL_SOCKET_IFNAME: a comma list


def _plain(key: str, value: str, problems: list[str]) -> str:
    if not _PLAIN.fullmatch(value):
        bad = sorted({c for c in value if not _PLAIN.fullmatch(c)})
        problems.append(f"{key}={value!r}: characters {''.join(bad)!r} cannot go into an #SBATCH line; "
                        f"use letters, digits and ._:@+=,/-")
    return value


def _nproc(recipe: Recipe) -> int:
    return recipe.parallel.nproc or max(1, recipe.slurm.gpus_per_node)  # resolved by load_recipe(for_slurm=True)


def _shared_lines(recipe: Recipe, problems: list[str]) -> list[str]:
    """``--mem``, ``--partition``, ``--account``, ``--qos`` and ``--time``: the same for every job of a recipe."""
    s, lines = recipe.slurm, []
    if s.mem:
        lines.append(f"--mem={_plain('slurm.mem', s.mem, problems)}")
    for key in ("partition", "account", "qos"):
        if getattr(s, key):
            lines.append(f"--{key}={_plain(f'slurm.{key}', getattr(s, key), problems)}")
    if not _TIME.fullmatch(s.time):
        problems.append(f"slurm.time={s.time!r}: not a Slurm time; use minutes, HH:MM:SS or D-HH:MM:SS")
    return lines + [f"--time={s.time}"]


def _extra_lines(recipe: Recipe, problems: list[str]) -> list[str]:
    for i, extra in enumerate(recipe.slurm.extra_sbatch):
        if not (extra.startswith("--") and _PLAIN.fullmatch(extra)):
            problems.append(f"slurm.extra_sbatch[{i}]={extra!r}: give one option like --constraint=h100 "
                            f"(no spaces, quotes or shell characters)")
    return list(recipe.slurm.extra_sbatch)


def _env_lines(recipe: Recipe, problems: list[str]) -> list[str]:
    s, env = recipe.slurm, []
    if s.network_interface is not None:  # before slurm.env, which may still override either
        if not _IFNAMES.fullmatch(s.network_interface):
            problems.append(f"slurm.network_interface={s.network_interface!r}: give interface names like ib0 or "
                            f"eth0,eth1 (letters, digits and ._:-, separated by commas)")
        env += [f"export {name}={shlex.quote(s.network_interface)}" for name in ("GLOO_SOCKET_IFNAME",
                                                                                   "NCCL_SOCKET_IFNAME")]
    for name, value in s.env.items():
        if not _ENV_NAME.fullmatch(str(name)):
            problems.append(f"slurm.env: {name!r} is not an environment variable name")
        env.append(f"export {name}={shlex.quote(str(value))}")
    return env


ELASTIC_STEP = """
# Elastic shrink (slurm.min_nodes): Slurm gave this job $SLURM_NNODES of {min_nodes}..{max_nodes} nodes. Fit
# recipe.yaml and the engine configs to them (the same global batch, accumulation scaled) before
# the ranks start, or end the job FAILED with one line when the global batch cannot be kept.
"$PYTHON" -m launch.elastic "$RUN_DIR" "$SLURM_NNODES" --max-nodes={max_nodes} || exit $?
"""
"""The job-start step of an elastic job (``{{elastic}}`` in the template; empty without ``slurm.min_nodes``)."""


def batch_unit(recipe: Recipe, micro: int, nodes: int) -> int:
    """micro-batch × nproc × nodes: what ``train.global_batch_size`` must be a multiple of on ``nodes``
    nodes (each rank takes whole micro-batches). The one divisibility rule of a node range: both
    :func:`node_range` and ``launch.elastic.shrink_problems`` test with it."""
    return micro * _nproc(recipe) * nodes


def node_range(recipe: Recipe, problems: list[str]) -> Optional[int]:
    """``slurm.min_nodes`` when the job may run on fewer nodes than ``parallel.nodes`` (``None``: exactly
    ``parallel.nodes``). Refuses a minimum outside 1..nodes and a global batch that does not divide on
    some node count of the range (one line each, with the arithmetic and the fix): ``submit`` refuses
    them before anything is written, instead of the job failing when Slurm first gives it fewer nodes."""
    nodes, low, t = recipe.parallel.nodes, recipe.slurm.min_nodes, recipe.train
    if low is None or low == nodes:
        return None
    if not 1 <= low <= nodes:
        problems.append(f"slurm.min_nodes={low}: must be between 1 and parallel.nodes={nodes} (the job runs on "
                        f"min_nodes to nodes nodes); set slurm.min_nodes to 1..{nodes}, or leave it unset")
        return None
    micro, nproc = t.micro_batch_size, _nproc(recipe)
    if not isinstance(micro, int) or micro < 1 or t.global_batch_size < 1:
        return low  # auto-fit resolves the micro-batch first; a bad size is check_recipe's to refuse
    if "train.micro_batch_size" in recipe.parallel.fitted:
        micro = 1  # chosen again at job start for the nodes it got: any that divides the batch per rank
    units = {n: batch_unit(recipe, micro, n) for n in range(low, nodes + 1)}
    bad = [n for n, unit in units.items() if n < nodes and t.global_batch_size % unit]  # check_recipe: nodes
    every = math.lcm(*units.values())
    fits = -(-t.global_batch_size // every) * every  # the smallest multiple of every unit, at least the batch
    fix = (f"set train.global_batch_size={fits} (divisible on {low}..{nodes} nodes) or "
           if fits <= 4 * t.global_batch_size else "set ")  # a wide range can need a batch far too large
    for n in bad:
        problems.append(f"slurm.min_nodes={low}: on {n} node{'s' if n > 1 else ''}, train.global_batch_size "
                        f"{t.global_batch_size} is not divisible by micro_batch_size × nproc × nodes = "
                        f"{micro} × {nproc} × {n} = {units[n]}; {fix}slurm.min_nodes={max(bad) + 1}")
    return low


def job_dependency(job: Optional[str]) -> Optional[str]:
    """The ``#SBATCH`` dependency of ``submit --after JOB`` (``None`` without), or :class:`RecipeError`."""
    if job is None:
        return None
    if not re.fullmatch(r"\d+", job):
        raise RecipeError("--after", [f"{job!r} is not a Slurm job id; give the number `submit --prepare` printed"])
    return f"--dependency=afterok:{job}"


def render_sbatch(recipe: Recipe, run_dir: Path, python: str, pythonpath: str, after: Optional[str] = None) -> str:
    """The job script for ``recipe`` (pure: the same inputs always give the same text); ``after``: an
    ``#SBATCH --dependency=...`` value (:func:`job_dependency`)."""
    s, problems = recipe.slurm, cast(list[str], [])
    log = run_dir / "logs" / "slurm-%j.out"
    _plain("run.dir", str(run_dir), problems)
    low, nodes = node_range(recipe, problems), recipe.parallel.nodes
    # A node range with --ntasks-per-node makes sbatch ask for MIN tasks, which Slurm places on MIN
    # nodes: an elastic job leaves it out (one task per node is sbatch's default; srun sets it).
    lines = [f"--job-name={_plain('run.name', recipe.run.name, problems)}",
             f"--nodes={nodes}" if low is None else f"--nodes={low}-{nodes}",
             *(["--ntasks-per-node=1"] if low is None else []),
             f"--cpus-per-task={s.cpus_per_task}"]
    if s.gpus_per_node:
        lines.append(f"--gpus-per-node={s.gpus_per_node}")
    lines += _shared_lines(recipe, problems)
    lines += [f"--output={log}",
              "--open-mode=append",  # a requeued job appends instead of truncating the log
              "--requeue",
              f"--signal=USR1@{s.signal_lead_s}"]
    lines += _extra_lines(recipe, problems) + ([after] if after else [])
    env = _env_lines(recipe, problems)
    if s.signal_lead_s < SLURM_SIGNAL_SLACK_S + 10:
        problems.append(f"slurm.signal_lead_s={s.signal_lead_s}: Slurm checks time limits about every "
                        f"{SLURM_SIGNAL_SLACK_S} s, so its USR1 can come that much after the lead; set at least "
                        f"{SLURM_SIGNAL_SLACK_S + 10} (a step, a save and {SLURM_SIGNAL_SLACK_S} s)")
    if s.max_restarts < 0:
        problems.append(f"slurm.max_restarts={s.max_restarts}: must be 0 or more")
    if problems:
        raise RecipeError("slurm job", problems)
    omp = max(1, s.cpus_per_task // _nproc(recipe))
    values = {"sbatch": "\n".join(f"#SBATCH {line}" for line in lines), "run_dir": shlex.quote(str(run_dir)),
              "python": shlex.quote(python), "pythonpath": shlex.quote(pythonpath),
              "max_restarts": str(s.max_restarts), "lead": str(s.signal_lead_s), "nproc": str(_nproc(recipe)),
              "omp_threads": str(omp), "env": "\n".join(env), "exit_requeue": str(EXIT_REQUEUE),
              "elastic": "" if low is None else ELASTIC_STEP.format(min_nodes=low, max_nodes=nodes)}
    text = TEMPLATE.read_text()
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)


def submit(recipe: Recipe, run_dir: Path, dry_run: bool, after: Optional[str] = None) -> int:
    """Write ``job.sbatch`` into the run directory and ``sbatch`` it (or print it for ``--dry-run``)."""
    repo = str(Path(__file__).resolve().parents[1])
    script = render_sbatch(recipe, run_dir, sys.executable, repo, after)
    if dry_run:
        print(script, end="")
        return 0
    job_id = _sbatch(run_dir, run_dir / "job.sbatch", script)
    print(f"shardforge: submitted job {job_id}\n  run directory: {run_dir}\n"
          f"  log: {run_dir / 'logs' / f'slurm-{job_id}.out'}")
    return 0


def _sbatch(run_dir: Path, path: Path, script: str) -> str:
    """Write ``script`` to ``path`` and ``sbatch`` it; the job id."""
    path.write_text(script)
    if shutil.which("sbatch") is None:
        raise RecipeError("sbatch", ["not found on PATH; submit from a Slurm login node, or train here "
                                     f"with `shardforge run {run_dir / 'recipe.yaml'}`"])
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RecipeError("sbatch", [f"refused {path}: {proc.stderr.strip() or proc.stdout.strip()}"])
    return proc.stdout.strip().split(";")[0]


PREPARE_TEMPLATE = TEMPLATE.with_name("prepare.sbatch")
MAX_TASKS = 1000
"""Most tasks of a prepare array (Slurm's default ``MaxArraySize`` is 1001)."""


def render_prepare_sbatch(recipe: Recipe, run_dir: Path, python: str, pythonpath: str, tasks: int) -> str:
    """The array job script of ``submit --prepare`` (pure): ``tasks`` one-node tasks, each running
    ``shardforge prepare run_dir/recipe.yaml --task $SLURM_ARRAY_TASK_ID --tasks N``."""
    s, problems = recipe.slurm, list[str]()
    _plain("run.dir", str(run_dir), problems)
    if recipe.task != "causal_lm":
        problems.append(f"task: {recipe.task}: --prepare splits pre-training data (task: causal_lm) only; "
                        f"fine-tuning data is prepared by the training job or one `shardforge prepare`")
    if not 1 <= tasks <= MAX_TASKS:
        problems.append(f"--tasks {tasks}: give 1 to {MAX_TASKS} tasks")
    lines = [f"--job-name={_plain('run.name', recipe.run.name, problems)}-prepare",
             f"--array=0-{tasks - 1}",
             "--nodes=1",
             "--ntasks=1",
             f"--cpus-per-task={s.cpus_per_task}"]
    lines += _shared_lines(recipe, problems)
    lines += [f"--output={run_dir / 'logs' / 'prepare-%A_%a.out'}"]
    lines += _extra_lines(recipe, problems)
    env = _env_lines(recipe, problems)
    if problems:
        raise RecipeError("slurm prepare job", problems)
    values = {"sbatch": "\n".join(f"#SBATCH {line}" for line in lines), "run_dir": shlex.quote(str(run_dir)),
              "python": shlex.quote(python), "pythonpath": shlex.quote(pythonpath), "tasks": str(tasks),
              "env": "\n".join(env)}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], PREPARE_TEMPLATE.read_text())


def submit_prepare(recipe: Recipe, run_dir: Path, tasks: int, dry_run: bool, recipe_arg: str,
                   write_run_dir: Callable[[], object]) -> int:
    """``submit --prepare``: write the run directory's recipe and ``prepare.sbatch``, and ``sbatch`` it
    (or print it for ``--dry-run``)."""
    repo = str(Path(__file__).resolve().parents[1])
    script = render_prepare_sbatch(recipe, run_dir, sys.executable, repo, tasks)
    if dry_run:
        print(script, end="")
        return 0
    write_run_dir()
    job_id = _sbatch(run_dir, run_dir / "prepare.sbatch", script)
    print(f"shardforge: submitted prepare job {job_id} ({tasks} tasks)\n  run directory: {run_dir}\n"
          f"  logs: {run_dir / 'logs' / f'prepare-{job_id}_*.out'}\n"
          f"  train once it has completed: shardforge submit {recipe_arg} --after {job_id}")
    return 0
