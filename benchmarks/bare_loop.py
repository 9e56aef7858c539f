"""The baseline: a bare PyTorch training loop with the harness's model, batch, precision and accumulation.

``python -m benchmarks.bare_loop RECIPE.yaml OUT.jsonl`` trains one process on the recipe's
prepared data (the same Arrow cache) with the harness's optimizer (fused AdamW), autocast and
``loss.item()`` per step, and writes ``{"step", "time", "loss", "fwd_bwd_s", "optim_s"}`` per step
(the harness's ``metrics.jsonl`` has the same timers, averaged over each log window).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

START = time.time()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402


def main(recipe_path: str, out_path: str) -> None:
    from train.data.prepare import prepare_data
    from train.model import build_model
    from train.optim import build_adamw, build_scheduler
    from train.config.recipe import recipe_from_dict

    recipe = recipe_from_dict(yaml.safe_load(Path(recipe_path).read_text()))
    t, o = recipe.train, recipe.optim
    data = prepare_data(recipe)
    blocks = torch.from_numpy(data.train.rows(range(len(data.train)))["input_ids"]).long()
    model = build_model(recipe.model, len(data.tokenizer), recipe.run.seed)
    optimizer = build_adamw(model, o, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, o, t.max_steps)
    accum = t.global_batch_size // t.micro_batch_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.parallel.precision)
    generator = torch.Generator().manual_seed(recipe.run.seed)
    order, pos = torch.randperm(len(blocks), generator=generator), 0
    with open(out_path, "w") as out:
        out.write(json.dumps({"event": "ready", "time": time.time(), "process_start": START}) + "\n")
        for step in range(1, t.max_steps + 1):
            total, fwd_bwd = 0.0, 0.0
            for _ in range(accum):
                if pos + t.micro_batch_size > len(order):
                    order, pos = torch.randperm(len(blocks), generator=generator), 0
                ids = blocks[order[pos: pos + t.micro_batch_size]]
                pos += t.micro_batch_size
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    logits = model(input_ids=ids).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                (loss / accum).backward()
                fwd_bwd += time.perf_counter() - t0
                total += loss.item() / accum
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            optim = time.perf_counter() - t0
            out.write(json.dumps({"step": step, "time": time.time(), "loss": total, "fwd_bwd_s": fwd_bwd,
                                  "optim_s": optim}) + "\n")

if __name__ == "__main__":
    main(*sys.argv[1:3])
