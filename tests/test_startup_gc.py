"""The rank program imports with Python's cyclic collector off and turns it back on, with the
imported objects frozen, before it prepares data or builds a model (train/startup_gc.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO, make_corpus, tiny_recipe, write_recipe

# The real `python -m train RUN_DIR` in one process, cut short at its first fault point (rank 0,
# before the data is prepared): a gc callback notes every collection that runs between the start of
# torch's import and the freeze.
PROBE = """
import gc, json, os, runpy, sys
from train import faults

early = []
gc.callbacks.append(lambda phase, info: phase == "start" and gc.get_freeze_count() == 0 and "torch" in sys.modules
                    and early.append("transformers" in sys.modules))

def first_point(name, step, rank):
    print(json.dumps({"point": name, "enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
                      "early": early,
                      "imported": [m for m in ("torch", "transformers.configuration_utils") if m in sys.modules]}))
    sys.stdout.flush()
    os._exit(0)

faults.fault_point = first_point
sys.argv = ["train", sys.argv[1]]
runpy.run_module("train", run_name="__main__")
"""


def test_collector_is_off_for_the_imports_and_on_before_anything_is_built(tmp_path):
    from train.engines.config import engine_configs
    from launch.local import write_run_dir
    from train.config.loading import load_recipe

    recipe = tiny_recipe(make_corpus(tmp_path / "corpus", files=2), tmp_path / "cache", tmp_path / "run",
                         parallel={"engine": "ddp", "nproc": 1})
    resolved = load_recipe(str(write_recipe(tmp_path / "run.yaml", recipe)), local_gpus=0, check_model=False)
    run_dir = write_run_dir(resolved, engine_configs(resolved))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(run_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["point"] == "prepare"
    assert seen["imported"] == ["torch", "transformers.configuration_utils"], seen
    assert seen["early"] == [], f"collections ran during the imports: {seen['early'][:5]}"
    assert seen["enabled"] and seen["frozen"] > 100_000, seen  # torch + transformers: about 550,000 objects
