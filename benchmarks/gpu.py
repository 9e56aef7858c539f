"""Phase 2 of ``benchmarks/gpu.sh``: the GPU measurements, each in its own process under its own
timeout, in the order of :data:`MEASUREMENTS` (most valuable first), within one deadline.

    python -m benchmarks.gpu --out DIR [--deadline-at EPOCH] [--only a,b] [--cpu-smoke]

After each measurement one line goes to ``DIR/gpu-results.jsonl`` (flushed and fsynced) and
``DIR/gpu-results.json`` is rewritten whole (the header, every row, the ratios), so a run cut off
by the device call's limit still returns every finished row. A measurement that passes its
timeout is killed with its whole process tree (the launcher, its agent and the ranks each have a
session of their own) and recorded as ``timeout``; one that fails is recorded as ``failed`` with
its output's tail; the next one runs either way. A measurement is ``skipped`` when less time is
left to the deadline than it is expected to take; its timeout never runs past the deadline.

One GPU, bf16. Each ratio is against a baseline measured in the same run:
  * GPT-2 124M (seq 1024, micro-batch 16), ``shardforge run`` with DDP, FSDP and ZeRO-2 against
    the Hugging Face ``Trainer`` on the same model, batch, data and ``optim="adamw_torch_fused"``,
    logging every step as ours does: tokens/s and MFU (against the datasheet peak and a bf16
    matmul measured here); eager first, ``torch.compile`` on both last (cold compile caches);
  * a Llama-style 1.1B with FSDP and ZeRO-3: MFU, peak allocated and reserved memory against
    what ``shardforge plan`` estimates (``plan_gb``);
  * host overhead: ours' step time against a bare PyTorch loop timed by CUDA events;
  * checkpoints: save, async-save stall and verified load against ``torch.save``/``torch.load``;
  * a stop at step N and resume against the same run uninterrupted (losses of every later step);
  * the TensorBoard tags written from real NVML (utilisation, memory, power, temperature).
``--cpu-smoke`` runs every row on CPU with tiny models of the same families (the compile rows are
skipped), which is how tests/test_gpu_packaging.py proves the code without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.gpu_common import REPO, append_jsonl, run_logged, write_json

# name, expected seconds on one H100 (an estimate: nothing has been timed on a GPU yet), timeout,
# what it gives. Install (~20 s) + phase 1 (≤ 180 s, ~90 s expected) + these in order must fit
# DEADLINE_S; the rows left when the deadline nears are recorded as skipped, never started.
MEASUREMENTS = [
    ("peak", 10, 40, "the card (NVML) and a bf16 matmul peak: MFU against the datasheet and against this"),
    ("prepare", 25, 90, "tokenize + pack the corpus for GPT-2 (vocab 50257) and the 1.1B (32000) at once"),
    ("gpt2-ddp", 30, 90, "GPT-2 124M, DDP, eager: tokens/s, MFU, step-time breakdown, memory"),
    ("gpt2-hf", 30, 90, "the HF Trainer baseline on the same model and batch, eager"),
    ("gpt2-fsdp", 30, 90, "GPT-2 124M, FSDP, eager"),
    ("gpt2-zero2", 35, 90, "GPT-2 124M, ZeRO-2, eager"),
    ("llama1b-fsdp", 45, 120, "Llama 1.1B, FSDP: MFU, peak allocated/reserved vs the plan"),
    ("llama1b-zero3", 50, 120, "Llama 1.1B, ZeRO-3: MFU, peak allocated/reserved vs the plan"),
    ("host-overhead", 20, 60, "bare loop (CUDA events) vs the gpt2-ddp row's step time"),
    ("ckpt", 25, 60, "save / async-save stall / verified load vs torch.save / torch.load (GPT-2 state)"),
    ("resume", 40, 90, "stop at step N + resume vs uninterrupted: losses"),
    ("nvml-tags", 5, 30, "the NVML TensorBoard tags of the gpt2-ddp run, read back"),
    ("gpt2-ddp-compile", 70, 150, "GPT-2 124M, DDP + torch.compile (cold cache)"),
    ("gpt2-hf-compile", 70, 150, "the HF Trainer with torch_compile (cold cache)"),
]
DEADLINE_S = 480
"""The whole of ``bash benchmarks/gpu.sh`` (install, phase 1, phase 2): 8 minutes."""
INSTALL_EXPECTED_S, PHASE1_EXPECTED_S = 20, 90
"""Estimates (phase 1 stops itself at ``benchmarks.gpu_check.BUDGET_S``, 180 s): with them, every
row but the two compile rows is expected to fit the deadline; those run when time is left."""
SMOKE_TIMEOUT_S = 300
SMOKE_SKIPS = {"gpt2-ddp-compile", "gpt2-hf-compile"}  # inductor on a 2-core CPU measures nothing


def read_nvml() -> dict:
    """The card as NVML sees it (device 0)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - no driver: say so in the JSON
        return {"error": f"{type(err).__name__}: {err}"}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        return {"name": text(pynvml.nvmlDeviceGetName(h)), "uuid": text(pynvml.nvmlDeviceGetUUID(h)),
                "memory_total_gb": pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30,
                "driver": text(pynvml.nvmlSystemGetDriverVersion()),
                "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
                "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)}
    finally:
        pynvml.nvmlShutdown()


def finish(rows: list[dict], peak: dict) -> None:
    """MFU against the datasheet and the measured peak; tokens/s against the HF row of the same compile."""
    measured, sheet = peak.get("measured_peak_tflops"), peak.get("datasheet_peak_tflops")
    for row in rows:
        if row.get("status") != "ok" or not row.get("tokens_per_s"):
            continue
        hf = next((r for r in rows if r.get("engine") == "hf-trainer" and r.get("compile") == row.get("compile")
                   and r.get("tokens_per_s")), None)
        tflops, tps = row.get("model_tflops"), row.get("tokens_per_s")
        row["mfu_vs_datasheet"] = tflops / sheet if tflops and sheet else None
        row["mfu_vs_measured"] = tflops / measured if tflops and measured else None
        row["vs_hf"] = tps / hf["tokens_per_s"] if tps and hf and row.get("engine") != "hf-trainer" else None


def print_table(rows: list[dict]) -> None:
    def fmt(v, f: str) -> str:
        width = "".join(ch for ch in f.split(".")[0] if ch.isdigit())
        return format(v, f) if isinstance(v, (int, float)) else "-".rjust(int(width or 0))

    print(f"\n{'measurement':<17} {'status':<8} {'s':>5} {'tok/s':>9} {'MFU/sheet':>9} {'MFU/meas':>8} "
          f"{'vs HF':>6} {'alloc':>6} {'resrv':>6} {'plan':>6}  notes")
    for r in rows:
        note = {"host-overhead": lambda r: f"+{fmt(r.get('host_overhead_ms'), '.2f')} ms/step vs bare",
                "ckpt": lambda r: f"stall {fmt(r.get('stall_s'), '.3f')} s, save {fmt(r.get('save_vs_torch_save'), '.2f')}x,"
                                f" load {fmt(r.get('load_vs_torch_load'), '.2f')}x",
                "resume": lambda r: f"max |dloss| {fmt(r.get('max_abs_diff'), '.2e')}",
                "nvml-tags": lambda r: f"{len(r.get('tags', {}))} tag groups",
                "peak": lambda r: f"{r.get('device')}: {fmt(r.get('measured_peak_tflops'), '.0f')} TFLOP/s measured"}
        text = note[r["name"]](r) if r.get("status") == "ok" and r["name"] in note else (r.get("error") or "")[-160:]
        print(f"{r['name']:<17} {r['status']:<8} {fmt(r.get('seconds'), '5.0f')} {fmt(r.get('tokens_per_s'), '9.0f')} "
              f"{fmt(r.get('mfu_vs_datasheet'), '9.1%')} {fmt(r.get('mfu_vs_measured'), '8.1%')} "
              f"{fmt(r.get('vs_hf'), '6.2f')} {fmt(r.get('mem_allocated_gb'), '6.1f')} "
              f"{fmt(r.get('mem_reserved_gb'), '6.1f')} {fmt(r.get('plan_gb'), '6.1f')}  {' '.join(text.split())}")


def run_one(name: str, timeout_s: float, out: Path, work: Path, smoke: bool) -> dict:
    result = work / f"result-{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.gpu_measure", name, "--work", str(work), "--result", str(result)]
    t0 = time.time()
    code, timed_out, tail = run_logged(cmd + (["--cpu-smoke"] if smoke else []), timeout_s, out / "gpu-measure.log")
    row = {"seconds": round(time.time() - t0, 1)}
    if timed_out:
        return {**row, "status": "timeout", "error": f"killed at its {timeout_s:.0f} s timeout; {tail[-600:]}"}
    if code or not result.exists():
        return {**row, "status": "failed", "error": f"exit {code}: {tail[-1500:]}"}
    return {**row, "status": "ok", **json.loads(result.read_text())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "out"))
    parser.add_argument("--work", default="/tmp/shardforge-gpu-work", help="runs and data cache (phase 1's too)")
    parser.add_argument("--deadline-at", type=float, default=None,
                        help=f"epoch seconds the run must end by (gpu.sh: its start + {DEADLINE_S} s)")
    parser.add_argument("--only", default=None, help="comma-separated measurements (a rerun)")
    parser.add_argument("--timeout", action="append", default=[], metavar="NAME=S", help="override one timeout")
    parser.add_argument("--cpu-smoke", action="store_true", help="every row on CPU with tiny models")
    args = parser.parse_args(argv)
    names = [m[0] for m in MEASUREMENTS]
    only = args.only.split(",") if args.only else names
    overrides = dict(kv.split("=", 1) for kv in args.timeout)
    if set(only) - set(names) or set(overrides) - set(names):
        parser.error(f"unknown measurement {sorted((set(only) | set(overrides)) - set(names))}; choose from {names}")
    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print("benchmarks.gpu: no CUDA device; --cpu-smoke runs the rows on CPU", file=sys.stderr)
            return 2
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline_at or time.time() + (10**6 if args.cpu_smoke else DEADLINE_S)
    header = {"phase": 2, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu_smoke": args.cpu_smoke,
              "command": "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
              "deadline_s_left_at_start": round(deadline - time.time()),
              "budget": [{"name": n, "expected_s": e, "timeout_s": t, "what": w} for n, e, t, w in MEASUREMENTS]}
    rows: list[dict] = []
    for name, expected, timeout, what in MEASUREMENTS:
        if name not in only:
            continue
        left = deadline - time.time()
        limit = float(overrides.get(name, SMOKE_TIMEOUT_S if args.cpu_smoke else timeout))
        row = {"name": name, "what": what, "expected_s": expected, "timeout_s": limit}
        if args.cpu_smoke and name in SMOKE_SKIPS:
            row.update(status="skipped", error="--cpu-smoke: torch.compile rows run on the GPU only")
        elif left < (1 if args.cpu_smoke else expected):
            row.update(status="skipped", error=f"{left:.0f} s left before the deadline; expected to need {expected} s")
        else:
            print(f"gpu: {name} (timeout {min(limit, left):.0f} s, {left:.0f} s left) ...", flush=True)
            row.update(run_one(name, min(limit, left), out, work, args.cpu_smoke))
        rows.append(row)
        peak = json.loads((work / "peak.json").read_text()) if (work / "peak.json").exists() else {}
        finish(rows, peak)
        append_jsonl(out / "gpu-results.jsonl", row)
        write_json(out / "gpu-results.json", {**header, "peak": peak, "rows": rows})
        print(f"gpu: {name}: {row['status']} ({row.get('seconds', 0)} s)"
              + (f": {' '.join(row['error'].split())[-300:]}" if row["status"] != "ok" else ""), flush=True)
    print_table(rows)
    print(f"gpu: wrote {out / 'gpu-results.json'} and {out / 'gpu-results.jsonl'}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
