"""``shardforge run`` across nodes without Slurm (``--node-rank``/``--master``): here two "nodes"
are two launches on this machine, each with its own torchrun agent, meeting at node 0's
rendezvous over TCP. (Separate machines, through network namespaces, are not tested yet.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, make_corpus, read_metrics, run_recipe, tiny_recipe, write_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(recipe_path: Path, nodes: int, *overrides: str) -> list[subprocess.CompletedProcess]:
    """Start ``shardforge run`` once per node, all at once, and wait for every one."""
    master = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SHARDFORGE_LAUNCH_ID", None)  # left here by in-process launches: the nodes derive theirs
    procs = [subprocess.Popen([sys.executable, "-m", "launch", "run", str(recipe_path), *overrides,
                               "--node-rank", str(k), "--master", master], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in reversed(range(nodes))]  # node 1 first: it waits for node 0's rendezvous
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out[::-1]


def trajectory(run_dir: Path) -> list[tuple]:
    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(run_dir) if "loss" in m]


def test_two_nodes_train_stop_and_resume_on_one_node_bit_exact(tmp_path):
    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    straight = tiny_recipe(corpus, cache, tmp_path / "straight", parallel={"engine": "fsdp", "nproc": 2})
    run_recipe(tmp_path, straight)
    split = tiny_recipe(corpus, cache, tmp_path / "split", parallel={"engine": "fsdp", "nproc": 1, "nodes": 2},
                        checkpoint={"every_steps": 0, "at_end": False})
    path = write_recipe(tmp_path / "split.yaml", split)
    node0, node1 = run_nodes(path, 2, "train.stop_after=3")
    assert (node0.returncode, node1.returncode) == (75, 75), node0.stdout[-3000:] + node0.stderr[-3000:] + \
        node1.stdout[-2000:] + node1.stderr[-2000:]
    run_dir = tmp_path / "split"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 3
    assert status["launch_id"].startswith("127.0.0.1-"), status  # one id for the whole job
    assert (run_dir / "logs" / "launch-node1.log").exists()
    assert "stopped at step 3" in node0.stdout, node0.stdout[-2000:]
    # the same run directory resumed by one node of 2 processes: the trajectory of the straight run
    resumed = run_recipe(tmp_path, {**split, "parallel": {**split["parallel"], "nproc": 2, "nodes": 1}})
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    assert trajectory(run_dir) == trajectory(tmp_path / "straight")
