"""Random kills: SIGKILL one rank or the whole job at random moments, resume, and compare bit for bit.

    python -m benchmarks.kill_harness --kills 100 --seed 1          # the long mode (~1 hour on 2 cores)
    python -m benchmarks.kill_harness --engines zero3 --steps 6 --plan forward:1:1,backward:2:0,optimizer:3:1,job@forward:5:0
                                                                     # what CI runs (tests/test_faults.py)

For each engine: one uninterrupted fp32 run on 2 CPU processes, then a chaos run of the same
recipe that is killed again and again until it completes. Each kill is drawn from:

* one rank SIGKILLed at a kill point of a random step: ``forward``, ``backward``, ``optimizer``,
  or a checkpoint's ``write``, ``rename``, ``manifest``, ``prune`` (``SHARDFORGE_KILL_AT``);
* the whole job (launcher, torchrun and every trainer) SIGKILLed after a random delay.

``--plan`` replaces the draws with a fixed list, in order: ``POINT:STEP:RANK``, ``job:F`` (the
whole job after F × the uninterrupted run's duration) or ``job@POINT:STEP:RANK`` (the whole job
once that rank has paused there: a whole-job kill that lands where planned). A planned kill that cannot land (its step
is already behind the resume point, or the launch ends first) lets the run complete, and the rest
of the plan goes on in a fresh run.

After each kill the latest committed checkpoint must verify, and the next launch must say it
resumed from it. At the end the losses in metrics.jsonl and the exported weights must equal
the uninterrupted run's exactly. Prints one line per kill and a summary; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POINTS = ("forward", "backward", "optimizer", "write", "rename", "manifest", "prune")
ENGINES = ("ddp", "fsdp", "zero1", "zero2", "zero3")


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **(extra or {})}


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def write_recipe(tmp: Path, name: str, engine: str, steps: int) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.helpers import make_corpus, tiny_recipe, write_recipe as write

    corpus = tmp / "corpus"
    if not corpus.exists():
        make_corpus(corpus)
    r = tiny_recipe(corpus, tmp / "cache", tmp / name, train={"max_steps": steps, "micro_batch_size": 2},
                    parallel={"engine": engine, "precision": "fp32", "nproc": 2},
                    checkpoint={"every_steps": 2, "keep_last": 2, "at_end": True})
    return write(tmp / f"{name}.yaml", r)


def launch(recipe: Path, kill_at: str | None, kill_after_s: float | None, timeout: float = 600,
           job_kill_at: str | None = None) -> tuple[int, str]:
    """Run ``recipe``; one rank dies at ``kill_at``, or the whole job after ``kill_after_s`` or
    once a rank has paused at ``job_kill_at`` (``SHARDFORGE_PAUSE_AT``)."""
    env = {"SHARDFORGE_KILL_AT": kill_at} if kill_at else {}
    cue = recipe.with_suffix(".paused")
    if job_kill_at:
        cue.unlink(missing_ok=True)
        env = {"SHARDFORGE_PAUSE_AT": job_kill_at, "SHARDFORGE_PAUSE_FILE": str(cue)}
    proc = subprocess.Popen([sys.executable, "-m", "launch", "run", str(recipe)], cwd=REPO, env=_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if job_kill_at:
        import threading

        def kill_when_paused():
            while proc.poll() is None:
                if cue.exists():
                    _kill_tree(proc.pid)
                    return
                time.sleep(0.02)
        threading.Thread(target=kill_when_paused, daemon=True).start()
    if kill_after_s is not None:
        try:
            out, _ = proc.communicate(timeout=kill_after_s)
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def final_weights(run_dir: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    from launch.export import export

    export(run_dir, out)
    return load_file(str(out / "model.safetensors"))


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def chaos_run(tmp: Path, engine: str, name: str, kills_left: int, steps: int, straight_s: float,
              rng: random.Random, log, plan: list[str] | None = None) -> tuple[int, list]:
    """Launch ``name`` again and again, killing it, until it completes; return (kills, events)."""
    from train.checkpoint.files import latest_valid

    recipe = write_recipe(tmp, name, engine, steps)
    run_dir = tmp / name
    done, events = 0, []
    while True:
        latest = latest_valid(run_dir / "checkpoints")
        start_step = int(latest.name.split("-")[1]) if latest else 0
        kill_at, delay, job_at = None, None, None
        if plan and done < len(plan):
            if plan[done].startswith("job:"):
                delay = float(plan[done][4:]) * straight_s
            elif plan[done].startswith("job@"):
                job_at = plan[done][4:]
            else:
                kill_at = plan[done]
        elif plan is None and done < kills_left and start_step < steps:  # at the last step, only the resume is left
            if rng.random() < 0.25:
                delay = rng.uniform(0.3, 0.95) * straight_s  # the whole job, at a random moment
            else:
                point = rng.choice(POINTS)
                saves = [s for s in range(start_step + 1, steps + 1) if s % 2 == 0 or s == steps]
                if point == "prune":  # keep_last=2: from the third save on, a save prunes
                    saves = [s for s in saves if s >= 6]
                if point in ("write", "rename", "manifest", "prune") and not saves:
                    point = "optimizer"
                step = rng.choice(saves) if point in ("write", "rename", "manifest", "prune") \
                    else rng.randint(start_step + 1, steps)
                rank = 0 if point in ("rename", "manifest", "prune") else rng.randint(0, 1)  # rank 0's jobs
                kill_at = f"{point}:{step}:{rank}"
        code, out = launch(recipe, kill_at, delay, job_kill_at=job_at)
        resumed = re.search(r"resumed from (\S+) at step (\d+)", out)
        got_far = resumed is not None or (delay is None and job_at is None)  # a job kill may land before the resume
        if latest is not None and got_far and (resumed is None or Path(resumed.group(1)).name != latest.name):
            raise SystemExit(f"kill harness: {engine} did not resume from {latest}:\n{out[-3000:]}")
        what = kill_at or (f"whole job after {delay:.1f}s" if delay else f"whole job at {job_at}" if job_at
                           else "no kill")
        log(f"{name}: launch from step {start_step} with {what}: exit {code}")
        events.append({"from_step": start_step, "kill": what, "exit": code})
        if code == 0:
            return done, events
        done += 1
        if done > kills_left + 20:
            raise SystemExit(f"kill harness: {engine} never completed after {done} kills")


def trial(tmp: Path, engine: str, kills: int, steps: int, rng: random.Random, log,
          plan: list[str] | None = None) -> dict:
    """One uninterrupted run, then chaos runs of the same recipe until ``kills`` kills landed
    (``plan``: these kills, in order)."""
    straight = write_recipe(tmp, f"straight-{engine}", engine, steps)
    t0 = time.time()
    code, out = launch(straight, None, None)
    straight_s = time.time() - t0
    if code != 0:
        raise SystemExit(f"kill harness: the uninterrupted {engine} run failed:\n{out[-3000:]}")
    ref_losses = losses(tmp / f"straight-{engine}")
    ref_weights = final_weights(tmp / f"straight-{engine}", tmp / f"export-straight-{engine}")
    done, runs, equal = 0, [], True
    while done < kills:
        name = f"chaos-{engine}-{len(runs)}"
        landed, events = chaos_run(tmp, engine, name, kills - done, steps, straight_s, rng, log,
                                   plan[done:] if plan is not None else None)
        weights = final_weights(tmp / name, tmp / f"export-{name}")
        same = losses(tmp / name) == ref_losses and weights.keys() == ref_weights.keys() and \
            all((weights[k] == ref_weights[k]).all() for k in weights)
        log(f"{name}: {landed} kills; bit-identical to the uninterrupted run: {same}")
        runs.append({"kills": landed, "events": events, "bit_identical": bool(same)})
        done, equal = done + landed, equal and same
        if len(runs) > kills + 5:
            raise SystemExit(f"kill harness: {engine}: kills keep missing ({done} of {kills} landed)")
    return {"engine": engine, "kills": done, "runs": runs, "losses_equal": equal, "weights_equal": equal}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kill_harness", description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="kills in all, spread over the engines")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan", help="fixed kills for every engine, in order: POINT:STEP:RANK or job:F, "
                                       "comma-separated (replaces --kills and the random draws)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kills.json"))
    args = parser.parse_args(argv)
    # its own lines only: the checkpoint searches it makes after each kill skip torn checkpoints by design
    logging.getLogger("shardforge").setLevel(logging.ERROR)
    engines = args.engines.split(",")
    if set(engines) - set(ENGINES):
        parser.error(f"--engines: unknown {sorted(set(engines) - set(ENGINES))}; choose from {','.join(ENGINES)}")
    plan = args.plan.split(",") if args.plan else None
    for item in plan or []:
        point, *rest = item.split(":")
        point = point.removeprefix("job@")
        ok = (point == "job" and len(rest) == 1 and re.fullmatch(r"0?\.\d+|1(\.0*)?", rest[0])) or \
             (point in POINTS and len(rest) == 2 and all(x.isdigit() for x in rest) and int(rest[1]) < 2)
        if not ok:
            parser.error(f"--plan: {item!r} is not POINT:STEP:RANK (POINT in {','.join(POINTS)}, RANK 0 or 1), "
                         f"job@POINT:STEP:RANK or job:F (0 < F <= 1)")
    rng = random.Random(args.seed)
    per_engine = [len(plan)] * len(engines) if plan else \
        [args.kills // len(engines) + (i < args.kills % len(engines)) for i in range(len(engines))]
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="shardforge-kills-") as tmp_name:
        for engine, kills in zip(engines, per_engine):
            results.append(trial(Path(tmp_name), engine, kills, args.steps, rng, lambda m: print(m, flush=True),
                                 plan))
    ok = all(r["losses_equal"] and r["weights_equal"] for r in results)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seed": args.seed, "steps": args.steps,
               "kills": sum(r["kills"] for r in results), "minutes": round((time.time() - started) / 60, 1),
               "all_bit_identical": ok, "engines": results,
               "command": "python -m benchmarks.kill_harness " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    for r in results:
        print(f"{r['engine']:>6}: {r['kills']} kills, losses equal: {r['losses_equal']}, "
              f"weights equal: {r['weights_equal']}")
    print(f"{summary['kills']} kills in {summary['minutes']} min; every run bit-identical: {ok}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
