"""Write the run directory and launch the per-rank program locally through torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import io
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, cast

from launch.ownership import mark
from train.config.loading import RecipeError, recipe_yaml
from train.engines import ENGINE_CONFIG_FILES
from train.config.recipe import Recipe
from train.rundir import (EXIT_REQUEUE, LAUNCH_ID_ENV, NODE_RANK_ENV, atomic_write, describe, exit_code,
                          final_status, read_status, write_status)
from train.stop_signals import STOP_SIGNALS, StopRequest, stop_signals_blocked


class RunDirBackup:
    """The run directory's recipe and engine configs as they were before a launch rewrote them,
    put back when the launch is refused (exit 2), so the run stays exportable and resumable."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.files = {name: (run_dir / name).read_bytes() for name in ("recipe.yaml", *ENGINE_CONFIG_FILES)
                      if (run_dir / name).exists()}

    def restore(self) -> None:
        if not self.files:
            return
        for name in ENGINE_CONFIG_FILES:
            if name not in self.files:
                (self.run_dir / name).unlink(missing_ok=True)
        for name, data in self.files.items():
            atomic_write(self.run_dir / name, data.decode())


def write_engine_configs(run_dir: Path, configs: dict[str, dict], only_if_changed: bool = False) -> None:
    """``configs`` (file name → config: ``deepspeed.json``, ``fsdp.json``) into ``run_dir``, each one
    rename, and the other engine's file removed; ``only_if_changed``: leave a file that already says
    the same (an elastic job start that resized nothing)."""
    for name in ENGINE_CONFIG_FILES:
        text = json.dumps(configs[name], indent=2) + "\n" if name in configs else None
        path = run_dir / name
        if only_if_changed and (path.read_text() if path.exists() else None) == text:
            continue
        if text is not None:
            atomic_write(path, text)
        else:
            path.unlink(missing_ok=True)


def write_run_dir(recipe: Recipe, configs: dict[str, dict]) -> Path:
    """Create ``run.dir`` with the resolved recipe and engine configs; nothing half-written on error."""
    assert recipe.run.dir is not None  # resolve_defaults set it (load_recipe)
    run_dir = Path(recipe.run.dir)
    created = not run_dir.exists()
    try:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        mark(run_dir)
        atomic_write(run_dir / "recipe.yaml", recipe_yaml(recipe))
        write_engine_configs(run_dir, configs)
    except OSError as err:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise OSError(f"run.dir: cannot write {run_dir}: {err.strerror}; choose a writable run.dir") from None
    return run_dir


@dataclass(frozen=True)
class Node:
    """This machine's place in a ``shardforge run`` job: one node, or one of ``count`` started by hand."""

    rank: int = 0
    count: int = 1
    master: Optional[tuple[str, int]] = None
    """Node 0's host and port (torchrun's static rendezvous on a c10d TCP store); ``None``: one node."""

    def new_launch_id(self) -> str:
        """The id this launch tags ``status.json`` with: a fresh one on a single node; for several,
        one for the whole job, from ``SHARDFORGE_LAUNCH_ID`` when set on every node, else from the
        rendezvous address."""
        if self.master is None:
            return uuid.uuid4().hex[:12]
        return os.environ.get(LAUNCH_ID_ENV) or f"{self.master[0]}-{self.master[1]}"


def node_of(nodes: int, node_rank: Optional[int], master: Optional[str], where: str) -> Node:
    """The :class:`Node` of ``--node-rank``/``--master``, or :class:`RecipeError` naming the fix."""
    if nodes == 1:
        if node_rank is not None or master is not None:
            raise RecipeError(where, ["--node-rank/--master: parallel.nodes is 1; set parallel.nodes to the number of "
                                      "machines, or leave both options out"])
        return Node()
    if node_rank is None or master is None:  # never train one node's share as if it were the whole job
        raise RecipeError(where, [f"parallel.nodes: {nodes} nodes; start `shardforge run` on every node with "
                                  f"--node-rank 0..{nodes - 1} and --master HOST:PORT of node 0, or submit the job "
                                  f"with `shardforge submit` (Slurm), or set parallel.nodes=1"])
    problems = []
    if not 0 <= node_rank < nodes:
        problems.append(f"--node-rank: {node_rank} is not between 0 and {nodes - 1} (parallel.nodes={nodes})")
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(f"--master: {master!r} is not HOST:PORT with a port between 1 and 65535, e.g. node0:29500")
    if problems:
        raise RecipeError(where, problems)
    return Node(node_rank, nodes, (host, int(port)))


