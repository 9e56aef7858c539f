"""One measurement of phase 2, in a process of its own (``benchmarks.gpu`` starts it under a timeout
that kills the whole tree, and reads ``RESULT`` back):

    python -m benchmarks.gpu_measure NAME --work DIR --result RESULT.json [--cpu-smoke]

``NAME`` is a row of :data:`benchmarks.gpu.MEASUREMENTS`. Runs of ours go through ``shardforge run``
(``python -m launch run``) and are read from their ``metrics.jsonl`` (medians after warm-up); the
baselines are in :mod:`benchmarks.gpu_baselines`. ``--cpu-smoke`` swaps each model for a tiny one
of the same family and runs on CPU (gloo, fp32), which is how the tests prove every row's code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.gpu_common import SMOKE_MODEL, child_env, injected, median_of, read_metrics, recipe_for

GPT2, LLAMA, TINY = "gpt2-124m", "llama-1b", "tiny-llama"
STEPS = {GPT2: (30, 8), LLAMA: (16, 5), TINY: (12, 0)}
"""(steps, warm-up steps left out of the medians) per model on the GPU; --cpu-smoke: (4, 1)."""


@dataclasses.dataclass
class Ctx:
    work: Path
    smoke: bool

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    @property
    def precision(self) -> str:
        return "fp32" if self.smoke else "bf16"

    def model(self, model: str) -> str:
        return SMOKE_MODEL[model] if self.smoke else model

    def steps(self, model: str) -> tuple[int, int]:
        return (4, 1) if self.smoke else STEPS[model]

    def recipe(self, model: str, engine: str, compile_: bool = False, **kw) -> dict:
        return recipe_for(self.model(model), engine, compile_, self.steps(model)[0], self.work, self.precision, **kw)

    def launch(self, recipe: dict) -> tuple[int, str]:
        """``shardforge run``, its output into this measurement's (gpu-measure.log); (exit code, log tail).
        The measurement's timeout, in ``benchmarks.gpu``, covers it."""
        path = self.work / f"{recipe['run']['name']}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        code = subprocess.run([sys.executable, "-m", "launch", "run", str(path)], env=child_env()).returncode
        log = Path(recipe["run"]["dir"]) / "logs" / "launch.log"
        return code, log.read_text(errors="replace")[-2500:] if log.exists() else ""


def plan_gib(recipe: dict) -> dict:
    """What ``shardforge plan`` predicts per GPU for this run (GiB), next to the measured peaks."""
    from train.engines.memory_plan import estimate
    from train.config.model_checks import model_sizes, planned_setup
    from train.config.recipe import recipe_from_dict, resolve_defaults

    r = recipe_from_dict(recipe)
    resolve_defaults(r, nproc=1)
    e = estimate(model_sizes(r), planned_setup(r))
    # torch's allocator sees the model's tensors, not the CUDA context or NCCL's own buffers: the
    # plan's share that max_memory_reserved measures is plan_gb less plan_runtime_gb (plus buffers)
    return {"plan_gb": e.total / 2**30, "plan_activations_gb": e.activations / 2**30,
            "plan_runtime_gb": e.runtime / 2**30}


def m_peak(c: Ctx) -> dict:
    """The card as NVML reads it and a bf16 matmul peak measured here (MFU is given against both)."""
    import torch

    from benchmarks.gpu import read_nvml
    from train.device_peaks import peak_tflops

    n, reps = (8192, 20) if not c.smoke else (256, 2)
    dtype = torch.bfloat16 if not c.smoke else torch.float32
    a, b = (torch.randn(n, n, device=c.device, dtype=dtype) for _ in range(2))
    best = 0.0
    for _ in range(5 if not c.smoke else 2):
        if not c.smoke:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if not c.smoke:
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12)
    card = torch.cuda.get_device_name(0) if not c.smoke else "cpu"
    out = {"device": card, "measured_peak_tflops": best, "torch": torch.__version__,
           "datasheet_peak_tflops": peak_tflops(card, "bf16") if not c.smoke else None,
           "nvml": read_nvml() if not c.smoke else None}
    (c.work / "peak.json").write_text(json.dumps(out))
    return out


def m_prepare(c: Ctx) -> dict:
    """Tokenize and pack for both models at once (each model's first run would do it otherwise)."""
    procs = []
    for model in (GPT2, LLAMA):
        recipe = c.recipe(model, "ddp", name=f"prepare-{model}")
        path = c.work / f"prepare-{model}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        procs.append(subprocess.Popen([sys.executable, "-m", "launch", "prepare", str(path)], env=child_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        if c.smoke:  # both are the same tiny data on CPU: one after the other shares the cache
            procs[-1].wait()
    outs = [(p.communicate()[0], p.returncode) for p in procs]
    if any(code for _, code in outs):
        raise RuntimeError(" | ".join(out[-800:] for out, code in outs if code))
    return {"prepared": [c.model(m) for m in (GPT2, LLAMA)]}


