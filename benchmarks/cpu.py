"""CPU benchmarks: the harness against baselines measured side by side in the same run.

    python -m benchmarks.cpu                 # full: a few minutes on 2 cores (`make bench`)
    python -m benchmarks.cpu --smoke         # seconds-long, for the test that keeps this from rotting
    python -m benchmarks.cpu --only loop,ckpt --out my.json

Prints one table and writes JSON (default ``benchmarks/results/cpu.json``). Each row is a
ratio against a baseline run in the same invocation, alternating the two where it matters,
with medians and the p10–p90 spread. Nothing here is asserted: goals are printed next to the
measurements and recorded in ``benchmarks/RESULTS.md``.

Rows:
  loop      harness step time vs a bare PyTorch loop (same model, batch, precision, accumulation,
            fused AdamW), and the in-step leftover of both: step − forward/backward − clip/optimizer
  startup   process start → first step finished, harness (``shardforge run``) vs bare loop
  accum     one step with accumulation 8 vs 8 steps with accumulation 1 (same micro-batch)
  logging   step time with logging every step vs every 50 steps
  datawait  data wait as a fraction of step time (harness, from metrics.jsonl)
  tokenize  our tokenize-and-pack vs a bare ``datasets.map`` with the same tokenizer (tokens/s)
  ckpt      checkpoint save / load (sharded, fsynced, xxh3-verified) vs torch.save + fsync / reading + torch.load
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
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ALL = ("loop", "startup", "accum", "logging", "datawait", "tokenize", "ckpt")


@dataclass
class Row:
    name: str
    ours: float
    baseline: float
    unit: str
    goal: str
    spread: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def _spread(values: list[float], scale: float = 1e3) -> str:
    return f"p10–p90 {_pct(values, 0.1) * scale:.1f}–{_pct(values, 0.9) * scale:.1f}"


class Bench:
    """The tiny-cpu model in one process, fp32, on the Shakespeare cache prepared once."""

    def __init__(self, tmp: Path, smoke: bool):
        self.tmp, self.smoke = tmp, smoke
        base = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
        base["data"]["sources"][0]["path"] = str(REPO / base["data"]["sources"][0]["path"])
        base["data"]["cache_dir"] = str(tmp / "cache")
        base["parallel"] = {"engine": "ddp", "precision": "fp32", "nproc": 1}
        base["train"].update({"micro_batch_size": 8, "global_batch_size": 16, "eval_every": 0,
                              "eval_batches": 1, "log_every": 10})
        base["checkpoint"] = {"every_steps": 0, "at_end": False}
        base["logging"] = {"console": False, "telemetry_interval_s": 1.0}
        if smoke:
            base["model"]["config"].update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "num_key_value_heads": 2})
            base["data"]["sources"][0]["path"] = str(REPO / "data/shakespeare/hamlet_gut.txt")
            base["data"]["tokenizer"]["train"]["vocab_size"] = 512
            base["data"]["seq_len"] = 32
        self.base = base
        self.runs = 0

    def recipe(self, steps: int, **train) -> Path:
        self.runs += 1
        r = json.loads(json.dumps(self.base))
        r["run"]["name"] = f"bench-{self.runs}"
        r["run"]["dir"] = str(self.tmp / f"bench-{self.runs}")
        r["train"].update({"max_steps": steps, **train})
        path = self.tmp / f"bench-{self.runs}.yaml"
        path.write_text(yaml.safe_dump(r))
        return path

    def prepare(self) -> None:
        proc = subprocess.run([sys.executable, "-m", "launch", "prepare", str(self.recipe(1))],
                              env=_env(), capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"benchmarks: prepare failed: {proc.stderr[-2000:]}")

    def harness(self, steps: int, **train) -> tuple[float, list[dict]]:
        """``shardforge run`` one process; returns (launch time, metrics.jsonl records).

        The last record is ``{"event": "ready", "time": ...}``: when the loop started (status.json).
        """
        if self.smoke:
            train.setdefault("log_every", 1)
        path = self.recipe(steps, **train)
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "launch", "run", str(path)], env=_env(),
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"benchmarks: harness run failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        run_dir = Path(yaml.safe_load(path.read_text())["run"]["dir"])
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return start, records + [{"event": "ready", "time": json.loads((run_dir / "status.json").read_text())["started"]}]

    def bare(self, steps: int, **train) -> tuple[float, list[dict]]:
        path = self.recipe(steps, **train)
        out = path.with_suffix(".bare.jsonl")
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bare_loop", str(path), str(out)],
                              env=_env(), capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"benchmarks: bare loop failed: {proc.stderr[-2000:]}")
        return start, [json.loads(line) for line in out.read_text().splitlines()]


def step_times(records: list[dict], skip: int) -> list[float]:
    """Wall time per step between consecutive log records, after ``skip`` warm-up steps."""
    times = [(r["step"], r["time"]) for r in records if "loss" in r]
    return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(times, times[1:]) if s0 >= skip]


def leftovers(records: list[dict], skip: int, window: int) -> list[float]:
    """Per log window after ``skip`` steps: step time − forward/backward − clip/optimizer, per step.

    The harness's records are log windows already (its timers are window means); the bare loop's
    per-step records are grouped into windows of the same length, so both include the same share
    of whatever happens once per window."""
    rows = [r for r in records if "loss" in r]
    if "step_time_s" in rows[0]:
        return [r["step_time_s"] - r["fwd_bwd_s"] - r["optim_s"] for r in rows if r["step"] > skip]
    rows = [r for r in rows if r["step"] > skip - window]
    out = []
    for i in range(window, len(rows), window):
        group, before = rows[i - window + 1: i + 1], rows[i - window]
        seconds = (group[-1]["time"] - before["time"]) / window
        out.append(seconds - sum(r["fwd_bwd_s"] + r["optim_s"] for r in group) / window)
    return out


def ready_latency(start: float, records: list[dict]) -> float:
    """Process start → the training loop is about to run its first step."""
    return next(r["time"] for r in records if r.get("event") == "ready") - start


def bench_loop(b: Bench, rounds: int, steps: int, skip: int) -> list[Row]:
    ours, base, ours_start, base_start, waits, ours_left, base_left = [], [], [], [], [], [], []
    window = b.base["train"]["log_every"] if not b.smoke else 1
    for _ in range(rounds):  # alternate: machine noise hits both sides alike
        start, rec = b.harness(steps)
        ours += step_times(rec, skip)
        ours_left += leftovers(rec, skip, window)
        ours_start.append(ready_latency(start, rec))
        waits += [r["data_wait_s"] / r["step_time_s"] for r in rec if r.get("step", 0) > skip and "loss" in r]
        start, rec = b.bare(steps)
        base += step_times(rec, skip)
        base_left += leftovers(rec, skip, window)
        base_start.append(ready_latency(start, rec))
    left, bare_left = statistics.median(ours_left), statistics.median(base_left)
    return [
        Row("loop: step time vs bare PyTorch loop", statistics.median(ours), statistics.median(base), "s",
            "≤ 1.03×", f"ours {_spread(ours)} ms, bare {_spread(base)} ms, n={len(ours)}+{len(base)}"),
        Row("loop: in-step leftover (step − fwd/bwd − clip/optim), ms", left * 1e3, bare_left * 1e3, "ms",
            "≤ bare + 1 ms", f"difference {(left - bare_left) * 1e3:+.2f} ms/step; ours {_spread(ours_left)} ms, "
            f"bare {_spread(base_left)} ms; medians of {window}-step windows"),
        Row("startup: process start → training loop ready", statistics.median(ours_start),
            statistics.median(base_start), "s", "≤ 1.3×",
            "harness: launcher, agent, rank start-up and the gloo rendezvous"),
        Row("datawait: data wait / step time", statistics.median(waits), 1.0, "fraction", "≤ 0.01",
            f"median of {len(waits)} steps"),
    ]


def bench_accum(b: Bench, rounds: int, steps: int, skip: int) -> list[Row]:
    acc8, acc1 = [], []
    for _ in range(rounds):
        acc8 += step_times(b.harness(steps, micro_batch_size=4, global_batch_size=32)[1], skip)
        acc1 += step_times(b.harness(steps * 4, micro_batch_size=4, global_batch_size=4)[1], skip)
    return [Row("accum: 1 step × accum 8 vs 8 steps × accum 1", statistics.median(acc8),
                8 * statistics.median(acc1), "s", "≤ 1.02×", f"accum 8 {_spread(acc8)} ms")]


def bench_logging(b: Bench, rounds: int, steps: int, every: int) -> list[Row]:
    def per_step(records: list[dict]) -> float:
        logged = {r["step"]: r["time"] for r in records if "loss" in r}
        first, last = every, (steps - 1) // every * every
        return (logged[last] - logged[first]) / (last - first)

    on, off = [], []
    for _ in range(rounds):
        on.append(per_step(b.harness(steps, log_every=1)[1]))
        off.append(per_step(b.harness(steps, log_every=every)[1]))
    return [Row(f"logging: every step vs every {every}", statistics.median(on), statistics.median(off), "s",
                "≤ 1.01×", f"{rounds} alternating pairs")]


def bench_tokenize(b: Bench, rounds: int) -> list[Row]:
    import datasets

    from train.data.pretraining import tokenize_and_pack
    from train.data.sources import load_source
    from train.data.tokenizer import load_or_train_tokenizer
    from train.config.recipe import recipe_from_dict

    datasets.disable_caching()  # time the work, not a cache hit
    recipe = recipe_from_dict(yaml.safe_load(b.recipe(1).read_text()))
    tokenizer = load_or_train_tokenizer(recipe, Path(recipe.data.cache_dir))
    ds = load_source(recipe.data.sources[0], "data.sources[0]")
    ours, bare = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _, stats = tokenize_and_pack(ds, tokenizer, recipe.data.seq_len, num_proc=1, desc="bench")
        ours.append(time.perf_counter() - t0)
        tokens = stats["tokens_total"]
        t0 = time.perf_counter()
        out = ds.map(lambda batch: tokenizer(batch["text"], add_special_tokens=False), batched=True,
                     remove_columns=ds.column_names)
        bare_tokens = sum(len(x) for x in out["input_ids"])
        bare.append(time.perf_counter() - t0)
    return [Row("tokenize: tokenize+pack vs bare datasets.map (tokens/s)", tokens / statistics.median(ours),
                bare_tokens / statistics.median(bare), "tok/s", "report (higher is better)",
                f"{tokens:,} tokens, {rounds} rounds, num_proc=1")]


def bench_ckpt(b: Bench, rounds: int) -> list[Row]:
    """Save and load through the Checkpointer (DCP + fsync + digests) vs torch.save + fsync and
    reading the file once + torch.load: the same durability, without the integrity check."""
    import torch
    import torch.distributed as dist

    from train.checkpoint.manager import Checkpointer
    from train.checkpoint.files import DIGEST, file_digests, io_threads
    from train.rundir import fsync_path as _fsync
    from train.checkpoint.state import Counters
    from train.engines.torch_engines import DDPEngine
    from train.model import build_model
    from train.config.recipe import recipe_from_dict

    raw = json.loads(json.dumps(b.base))
    raw["model"]["config"].update({} if b.smoke else {"hidden_size": 512, "intermediate_size": 1408,
                                                       "num_hidden_layers": 6, "num_attention_heads": 8,
                                                       "num_key_value_heads": 8})
    raw["train"]["max_steps"] = 10
    recipe = recipe_from_dict(raw)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    engine = DDPEngine(recipe, build_model(recipe.model, 8192, 0), torch.device("cpu"), accum=1)  # 1 rank
    for _ in range(2):  # populate Adam's moments so the state is the full size
        engine.forward_backward({"input_ids": torch.randint(0, 8192, (2, 32))},
                                lambda m, batch: m(input_ids=batch["input_ids"]).logits.float().mean(), True)
        engine.optimizer_step(torch.zeros(()))
    params = sum(p.numel() for p in engine.model.parameters())
    saves, loads, durable_saves, durable_loads, stalls, commits, hashes = [], [], [], [], [], [], []
    for i in range(rounds):  # alternate ours and the baseline within each round
        root = b.tmp / f"ckpt-{i}"
        ckpt = Checkpointer(root / "checkpoints", engine, {"counters": Counters()}, 0, 1, {"engine": "ddp"})
        t0 = time.perf_counter()
        path = ckpt.save(1, keep_last=1, keep_every=0, extra_manifest={})
        saves.append(time.perf_counter() - t0)
        full = {"model": engine.model.state_dict(), "optim": engine.optimizer.state_dict(),
                "scheduler": engine.scheduler.state_dict()}
        durable = root / "durable.pt"
        t0 = time.perf_counter()
        torch.save(full, durable)
        _fsync(durable)
        durable_saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # checkpoint.async_save: the training stall, then the commit
        ckpt.save(2, keep_last=2, keep_every=0, extra_manifest={}, background=True)
        stalls.append(time.perf_counter() - t0)
        ckpt.wait()
        commits.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        found = ckpt.find_resume_point("auto")  # checksums are verified on every resume
        ckpt.load(found)
        loads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with open(durable, "rb") as f:  # the files read once (as a verifying load must), then torch.load
            while f.read(1 << 24):
                pass
        state = torch.load(durable, weights_only=True)
        engine.model.load_state_dict(state["model"])
        engine.optimizer.load_state_dict(state["optim"])
        durable_loads.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        t0 = time.perf_counter()  # hashing alone: what the digest adds to a save or a load
        file_digests([f for f in path.rglob("*") if f.is_file()])
        hashes.append(time.perf_counter() - t0)
    note = f"{params / 1e6:.1f}M params, {size / 2**20:.0f} MiB on disk, {rounds} alternating rounds"
    return [Row("ckpt: save vs torch.save + fsync", statistics.median(saves), statistics.median(durable_saves),
                "s", "≤ 1.2×", note + f"; ours adds DCP's sharded format, {DIGEST} of every file (hashed while "
                "writing), the atomic rename and the manifest"),
            Row("ckpt: load (verify + restore) vs reading the file + torch.load", statistics.median(loads),
                statistics.median(durable_loads), "s", "≤ 1.2×", f"ours checks the {DIGEST} of every file first"),
            Row("ckpt: async save stall vs synchronous save", statistics.median(stalls), statistics.median(saves),
                "s", "report", f"checkpoint.async_save: training waits for the copy to CPU memory only; "
                f"the write + commit took {statistics.median(commits):.2f} s in all"),
            Row(f"ckpt: {DIGEST} of the checkpoint alone vs torch.save + fsync", statistics.median(hashes),
                statistics.median(durable_saves), "s", "report", f"hashing with {io_threads()} thread(s), as "
                "a load does")]


def print_table(rows: list[Row]) -> None:
    print(f"{'benchmark':<58} {'ours':>12} {'baseline':>12} {'ratio':>8}  goal")
    for r in rows:
        print(f"{r.name:<58} {r.ours:>12.4g} {r.baseline:>12.4g} {r.ratio:>7.3f}×  {r.goal}  ({r.unit}; {r.spread})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds-long run with tiny sizes (no meaningful numbers)")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu.json"))
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if only - set(ALL):
        parser.error(f"--only: unknown {sorted(only - set(ALL))}; choose from {','.join(ALL)}")
    if only - {"ckpt"} and not (REPO / "data" / "shakespeare").is_dir():
        print("benchmarks: data/shakespeare is missing; run `make data` first", file=sys.stderr)
        return 2
    smoke = args.smoke
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "command": "python -m benchmarks.cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
              "smoke": smoke}
    rows: list[Row] = []

    def record(new_rows: list[Row]) -> None:  # after every section: a late failure loses nothing
        rows.extend(new_rows)
        out.write_text(json.dumps({**header, "rows": [{**r.__dict__, "ratio": r.ratio} for r in rows]}, indent=1))

    sections = [
        ({"loop", "startup", "datawait"}, lambda b: bench_loop(b, rounds=1 if smoke else 3, steps=4 if smoke else 80,
                                                              skip=1 if smoke else 10)),
        ({"accum"}, lambda b: bench_accum(b, rounds=1 if smoke else 2, steps=3 if smoke else 30, skip=1 if smoke else 5)),
        ({"logging"}, lambda b: bench_logging(b, rounds=1 if smoke else 3, steps=5 if smoke else 110,
                                              every=2 if smoke else 50)),
        ({"tokenize"}, lambda b: bench_tokenize(b, rounds=1 if smoke else 3)),
        ({"ckpt"}, lambda b: bench_ckpt(b, rounds=1 if smoke else 3)),
    ]
    with tempfile.TemporaryDirectory(prefix="shardforge-bench-") as tmp:
        b = Bench(Path(tmp), smoke)
        if only - {"ckpt"}:  # the checkpoint rows build their model directly: no data needed
            b.prepare()
        for names, run in sections:
            if only & names:
                record(run(b))
                print(f"benchmarks: {', '.join(sorted(only & names))} done", flush=True)
    print_table(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
