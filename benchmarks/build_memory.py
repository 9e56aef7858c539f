"""Host memory while the ranks build the model: every rank building the fp32 weights (the old
way) against rank 0 building them and the others only the structure (``train.engines.placement``).

    python -m benchmarks.build_memory                  # ~300M-parameter Llama, 4 CPU ranks, fsdp and zero3
    python -m benchmarks.build_memory --smoke          # a tiny model, for the test that keeps this working
    python -m benchmarks.build_memory --out my.json

Each case is one torchrun launch of this file's rank program (``--rank-program``), which builds
the model, then its engine, and reports every rank's resident memory right after the build (all
ranks at the same moment), after the engine, and its peak (``ru_maxrss``); the driver also samples
the resident memory of the whole process tree (torchrun's agent included) every 20 ms: the node's
peak. On CPU the shards and the engine's state are host memory too, so the numbers after the
build are the ones that show what building costs; on GPUs only the build stays on the host. Prints a table, writes JSON (default
``benchmarks/results/build-memory.json``) and the plan's numbers for the shipped 1B and 7B recipes
next to DeepSpeed's own estimator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA_300M = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 20,
              "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 2048,
              "vocab_size": 32000}
TINY = {**LLAMA_300M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 512}


def rank_program(engine: str, mode: str, config: dict, out: Path) -> None:
    """Build ``config`` for ``engine`` as the ranks do (``placed``) or eagerly on every rank."""
    import psutil
    import torch.distributed as dist

    from train.engines.config import engine_configs
    from train.distributed import init_distributed
    from train.engines import CAPABILITIES
    from train.engines.build import build_engine
    from train.engines.placement import InitialWeights, place_model
    from train.model import build_model
    from train.config.recipe import grad_accum_steps, recipe_from_dict, resolve_defaults

    d = init_distributed(deepspeed=True)
    recipe = recipe_from_dict({"run": {"name": "build"}, "model": {"config": config},
                               "data": {"sources": [{"path": "unused"}]},
                               "train": {"micro_batch_size": 1, "global_batch_size": d.world_size},
                               "parallel": {"engine": engine, "precision": "bf16", "nproc": d.world_size}})
    resolve_defaults(recipe, nproc=d.world_size)
    cfg = engine_configs(recipe).get(CAPABILITIES[engine].config_file or "", {})

    def build(empty_init):
        return build_model(recipe.model, config["vocab_size"], 0, empty_init=empty_init)

    def gathered(value: float) -> list:
        every = [None] * d.world_size
        dist.all_gather_object(every, value)
        return every

    dist.barrier()
    start = time.perf_counter()
    if mode == "placed":
        model, weights = place_model(engine, build, d.rank, d.world_size, cfg)
    else:
        model, weights = build(None), InitialWeights()
    after_build = gathered(psutil.Process().memory_info().rss)  # every rank at the same moment
    engine_obj = build_engine(recipe, model, d.device, accum=grad_accum_steps(recipe, d.world_size), cfg=cfg,
                              weights=weights)
    dist.barrier()
    seconds = time.perf_counter() - start
    after_engine = gathered(psutil.Process().memory_info().rss)
    peak = gathered(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if d.rank == 0:
        params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        out.write_text(json.dumps({"rss_after_build": after_build, "rss_after_engine": after_engine,
                                   "peak_rss_per_rank": peak, "build_s": seconds, "params": params}))
    del engine_obj
    dist.barrier()  # rank 0 has written the result


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_case(engine: str, mode: str, config: dict, tmp: Path, nproc: int) -> dict:
    out = tmp / f"{engine}-{mode}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
           "benchmarks.build_memory", "--rank-program", engine, mode, json.dumps(config), str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    node_peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            node_peak[0] = max(node_peak[0], _tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = proc.communicate(timeout=1200)[0].decode(errors="replace")
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{engine}/{mode} failed (exit {proc.returncode}):\n{log[-3000:]}")
    result = json.loads(out.read_text())
    return {"engine": engine, "mode": mode, **result, "peak_rss_node": node_peak[0]}


def plan_vs_deepspeed() -> list[dict]:
    """The plan's per-GPU state memory for the shipped 1B and 7B recipes next to DeepSpeed's estimator."""
    import dataclasses

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from train.config.loading import load_recipe
    from train.engines.memory_plan import estimate
    from train.config.model_checks import model_sizes, planned_setup

    rows = []
    for name in ("llama-1b", "llama-7b-zero3"):
        recipe = load_recipe(name, for_slurm=True)
        m, setup = model_sizes(recipe), planned_setup(recipe)
        gpus, nodes = recipe.parallel.nproc, recipe.parallel.nodes
        for engine, offload in (("zero2", False), ("zero2", True), ("zero3", False), ("zero3", True)):
            e = estimate(m, dataclasses.replace(setup, engine=engine, offload=offload))
            if engine == "zero2":
                _, ds = estimate_zero2_model_states_mem_needs(m.params, gpus, nodes, cpu_offload=offload)
            else:
                _, ds, _ = estimate_zero3_model_states_mem_needs(m.params, m.largest_layer, gpus, nodes,
                                                                 cpu_offload=offload, cpu_offload_params=offload)
            rows.append({"recipe": name, "engine": engine, "offload": offload, "gpus": gpus * nodes,
                         "plan_states_gb": (e.params + e.grads + e.optimizer) / 1e9, "deepspeed_gb": ds / 1e9,
                         "plan_total_gb": e.total / 1e9, "plan_host_per_node_gb": e.host_per_node / 1e9})
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] == ["--rank-program"]:
        rank_program(argv[1], argv[2], json.loads(argv[3]), Path(argv[4]))
        sys.stdout.flush()
        os._exit(0)  # as train/__main__.py: tearing gloo and DeepSpeed's threads down at exit can abort or hang
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model: seconds, for tests")
    parser.add_argument("--nproc", type=int, default=4, help="CPU ranks (the saving grows with them)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "build-memory.json")
    args = parser.parse_args(argv)
    config = TINY if args.smoke else LLAMA_300M
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("fsdp", "zero3"):
            for mode in ("eager", "placed"):
                cases.append(run_case(engine, mode, config, Path(tmp), args.nproc))
                c = cases[-1]
                gib = lambda values: " ".join(f"{v / 2**30:5.2f}" for v in values)  # noqa: E731
                print(f"{engine:6} {mode:7} {c['params'] / 1e6:6.1f}M params | after build, GiB per rank: "
                      f"{gib(c['rss_after_build'])} (all {sum(c['rss_after_build']) / 2**30:5.2f}) | with the engine: "
                      f"{gib(c['rss_after_engine'])} | peak per rank {gib(c['peak_rss_per_rank'])}, node "
                      f"{c['peak_rss_node'] / 2**30:5.2f} | {c['build_s']:5.1f} s", flush=True)
    plan = plan_vs_deepspeed()
    for r in plan:
        print(f"{r['recipe']:15} {r['engine']}{' + offload' if r['offload'] else '':10} {r['gpus']:3} GPUs: plan "
              f"{r['plan_states_gb']:7.2f} GB of weights+grads+optimizer per GPU, DeepSpeed {r['deepspeed_gb']:7.2f} GB; "
              f"plan total {r['plan_total_gb']:6.2f} GB, host/node {r['plan_host_per_node_gb']:6.1f} GB")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "command": "python -m benchmarks.build_memory" +
            (" --smoke" if args.smoke else "") + f" --nproc {args.nproc}", "model": config, "nproc": args.nproc}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, "cases": cases, "plan_vs_deepspeed": plan}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