def m_ours(c: Ctx, model: str, engine: str, compile_: bool = False) -> dict:
    recipe = c.recipe(model, engine, compile_)
    code, tail = c.launch(recipe)
    if code:
        raise RuntimeError(f"shardforge run exited {code}: {tail[-1500:]}")
    warmup = c.steps(model)[1]
    rec = [r for r in read_metrics(Path(recipe["run"]["dir"])) if "loss" in r and r["step"] > warmup]
    row = {key: median_of(rec, key) for key in ("tokens_per_s", "mfu", "model_tflops", "step_time_s",
                                                "fwd_bwd_s", "optim_s", "data_wait_s")}
    for key in ("mem_allocated_gb", "mem_reserved_gb"):
        row[key] = max((r[key] for r in rec if r.get(key) is not None), default=None)
    row.update(plan_gib(recipe))
    if row.get("mem_reserved_gb"):
        row["plan_vs_reserved"] = row["plan_gb"] / row["mem_reserved_gb"]
    row["telemetry"] = {k.split("/")[0]: median_of(rec, k) for k in (rec[0] if rec else {})
                        if k.endswith("/mean") and k.startswith(("gpu_", "host_"))}
    return {**row, "model": c.model(model), "engine": engine, "compile": compile_, "steps_timed": len(rec),
            "final_loss": rec[-1]["loss"] if rec else None, "run_dir": recipe["run"]["dir"]}


def m_hf(c: Ctx, compile_: bool = False) -> dict:
    from benchmarks.gpu_baselines import hf_trainer

    recipe = c.recipe(GPT2, "ddp", compile_, name=f"{c.model(GPT2)}-hf-{'compile' if compile_ else 'eager'}")
    return {"model": c.model(GPT2), "engine": "hf-trainer", "compile": compile_,
            **hf_trainer(recipe, compile_, c.steps(GPT2)[1], c.device)}


def m_host_overhead(c: Ctx) -> dict:
    """Ours (the gpt2-ddp row's step time) against the bare loop on the same model and batch."""
    from benchmarks.gpu_baselines import bare_loop

    recipe = c.recipe(GPT2, "ddp", name=f"{c.model(GPT2)}-bare")
    bare = bare_loop(recipe, c.steps(GPT2)[1], c.device)
    ours_dir = Path(c.recipe(GPT2, "ddp")["run"]["dir"])
    rec = [r for r in read_metrics(ours_dir) if "loss" in r and r["step"] > c.steps(GPT2)[1]]
    ours = median_of(rec, "step_time_s")
    if ours is None:
        raise RuntimeError(f"no step times in {ours_dir}: the gpt2-ddp row runs first")
    out = {"model": c.model(GPT2), "engine": "ddp", "ours_step_time_s": ours, **bare,
           "ratio_vs_bare": ours / bare["bare_step_time_s"],
           "host_overhead_ms": (ours - bare["bare_step_time_s"]) * 1e3}
    if bare.get("bare_gpu_step_s"):
        out["ours_over_gpu_time_ms"] = (ours - bare["bare_gpu_step_s"]) * 1e3
    return out


