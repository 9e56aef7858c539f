"""Elastic shrink (``slurm.min_nodes``): fit a run directory to the nodes Slurm gave its job.

An elastic job asks Slurm for ``--nodes=MIN-MAX`` (:func:`launch.slurm.render_sbatch`) and may
start, or come back after a requeue, on fewer nodes than ``parallel.nodes``. Before srun starts
the ranks, the job script runs ``python -m launch.elastic RUN_DIR $SLURM_NNODES --max-nodes=MAX``.
When ``recipe.yaml`` plans another node count, this rewrites it (``parallel.nodes``) and the
engine configs beside it (``deepspeed.json`` holds the batch arithmetic), each in one rename: the
world size changes, gradient accumulation scales so ``train.global_batch_size`` stays, and the
data order does not change (the ranks resume from the latest checkpoint, which every engine
reads on another world size, and check the next batch's fingerprint against it). It prints one
line for the job's log::

    shardforge: resuming on 1 node of 2 (world 2 → 1, accumulation 4 → 8, global batch 8 kept)

and records it in ``logs/resized.json``, which ``status.json`` carries as ``resized`` for this
launch (``train.rundir.write_status``) and ``shardforge status`` shows. A global batch that does
not divide on the new world is refused with one line before training: exit 2, ``status.json``
says ``failed``, and the job ends FAILED (not requeued).

Data flows launcher → run directory → ranks: ``train/`` never imports this module.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from train.config.loading import recipe_yaml
from launch.runlock import RunLock, RunLocked
from launch.slurm import batch_unit
from train.checkpoint.files import committed_checkpoints
from launch.gpus import local_gpu_bytes
from launch.local import write_engine_configs
from train.engines.config import engine_configs
from train.config.recipe import Recipe, grad_accum_steps, micro_batch, world_size
from train.config.loading import read_recipe
from train.rundir import (EXIT_BAD_INPUT, RECIPE_FILE, RESIZED_FILE, atomic_write, launch_id, read_status,
                         write_status)
from train.config.typed import RecipeError


def _shape(recipe: Recipe) -> tuple[int, int, int]:
    """(nodes, world size, micro-batches per rank per step); :class:`RecipeError` when the batch does not divide."""
    return recipe.parallel.nodes, world_size(recipe), grad_accum_steps(recipe)


def resize_recipe(recipe: Recipe, nodes: int, run_dir: Path, gpu_bytes: Optional[float] = None) -> list[str]:
    """Set ``recipe`` (in place) to run on ``nodes`` nodes; what changed, one phrase each (``world 2 → 1``,
    ``accumulation 4 → 8``, ..., ``global batch 8 kept``). Settings ``auto`` chose (``parallel.fitted``)
    are chosen again for the new world (``gpu_bytes``: this node's GPU, when the recipe does not
    state ``parallel.gpu_mem_gb``). Raises :class:`train.config.typed.RecipeError` (the arithmetic, from
    :func:`train.config.recipe.accumulation`) when the global batch cannot be kept or nothing fits."""
    _, world, accum = _shape(recipe)
    recipe.parallel.nodes = nodes
    refitted: list[str] = []
    if recipe.parallel.fitted:
        from train.config.autofit import refit
        from train.config.model_checks import plan_gpu_bytes

        refitted = refit(recipe, plan_gpu_bytes(recipe, lambda: gpu_bytes), "this node shows no GPU (NVML)", run_dir)
    _, new_world, new_accum = _shape(recipe)
    return [f"world {world} → {new_world}", f"accumulation {accum} → {new_accum}", *refitted,
            f"global batch {recipe.train.global_batch_size} kept"]


def shrink_problems(recipe: Recipe, run_dir: Path) -> list[str]:
    """What would stop an elastic job (``slurm.min_nodes``) on each smaller node count it may get,
    found at submit: the memory plan at that size (sharded state grows as the nodes shrink), or
    nothing auto could choose there. The global batch's divisibility is ``launch.slurm``'s check."""
    import copy

    from train.config.model_checks import memory_problems, plan_gpu_bytes

    low, nodes = recipe.slurm.min_nodes, recipe.parallel.nodes
    if low is None or not 1 <= low < nodes:
        return []
    problems = []
    for n in range(low, nodes):
        smaller = copy.deepcopy(recipe)
        if "train.micro_batch_size" not in recipe.parallel.fitted and \
                recipe.train.global_batch_size % batch_unit(recipe, micro_batch(recipe), n):
            continue  # a batch that does not divide there: launch.slurm.node_range says so, with the fix
        try:
            resize_recipe(smaller, n, run_dir)
            found = memory_problems(smaller, plan_gpu_bytes(smaller))
        except RecipeError as err:
            found = err.problems
        problems += [f"slurm.min_nodes={low}: on {_nodes_text(n)}, {p}" for p in found]
    return problems


def _nodes_text(nodes: int) -> str:
    return f"{nodes} node" + ("s" if nodes != 1 else "")


def fit_run_dir(run_dir: Path, nodes: int, max_nodes: int) -> Optional[str]:
    """Rewrite ``run_dir``'s recipe and engine configs for ``nodes`` nodes when they plan another count
    and record it (``logs/resized.json``); the line to print, or ``None`` when nothing changed.
    :class:`RecipeError` (nothing written) when the run cannot go on on ``nodes`` nodes;
    :class:`RunLocked` when another live launch holds the run directory."""
    recipe = read_recipe(run_dir)
    before = recipe.parallel.nodes
    if before == nodes:
        # a resize that died between its renames
        write_engine_configs(run_dir, engine_configs(recipe), only_if_changed=True)
        return None
    if not 1 <= nodes <= max_nodes:
        raise RecipeError(None, [f"Slurm gave {_nodes_text(nodes)}, outside 1..{max_nodes} (--nodes of the job)"])
    RunLock(run_dir).check()  # a live launch there reads this recipe.yaml: never rewrite it under one
    was = _shape(recipe)
    changes = resize_recipe(recipe, nodes, run_dir, local_gpu_bytes() if recipe.parallel.fitted else None)
    now = _shape(recipe)
    # the configs first, recipe.yaml last: it says which count they are for
    write_engine_configs(run_dir, engine_configs(recipe))
    atomic_write(run_dir / RECIPE_FILE, recipe_yaml(recipe), fsync=True)
    verb = "resuming" if committed_checkpoints(run_dir / "checkpoints") else "starting"
    line = f"{verb} on {_nodes_text(nodes)} of {max_nodes} ({', '.join(changes)})"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "logs" / RESIZED_FILE, json.dumps(
        {"launch_id": launch_id(), "time": time.time(), "from_nodes": was[0], "to_nodes": now[0],
         "max_nodes": max_nodes, "from_world": was[1], "to_world": now[1], "from_accumulation": was[2],
         "to_accumulation": now[2], "global_batch_size": recipe.train.global_batch_size, "changes": changes,
         "line": line}), fsync=True)
    return line


def refuse(run_dir: Path, nodes: int, max_nodes: int, err: RecipeError) -> str:
    """The one line of a refused resize, also recorded as this launch's ``failed`` status.json."""
    reason = (f"cannot run on {_nodes_text(nodes)} of {max_nodes}: {'; '.join(err.problems)}; not requeued (the "
              f"checkpoints stand): resubmit with what that asks, or a slurm.min_nodes of more than {nodes}")
    step = read_status(run_dir).get("step", -1)
    write_status(run_dir, "failed", step if isinstance(step, int) else -1, reason, exit_code=EXIT_BAD_INPUT)
    return reason


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.elastic", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the job's run directory")
    parser.add_argument("nodes", type=int, help="the nodes Slurm gave the job ($SLURM_NNODES)")
    parser.add_argument("--max-nodes", type=int, required=True, help="the most the job asked for (parallel.nodes)")
    args = parser.parse_args(argv)
    try:
        line = fit_run_dir(args.run_dir, args.nodes, args.max_nodes)
    except RecipeError as err:
        print(f"shardforge: {refuse(args.run_dir, args.nodes, args.max_nodes, err)}", flush=True)
        return EXIT_BAD_INPUT
    except RunLocked as err:
        print(f"shardforge: cannot fit the run to {_nodes_text(args.nodes)}: {err}", flush=True)
        return EXIT_BAD_INPUT
    if line is not None:
        print(f"shardforge: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
