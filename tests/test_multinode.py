"""``shardforge run`` across nodes without Slurm (``--node-rank``/``--master``): two launches,
each with its own torchrun agent, meeting at node 0's rendezvous over TCP; first on this machine's
loopback, then as two hosts: two network namespaces joined by a bridge, each with its own address,
as separate machines on one network (they share the filesystem, as nodes share a run directory).

The namespaces need root and ``ip`` (iproute2); without them that test is skipped, unless
SHARDFORGE_REQUIRE_NETNS=1 (set by ``.ci/run``) makes that a failure."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, make_corpus, read_metrics, run_recipe, tiny_recipe, train_losses, write_recipe
from train.ports import free_port

ENGINES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]


def start_nodes(recipe_path: Path, nodes: int, *overrides: str, hosts: list[dict] | None = None) -> list:
    """Start ``shardforge run`` once per node, all at once (node 1 first: it waits for node 0's
    rendezvous); ``hosts``: run node K inside network namespace ``hosts[K]``."""
    master = f"{hosts[0]['ip'] if hosts else '127.0.0.1'}:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SHARDFORGE_LAUNCH_ID", None)  # left here by in-process launches: the nodes derive theirs
    procs = {}
    for k in reversed(range(nodes)):
        cmd = [sys.executable, "-m", "launch", "run", str(recipe_path), *overrides, "--node-rank", str(k),
               "--master", master]
        node_env = env
        if hosts:  # gloo must use the host's own interface, not the loopback its hostname resolves to
            cmd = ["ip", "netns", "exec", hosts[k]["netns"], *cmd]
            node_env = {**env, "GLOO_SOCKET_IFNAME": hosts[k]["ifname"]}
        procs[k] = subprocess.Popen(cmd, cwd=REPO, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
    return [procs[k] for k in range(nodes)]


def wait_nodes(procs: list, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


def run_nodes(recipe_path: Path, nodes: int, *overrides: str, hosts: list[dict] | None = None) -> list:
    return wait_nodes(start_nodes(recipe_path, nodes, *overrides, hosts=hosts))


def trajectory(run_dir: Path) -> list[tuple]:
    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(run_dir) if "loss" in m]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One node of 2 ranks, FSDP: the trajectory every multi-node run here must give."""
    tmp = tmp_path_factory.mktemp("multinode")
    corpus, cache = make_corpus(tmp / "corpus"), tmp / "cache"
    run_recipe(tmp, tiny_recipe(corpus, cache, tmp / "straight", parallel={"engine": "fsdp", "nproc": 2}))
    return {"corpus": corpus, "cache": cache, "run_dir": tmp / "straight"}


@pytest.fixture(scope="module")
def one_process(straight):
    """1 process, micro-batch 8: the fp32 losses every engine must give on 2 hosts (within 1e-5)."""
    run_dir = straight["run_dir"].with_name("one-process")
    run_recipe(run_dir.parent, tiny_recipe(straight["corpus"], straight["cache"], run_dir,
                                           parallel={"engine": "ddp", "nproc": 1}, train={"micro_batch_size": 8}))
    return train_losses(run_dir)