def m_ckpt(c: Ctx) -> dict:
    """Checkpoint save (sync), async-save stall and verified load of the GPT-2 model's state on this
    device, against ``torch.save`` + fsync and reading the file + ``torch.load``."""
    import statistics

    import torch
    import torch.distributed as dist

    from train.checkpoint.manager import Checkpointer
    from train.checkpoint.state import Counters
    from train.engines.torch_engines import DDPEngine
    from train.model import build_model
    from train.config.recipe import recipe_from_dict
    from train.rundir import fsync_path

    recipe = recipe_from_dict(c.recipe(GPT2, "ddp", name="ckpt"))
    device = torch.device(c.device)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    vocab = 50257 if not c.smoke else 512
    import inspect

    accum = {"accum": 1} if "accum" in inspect.signature(DDPEngine).parameters else {}  # one micro-batch a step
    engine = DDPEngine(recipe, build_model(recipe.model, vocab, 0), device, **accum)
    ids = torch.randint(0, vocab, (2, 64), device=device)
    for _ in range(2):  # Adam's moments exist: the state is its full size
        engine.forward_backward({"input_ids": ids}, lambda m, b: m(input_ids=b["input_ids"]).logits.float().mean(),
                                True)
        engine.optimizer_step(torch.zeros((), device=device))
    rows: dict[str, list] = {k: [] for k in ("save", "stall", "commit", "load", "torch_save", "torch_load")}
    for i in range(2 if not c.smoke else 1):
        root = c.work / f"ckpt-{i}"
        ckpt = Checkpointer(root / "checkpoints", engine, {"counters": Counters()}, 0, 1, {"engine": "ddp"})
        t0 = time.perf_counter()
        ckpt.save(1, keep_last=2, keep_every=0, extra_manifest={})
        rows["save"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt.save(2, keep_last=2, keep_every=0, extra_manifest={}, background=True)
        rows["stall"].append(time.perf_counter() - t0)
        ckpt.wait()
        rows["commit"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt.load(ckpt.find_resume_point("auto"))
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows["load"].append(time.perf_counter() - t0)
        plain = root / "plain.pt"
        t0 = time.perf_counter()
        torch.save({"model": engine.model.state_dict(), "optim": engine.optimizer.state_dict()}, plain)
        fsync_path(plain)
        rows["torch_save"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with open(plain, "rb") as f:
            while f.read(1 << 24):
                pass
        state = torch.load(plain, weights_only=True, map_location=device)
        engine.model.load_state_dict(state["model"])
        engine.optimizer.load_state_dict(state["optim"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows["torch_load"].append(time.perf_counter() - t0)
    med = {f"{k}_s": statistics.median(v) for k, v in rows.items()}
    return {**med, "params_m": sum(p.numel() for p in engine.model.parameters()) / 1e6,
            "save_vs_torch_save": med["save_s"] / med["torch_save_s"],
            "stall_vs_torch_save": med["stall_s"] / med["torch_save_s"],
            "load_vs_torch_load": med["load_s"] / med["torch_load_s"]}


def m_resume(c: Ctx) -> dict:
    """A run stopped at step N (``train.stop_after``, with its checkpoint) and resumed, against the
    same run uninterrupted, both with ``train.deterministic: true``: the losses of every step after N."""
    steps = c.steps(TINY)[0] if not c.smoke else 6
    stop = steps // 2
    losses = {}
    for name in ("straight", "resumed"):
        recipe = recipe_for(TINY, "ddp", False, steps, c.work, c.precision, name=f"resume-{name}")
        recipe["checkpoint"] = {"every_steps": 0, "at_end": False}
        recipe["train"]["deterministic"] = True
        if name == "resumed":
            recipe["train"]["stop_after"] = stop
            code, tail = c.launch(recipe)
            if code != 75:  # EX_TEMPFAIL: stopped with a checkpoint, to be requeued
                raise RuntimeError(f"the run stopped after {stop} steps exited {code}, not 75: {tail[-1200:]}")
            recipe["train"]["stop_after"] = 0
        code, tail = c.launch(recipe)
        if code:
            raise RuntimeError(f"{name} run exited {code}: {tail[-1200:]}")
        losses[name] = {r["step"]: r["loss"] for r in read_metrics(Path(recipe["run"]["dir"])) if "loss" in r}
    after = [s for s in sorted(losses["straight"]) if s > stop]
    diffs = [abs(losses["straight"][s] - losses["resumed"].get(s, float("nan"))) for s in after]
    return {"steps": steps, "stopped_at": stop, "deterministic_setting": True,
            "losses_straight": [losses["straight"][s] for s in after],
            "losses_resumed": [losses["resumed"].get(s) for s in after],
            "max_abs_diff": max(diffs) if diffs else None, "equal": bool(diffs) and max(diffs) == 0.0}


def m_nvml_tags(c: Ctx) -> dict:
    """The TensorBoard tags the gpt2-ddp run wrote from NVML (host CPU and RSS on CPU), read back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(c.recipe(GPT2, "ddp")["run"]["dir"])
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    wanted = ("host_cpu_util", "host_rss_gb") if c.smoke else ("gpu_util", "gpu_mem_used_gb", "gpu_power_w",
                                                               "gpu_temp_c")
    found = {w: [t for t in tags if t.startswith(w + "/")] for w in wanted}
    missing = [w for w, t in found.items() if not t]
    if missing:
        raise RuntimeError(f"no TensorBoard tags for {missing} in {run_dir}; tags: {sorted(tags)[:40]}")
    values = {w: [e.value for e in acc.Scalars(t[0])] for w, t in found.items()}
    return {"tags": {w: t for w, t in found.items()}, "median": {w: sorted(v)[len(v) // 2] for w, v in values.items()},
            "points": {w: len(v) for w, v in values.items()}}


MEASURE = {
    "peak": m_peak, "prepare": m_prepare,
    "gpt2-ddp": lambda c: m_ours(c, GPT2, "ddp"), "gpt2-hf": lambda c: m_hf(c),
    "gpt2-fsdp": lambda c: m_ours(c, GPT2, "fsdp"), "gpt2-zero2": lambda c: m_ours(c, GPT2, "zero2"),
    "llama1b-fsdp": lambda c: m_ours(c, LLAMA, "fsdp"), "llama1b-zero3": lambda c: m_ours(c, LLAMA, "zero3"),
    "host-overhead": m_host_overhead, "ckpt": m_ckpt, "resume": m_resume, "nvml-tags": m_nvml_tags,
    "gpt2-ddp-compile": lambda c: m_ours(c, GPT2, "ddp", True), "gpt2-hf-compile": lambda c: m_hf(c, True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_measure")
    parser.add_argument("name", choices=sorted(MEASURE))
    parser.add_argument("--work", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args(argv)
    if injected("hang", args.name):  # with a grandchild in a session of its own, as a launch has
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        print(f"gpu_measure: {args.name}: injected hang; grandchild pid {child.pid}", flush=True)
        while True:
            time.sleep(60)
    ctx = Ctx(Path(args.work), args.cpu_smoke)
    ctx.work.mkdir(parents=True, exist_ok=True)
    out = MEASURE[args.name](ctx)
    Path(args.result).write_text(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
