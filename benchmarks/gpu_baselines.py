"""The two baselines of the GPU benchmark, run inside a measurement's own process:

* :func:`hf_trainer`: ``transformers.Trainer`` on the same packed blocks, model config, batch,
  precision and optimizer (``optim="adamw_torch_fused"``), logging every step as ours does;
  tokens/s from per-step wall times (synchronised on CUDA), eager or with ``torch_compile``.
* :func:`bare_loop`: a plain PyTorch loop on the same model, data, fused AdamW, clip and autocast,
  ``loss.item()`` every step; each step timed by the host clock and by CUDA events around it, so
  ours' step time minus its host step time is what the harness adds per step.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def _prepared(recipe: dict):
    from train.data.prepare import prepare_data
    from train.config.recipe import recipe_from_dict

    r = recipe_from_dict(recipe)
    return r, prepare_data(r)


def hf_trainer(recipe: dict, compile_: bool, warmup: int, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from train.model import build_config, token_ids

    r, data = _prepared(recipe)
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

    args = TrainingArguments(output_dir=str(Path(recipe["run"]["dir"]) / "hf"), max_steps=r.train.max_steps,
                             per_device_train_batch_size=r.train.micro_batch_size, learning_rate=r.optim.lr,
                             warmup_steps=r.optim.warmup_steps, bf16=r.parallel.precision == "bf16",
                             optim="adamw_torch_fused", logging_steps=1, torch_compile=compile_,
                             save_strategy="no", report_to=[], use_cpu=device == "cpu", disable_tqdm=True, seed=0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()]).train()
    per_step = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    tokens = r.train.micro_batch_size * r.data.seq_len
    return {"tokens_per_s": tokens / statistics.median(per_step) if per_step else None,
            "step_time_s": statistics.median(per_step) if per_step else None, "steps_timed": len(per_step),
            "mem_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "mem_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None}


def bare_loop(recipe: dict, warmup: int, device_name: str) -> dict:
    import torch
    import torch.nn.functional as F

    from train.model import build_model
    from train.optim import build_adamw, build_scheduler

    r, data = _prepared(recipe)
    device = torch.device(device_name)
    t, o = r.train, r.optim
    blocks = torch.from_numpy(data.train.rows(range(len(data.train)))["input_ids"]).long()
    model = build_model(r.model, len(data.tokenizer), r.run.seed).to(device)
    optimizer = build_adamw(model, o, device)
    scheduler = build_scheduler(optimizer, o, t.max_steps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.parallel.precision)
    generator = torch.Generator().manual_seed(r.run.seed)
    order = torch.randperm(len(blocks), generator=generator)
    cuda = device.type == "cuda"
    host, gpu = [], []
    for step in range(t.max_steps):
        i = (step * t.micro_batch_size) % max(len(order) - t.micro_batch_size, 1)
        ids = blocks[order[i: i + t.micro_batch_size]].to(device, non_blocking=True)
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            end.record()
        loss.item()  # the host waits for the step, as the harness does at a log step
        host.append(time.perf_counter() - t0)
        if cuda:
            gpu.append(begin.elapsed_time(end) / 1e3)
    host, gpu = host[warmup:], gpu[warmup:]
    tokens = t.micro_batch_size * r.data.seq_len
    step = statistics.median(host) if host else None
    return {"bare_step_time_s": step, "bare_tokens_per_s": tokens / step if step else None,
            "bare_gpu_step_s": statistics.median(gpu) if gpu else None, "steps_timed": len(host)}
