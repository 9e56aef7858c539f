"""The baseline: a bare PyTorch training loop with the harness's model, batch, precision and accumulation.

``python -m benchmarks.bare_loop RECIPE.yaml OUT.jsonl`` trains one process on the recipe's
prepared data (the same Arrow cache) with plain AdamW, autocast and ``loss.item()`` per
step, and writes ``{"step", "time", "loss"}`` per step, like the harness's ``metrics.jsonl``.
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
    from train.optim import build_scheduler, param_groups
    from train.recipe import recipe_from_dict

    recipe = recipe_from_dict(yaml.safe_load(Path(recipe_path).read_text()))
    t, o = recipe.train, recipe.optim
    data = prepare_data(recipe, log=lambda *_: None)
    blocks = torch.tensor(data.train["input_ids"], dtype=torch.long)
    model = build_model(recipe.model, len(data.tokenizer), recipe.run.seed)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = build_scheduler(optimizer, o, t.max_steps)
    accum = t.global_batch_size // t.micro_batch_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.parallel.precision)
    generator = torch.Generator().manual_seed(recipe.run.seed)
    order, pos = torch.randperm(len(blocks), generator=generator), 0
    with open(out_path, "w") as out:
        out.write(json.dumps({"event": "ready", "time": time.time(), "process_start": START}) + "\n")
        for step in range(1, t.max_steps + 1):
            total = 0.0
            for _ in range(accum):
                if pos + t.micro_batch_size > len(order):
                    order, pos = torch.randperm(len(blocks), generator=generator), 0
                ids = blocks[order[pos: pos + t.micro_batch_size]]
                pos += t.micro_batch_size
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    logits = model(input_ids=ids).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                (loss / accum).backward()
                total += loss.item() / accum
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            out.write(json.dumps({"step": step, "time": time.time(), "loss": total}) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
