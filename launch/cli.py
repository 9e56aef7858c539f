"""``shardforge``: run | plan | prepare | submit | status | report | export. Bad input exits 2 with one message."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from train.config.loading import RecipeError, load_fitted_recipe, recipe_yaml
from train.engines.autofit import Fit
from launch.gpus import local_gpu_bytes, local_gpus
from launch.runlock import RunLock, RunLocked

from train.config.recipe import Recipe
from train.console import show_on_console
from train.rundir import EXIT_BAD_INPUT


def cpu_oversubscribed(recipe, gpus: Optional[int] = None) -> Optional[str]:
    """The line refusing more one-node CPU processes than this machine has CPUs (without a GPU)."""
    gpus = local_gpus() if gpus is None else gpus
    cpus = os.cpu_count() or 1
    if gpus == 0 and recipe.parallel.nodes == 1 and recipe.parallel.nproc > cpus:
        return (f"parallel.nproc: {recipe.parallel.nproc} processes, but this machine has no GPU and {cpus} CPUs; "
                f"set parallel.nproc={cpus} or fewer")
    return None


def _load(args, check_model: bool = True) -> Recipe:
    return _load_fitted(args, check_model)[0]


def _load_fitted(args, check_model: bool = True, on_fit=None) -> tuple[Recipe, Optional[Fit]]:
    return load_fitted_recipe(args.recipe, args.overrides, local_gpus=local_gpus(), check_model=check_model,
                              gpu_bytes=local_gpu_bytes, on_fit=on_fit)


def _say_fit(recipe: Recipe, fit: Optional[Fit], run_dir: Path, file=None) -> None:
    """The auto-fit choice, and what it changed against the run directory's last launch (on
    ``file``, stdout by default)."""
    from train.config.autofit import fit_changes, fit_summary

    for line in [fit_summary(recipe, fit), *fit_changes(recipe, run_dir)]:
        if line:
            print(f"shardforge: {line}", file=file or sys.stdout, flush=True)


def cmd_plan(args) -> int:
    from train.engines.config import describe, engine_configs
    from train.config.recipe import grad_accum_steps, world_size
    from train.engines.scaling import parse_nodes

    try:  # before the recipe is read: a bad list is refused at once
        nodes = parse_nodes(args.nodes) if args.nodes is not None else None
    except ValueError as err:
        raise RecipeError("--nodes", [str(err)]) from None
    from train.engines.autofit import fit_table

    def refused(fit: Fit) -> None:  # nothing fits: the candidates before the one-line refusal
        if fit.chosen is None:
            print(fit_table(fit), flush=True)

    recipe, fit = _load_fitted(args, on_fit=refused)
    print("# recipe (resolved)")
    print(recipe_yaml(recipe), end="")
    print(f"# world size {world_size(recipe)}, gradient accumulation {grad_accum_steps(recipe)}")
    if (note := cpu_oversubscribed(recipe)) is not None:
        print(f"# {note} (`shardforge run` refuses it here; Slurm jobs run where the recipe says)")
    configs = engine_configs(recipe)
    text = describe(configs)
    print(text or f"# engine {recipe.parallel.engine}: no engine config file")
    if "fsdp.json" in configs and configs["fsdp.json"]["shard_modules"] is None:
        from train.config.model_checks import shard_block_names

        print(f"# fsdp: each rank shards every {' and every '.join(shard_block_names(recipe))}, then the root")
    from train.engines.memory_plan import fit_problem, plan_table
    from train.config.model_checks import model_sizes, plan_gpu_bytes, planned_setup

    sizes, setup, gpu_bytes = model_sizes(recipe), planned_setup(recipe), plan_gpu_bytes(recipe, local_gpu_bytes)
    print(plan_table(sizes, setup, gpu_bytes))
    problem = fit_problem(sizes, setup, gpu_bytes) if gpu_bytes else None
    print(f"# does not fit: {problem} (`shardforge run` and `submit` refuse it)" if problem else
          "# fits" if gpu_bytes else "# fit unknown: no GPU here and no parallel.gpu_mem_gb")
    if fit is not None:
        print(fit_table(fit))
    if nodes:
        from train.engines.scaling import scaling_table

        print(scaling_table(sizes, setup, nodes, gpu_bytes))
    return 0


def cmd_run(args) -> int:
    from train.stop_signals import StopRequest

    early = StopRequest.install()  # first: a stop signal during the seconds of validation must not kill us
    from train.engines.config import engine_configs
    from launch.local import RunDirBackup, launch_local, node_of, write_run_dir
    from train.config.resume import check_resumable
    from launch.ownership import mark, run_dir_problems

    recipe, fit = _load_fitted(args, check_model=False)  # the ranks check the model: importing transformers costs seconds
    node = node_of(recipe.parallel.nodes, args.node_rank, args.master, args.recipe)
    gpus = local_gpus()
    if (problem := cpu_oversubscribed(recipe, gpus)) is not None:
        raise RecipeError(args.recipe, [problem])
    assert recipe.run.dir is not None and recipe.parallel.nproc is not None  # load_recipe resolved them
    run_dir = Path(recipe.run.dir)
    if problems := run_dir_problems(run_dir):  # a user's folder, or a part of another run: never written
        raise RecipeError(args.recipe, problems)
    if node.rank > 0:  # node 0 checks and writes the run directory; its rendezvous starts no rank before that
        run_dir.mkdir(parents=True, exist_ok=True)
        mark(run_dir)  # before this node's log lands there: node 0, checking later, sees a run directory
        return launch_local(run_dir, recipe.parallel.nproc, early=early, node=node)
    try:  # before anything is written: a live launch's recipe.yaml must stay as it is
        lock = RunLock(run_dir).acquire()
    except RunLocked as err:
        raise RecipeError("run.dir", [str(err)]) from None
    try:
        problems = check_resumable(recipe, run_dir)
        if problems:
            raise RecipeError("resume", problems)
        backup = RunDirBackup(run_dir)
        _say_fit(recipe, fit, run_dir)
        write_run_dir(recipe, engine_configs(recipe))
        print(f"shardforge: run directory {run_dir} ({recipe.parallel.nproc} processes, "
              f"engine {recipe.parallel.engine}, {recipe.parallel.precision})", flush=True)
        code = launch_local(run_dir, recipe.parallel.nproc, early=early, node=node)
        if code == EXIT_BAD_INPUT:  # the ranks refused (a changed data file, say): leave the run as it was
            backup.restore()
        return code
    finally:
        lock.release()


def cmd_submit(args) -> int:
    from train.engines.config import engine_configs
    from launch.local import write_run_dir
    from train.config.resume import check_resumable
    from launch.ownership import run_dir_problems
    from launch.slurm import job_dependency, render_sbatch, submit

    if args.tasks is not None and not args.prepare:
        raise RecipeError("--tasks", ["counts the tasks of a --prepare job; add --prepare, or leave it out"])
    recipe, fit = load_fitted_recipe(args.recipe, args.overrides, for_slurm=True)
    assert recipe.run.dir is not None  # load_recipe resolved it
    run_dir = Path(recipe.run.dir).resolve()
    if problems := run_dir_problems(run_dir):
        raise RecipeError(args.recipe, problems)
    try:
        RunLock(run_dir).check()  # a live run there: its recipe.yaml must not be rewritten
    except RunLocked as err:
        raise RecipeError("run.dir", [str(err)]) from None
    problems = check_resumable(recipe, run_dir)
    if problems:
        raise RecipeError("resume", problems)
    if recipe.parallel.gpu_mem_gb:  # the login node cannot see the cluster's GPUs: only a stated size
        from train.config.model_checks import memory_problems, plan_gpu_bytes

        from launch.elastic import shrink_problems

        problems = memory_problems(recipe, plan_gpu_bytes(recipe)) or shrink_problems(recipe, run_dir)
        if problems:
            raise RecipeError(args.recipe, problems)
    if args.prepare:
        from launch.slurm import submit_prepare

        if args.after is not None:
            raise RecipeError("--after", ["starts a training job after another; a --prepare job waits for nothing"])
        return submit_prepare(recipe, run_dir, 4 if args.tasks is None else args.tasks, args.dry_run, args.recipe,
                              lambda: write_run_dir(recipe, engine_configs(recipe)))
    after = job_dependency(args.after)
    render_sbatch(recipe, run_dir, sys.executable, ".", after)  # refuse bad values before writing anything
    if args.dry_run:  # the choice on stderr: stdout is the job script alone
        _say_fit(recipe, fit, run_dir, file=sys.stderr)
        return submit(recipe, run_dir, dry_run=True, after=after)
    _say_fit(recipe, fit, run_dir)
    write_run_dir(recipe, engine_configs(recipe))
    return submit(recipe, run_dir, dry_run=False, after=after)


def cmd_prepare(args) -> int:
    from train.noise import silence_known_noise

    silence_known_noise()  # before datasets is imported
    from train.data.prepare import prepare_data

    from train.data.prepare import prepare_share
    from train.data.shards import share_arg

    share = share_arg(args.task, args.tasks)  # bad numbers: one line before the recipe is read
    recipe = _load(args)
    if share is not None:
        data = prepare_share(recipe, *share)
        if data is None:
            print(f"shardforge: prepare task {share[0]} of {share[1]} done; the last task to finish joins the cache")
            return 0
    else:
        data = prepare_data(recipe)
    state = "reused" if data.stats.get("cache_hit") else "written"
    print(f"shardforge: data cache {state}: {recipe.data.cache_dir}/{data.key} "
          f"({data.stats['train_samples']} train, {data.stats['val_samples']} val samples)")
    return 0


def cmd_status(args) -> int:
    from launch.status import RUNS_ROOT, run_dirs, standing, status_table

    dirs = run_dirs(args.run_dirs)
    if not dirs:
        print(f"shardforge: no run directories under {RUNS_ROOT}/")
        return 0
    print(status_table([standing(d) for d in dirs]))
    return 0


def cmd_report(args) -> int:
    from launch.report import write_report

    png, page = write_report(Path(args.run_dir))
    print(f"shardforge: wrote {png} and {page}")
    return 0


def cmd_export(args) -> int:
    from train.noise import silence_known_noise

    silence_known_noise()  # the one-process checkpoint read and the pretrained base's new-head report
    from launch.export import export

    export(Path(args.run_dir), Path(args.out_dir), args.step, lora_export=args.lora)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardforge", description="Multi-GPU training for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("run", cmd_run, "train locally through torchrun"),
                             ("plan", cmd_plan, "print the resolved recipe and engine config; write nothing"),
                             ("prepare", cmd_prepare, "tokenize and pack the data into the cache"),
                             ("submit", cmd_submit, "submit the run as a Slurm job (requeues itself on timeout)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("recipe", help="recipe YAML path or shipped name (tiny-cpu)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
        if name == "submit":
            p.add_argument("--dry-run", action="store_true", help="print the job script; write and submit nothing")
            p.add_argument("--prepare", action="store_true",
                           help="submit a Slurm array that prepares the data cache (pre-training data) instead")
            p.add_argument("--tasks", type=int, default=None, help="--prepare: array tasks (default 4)")
            p.add_argument("--after", default=None, metavar="JOB",
                           help="start the training job only after job JOB (a --prepare job) has completed")
        if name == "plan":
            p.add_argument("--nodes", default=None, metavar="N,N,...",
                           help="also predict every engine's step time and scaling efficiency on these node counts "
                                "(e.g. 1,2,4,8) of parallel.nproc GPUs each, per-GPU batch kept (weak scaling)")
        if name == "prepare":
            p.add_argument("--task", type=int, default=None, help="with --tasks: this task's share (0 .. tasks-1)")
            p.add_argument("--tasks", type=int, default=None,
                           help="tokenize one share of the files; the last task to finish joins the cache")
        if name == "run":
            p.add_argument("--node-rank", type=int, default=None,
                           help="parallel.nodes > 1 without Slurm: this machine's node (0 .. nodes-1); "
                                "start `shardforge run` on every node")
            p.add_argument("--master", default=None, metavar="HOST:PORT",
                           help="parallel.nodes > 1: node 0's address and a free port, the same on every node")
        p.set_defaults(func=func)
    p = sub.add_parser("status", help="how runs stand: state, step, loss, eval, ETA (reads status.json and "
                                      "the end of metrics.jsonl)")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="run directories, or directories holding them (default: those under ./runs)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("report", help="draw report.png and report.html from a run's TensorBoard files")
    p.add_argument("run_dir", help="run directory (runs/<name>)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("export", help="write a Hugging Face model directory from a run's checkpoint")
    p.add_argument("run_dir", help="run directory (runs/<name>)")
    p.add_argument("out_dir", help="new output directory")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step (default: the best one when the run kept it, else the latest committed)")
    p.add_argument("--lora", choices=("merged", "adapter"), default=None,
                   help="LoRA runs: fold the adapters into the model, or write the adapter alone "
                        "(default: the recipe's model.lora.export)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    show_on_console(True)  # data preparation, checkpoint searches: what the parts log, as plain lines
    try:
        return args.func(args)
    except RecipeError as err:
        print(f"shardforge: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OSError, ValueError) as err:  # data and run-dir problems carry their own one-line fix
        print(f"shardforge: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