def test_two_nodes_train_stop_and_resume_on_one_node_bit_exact(tmp_path, straight):
    corpus, cache = straight["corpus"], straight["cache"]
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
    assert trajectory(run_dir) == trajectory(straight["run_dir"])


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two network namespaces on a bridge: hosts 10.213.0.10 and .11, each with its own veth."""
    can = os.geteuid() == 0 and shutil.which("ip") is not None
    if not can:
        if os.environ.get("SHARDFORGE_REQUIRE_NETNS") == "1":
            pytest.fail("network namespaces need root and iproute2 here (SHARDFORGE_REQUIRE_NETNS=1)")
        pytest.skip("network namespaces need root and iproute2")
    tag = f"{os.getpid() % 10000}"
    bridge, hosts = f"sfbr{tag}", []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        for k in range(2):
            ns, outer, inner = f"sfns{tag}-{k}", f"sfv{tag}{k}", f"sfh{k}"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"10.213.0.{10 + k}/24", "dev", inner)
            _ip("netns", "exec", ns, "ip", "link", "set", inner, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            hosts.append({"netns": ns, "ip": f"10.213.0.{10 + k}", "ifname": inner, "veth": outer})
        yield hosts
    finally:
        for host in hosts:
            subprocess.run(["ip", "netns", "del", host["netns"]], capture_output=True)
            subprocess.run(["ip", "link", "del", host["veth"]], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def test_two_hosts_match_one_node_and_a_lost_node_ends_the_job(tmp_path, two_hosts, straight):
    """2 hosts x 1 rank (FSDP, gloo over the bridge) give the 1-node x 2-rank trajectory bit for
    bit; then killing every process of host 1 mid-run ends host 0's launch within 60 s (no hang),
    with status.json naming a failure that no rank caused (``lost``)."""
    corpus, cache = straight["corpus"], straight["cache"]
    hosts = tiny_recipe(corpus, cache, tmp_path / "hosts", parallel={"engine": "fsdp", "nproc": 1, "nodes": 2})
    node0, node1 = run_nodes(write_recipe(tmp_path / "hosts.yaml", hosts), 2, hosts=two_hosts)
    assert (node0.returncode, node1.returncode) == (0, 0), node0.stdout[-3000:] + node0.stderr[-3000:] + \
        node1.stdout[-2000:] + node1.stderr[-2000:]
    assert trajectory(tmp_path / "hosts") == trajectory(straight["run_dir"])

    lost = tiny_recipe(corpus, cache, tmp_path / "lost", parallel={"engine": "fsdp", "nproc": 1, "nodes": 2},
                       train={"max_steps": 400}, checkpoint={"every_steps": 0, "at_end": False})
    node0, node1 = start_nodes(write_recipe(tmp_path / "lost.yaml", lost), 2, hosts=two_hosts)
    metrics = tmp_path / "lost" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 2):
        time.sleep(0.5)
    assert metrics.exists(), "the 2-host run never logged a step"
    import psutil

    host1 = psutil.Process(node1.pid)
    for proc in [host1, *host1.children(recursive=True)]:  # the whole of host 1: launcher, agent, rank
        proc.send_signal(signal.SIGKILL)
    killed = time.time()
    stdout, stderr = node0.communicate(timeout=120)
    assert time.time() - killed < 60, f"host 0 took {time.time() - killed:.0f} s to end: {stdout[-3000:]}{stderr[-3000:]}"
    assert node0.returncode not in (0, 75), stdout[-2000:] + stderr[-2000:]
    status = json.loads((tmp_path / "lost" / "status.json").read_text())
    assert status["state"] == "failed" and status["lost"], status  # no rank to blame: resumable
    assert "a process or a node went away" in stdout + stderr, stdout[-2000:] + stderr[-2000:]
    node1.communicate(timeout=30)


@pytest.mark.parametrize("engine,nproc", [(engine, 2) for engine in ENGINES] +
                         [(engine, 1) for engine in ENGINES if engine != "fsdp"],  # FSDP 2 x 1: the test above
                         ids=lambda v: {2: "2x2", 1: "2x1"}.get(v, v) if isinstance(v, int) else v)
def test_every_engine_on_two_hosts_matches_one_process(tmp_path, two_hosts, straight, one_process, engine, nproc):
    """2 hosts x ``nproc`` ranks (gloo across the bridge and, with 2, inside each host) train the
    1-process fp32 trajectory: the engine's gradient reduction and its placement broadcast
    (rank 0 builds the weights, the others the structure) cross the host boundary."""
    name = f"{engine}-{nproc}"
    r = tiny_recipe(straight["corpus"], straight["cache"], tmp_path / name,
                    parallel={"engine": engine, "nproc": nproc, "nodes": 2},
                    train={"micro_batch_size": 8 // (2 * nproc)})
    node0, node1 = run_nodes(write_recipe(tmp_path / f"{name}.yaml", r), 2, hosts=two_hosts)
    assert (node0.returncode, node1.returncode) == (0, 0), node0.stdout[-3000:] + node0.stderr[-3000:] + \
        node1.stdout[-2000:] + node1.stderr[-2000:]
    log = (tmp_path / name / "logs" / "launch.log").read_text()
    assert f"the other {2 * nproc - 1} rank(s) built the structure" in log, log[-2000:]
    losses = train_losses(tmp_path / name)
    assert len(losses) == len(one_process) == 6 and losses[-1] < losses[0] - 0.5, losses
    for step, (a, b) in enumerate(zip(losses, one_process), 1):
        assert abs(a - b) < 1e-5, f"{engine} on 2 hosts x {nproc} step {step}: {a} vs one process {b}"