def agent_command(run_dir: Path, nproc: int, node: Node = Node()) -> list[str]:
    """The stop-safe agent (``launch.agent``) for one node of ``nproc`` ranks: it starts them
    itself on one machine, through torchrun's static rendezvous across nodes."""
    if node.master is None:
        return [sys.executable, "-m", "launch.agent", str(run_dir), f"--nproc={nproc}"]
    rendezvous = [f"--nnodes={node.count}", f"--node-rank={node.rank}", f"--master-addr={node.master[0]}",
                  f"--master-port={node.master[1]}"]
    return [sys.executable, "-m", "launch.agent", str(run_dir), "--", *rendezvous, f"--nproc_per_node={nproc}"]


def rank_defaults(env: Mapping[str, str], nproc: int, cpus: Optional[int]) -> dict[str, str]:
    """What a local launch sets for its ranks unless the user did (the Slurm job script does the same):

    * ``OMP_NUM_THREADS``: this machine's CPUs shared out, ``max(1, cpus // nproc)`` per rank.
      torchrun would give each of several ranks 1 thread, which starves data loading and the CPU
      work of offloaded optimizers on a GPU node.
    * ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``: torch's own default (tear the process down on a
      collective error or timeout without aborting the communicator first), which torchrun's agent
      would replace by 1 (abort it first; an abort can itself hang on a lost peer).
    """
    out = {}
    if "OMP_NUM_THREADS" not in env:
        out["OMP_NUM_THREADS"] = str(max(1, (cpus or 1) // max(1, nproc)))
    if "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env:
        out["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"
    return out


def launch_local(run_dir: Path, nproc: int, early: Optional[StopRequest] = None, node: Node = Node()) -> int:
    """Run the agent (torchrun) in the foreground, copying its output to ``logs/launch.log``;
    return the run's documented exit code (see ``train.rundir``).

    USR1, TERM, INT and HUP ask the trainers to stop at the next step with a checkpoint (exit 75);
    a second Ctrl-C kills them. A stop that arrived before the launch ends it without starting.
    """
    launch = os.environ[LAUNCH_ID_ENV] = node.new_launch_id()
    os.environ[NODE_RANK_ENV] = str(node.rank)
    if early is not None and early.signal_name:
        if node.rank == 0:  # node 0 speaks for the job in status.json
            write_status(run_dir, "stopped", -1, f"{early.signal_name} before the launch; nothing to save")
            print(f"shardforge: {describe(read_status(run_dir, launch))}", flush=True)
        return EXIT_REQUEUE
    env = {**os.environ, **rank_defaults(os.environ, nproc, os.cpu_count())}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONSAFEPATH"] = "1"  # no process below imports the working directory's own train.py or launch.py
    log_path = run_dir / "logs" / ("launch.log" if node.rank == 0 else f"launch-node{node.rank}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        with stop_signals_blocked():  # the agent starts with them blocked: none can kill it early
            proc = subprocess.Popen(agent_command(run_dir, nproc, node), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)

            def forward(signum, frame):  # the agent hands it to every trainer
                proc.send_signal(signum)

            for sig in STOP_SIGNALS:
                signal.signal(sig, forward)
            if early is not None and early.signal_name:
                proc.send_signal(signal.Signals[early.signal_name])
        assert proc.stdout is not None
        # stdout=PIPE is a BufferedReader: the stubs type Popen.stdout as IO[bytes] | None
        for chunk in iter(lambda: cast(io.BufferedReader, proc.stdout).read1(65536), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            log.write(chunk)
        code = proc.wait()
    if code < 0:  # the agent itself was killed: settle status.json for it
        status = final_status(run_dir, launch, [(0, f"'s agent was killed by {signal.Signals(-code).name}")])
        print(f"shardforge: {describe(status)}", file=sys.stderr, flush=True)
        return exit_code(status)
    return code
