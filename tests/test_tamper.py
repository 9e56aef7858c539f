"""Hostile checkpoints (issue 16.1): someone who can write a checkpoint directory and rewrite its
manifest must not get code run by ``shardforge run`` (resume) or ``shardforge export``. Each case
plants a pickle that would create a file, fixes the manifest's digest, and expects exit 2 with
one line, and no file created."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import make_corpus, run_recipe, shardforge, tiny_recipe
from train.checkpoint_files import MANIFEST, file_digest


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A ddp and a zero2 run, each stopped with a checkpoint at step 2 (copied per test)."""
    tmp = tmp_path_factory.mktemp("tamper")
    corpus = make_corpus(tmp / "corpus")
    runs = {}
    for engine in ("ddp", "zero2"):
        r = tiny_recipe(corpus, tmp / "cache", tmp / engine, train={"max_steps": 4, "stop_after": 2},
                        parallel={"engine": engine, "precision": "fp32", "nproc": 2})
        run_recipe(tmp, r, expect=75)
        runs[engine] = r
    return tmp, runs


def _copy(stopped, engine: str, name: str) -> tuple[dict, Path]:
    tmp, runs = stopped
    r = json.loads(json.dumps(runs[engine]))
    r["run"]["dir"] = str(tmp / name)
    shutil.copytree(runs[engine]["run"]["dir"], r["run"]["dir"])
    return r, Path(r["run"]["dir"]) / "checkpoints" / "step-000002"


def _plant(ckpt: Path, rel: str, payload, torch_format: bool) -> None:
    import pickle

    with open(ckpt / rel, "wb") as f:
        torch.save(payload, f) if torch_format else pickle.dump(payload, f)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][rel] = file_digest(ckpt / rel)  # the attacker rewrites the manifest too
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("engine, rel, torch_format", [
    ("ddp", "dcp/.metadata", False),                          # DCP reads it with pickle
    ("zero2", "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", True),  # DeepSpeed: weights_only=False
    ("zero2", "deepspeed/state/mp_rank_00_model_states.pt", True),
])
def test_a_planted_pickle_runs_no_code_on_resume_or_export(stopped, tmp_path, engine, rel, torch_format):
    r, ckpt = _copy(stopped, engine, f"{engine}-{rel.split('/')[-1]}")
    marker = tmp_path / "pwned"
    _plant(ckpt, rel, Exploit(marker), torch_format)
    out = run_recipe(stopped[0], r, "train.stop_after=0", expect=2)
    text = out.stdout + out.stderr
    assert "refused: a file holds objects that would run code" in text and "Traceback" not in text, text[-3000:]
    assert not marker.exists(), "the checkpoint ran code on resume"
    exported = shardforge("export", r["run"]["dir"], str(tmp_path / "export"))
    assert exported.returncode == 2 and "refused" in exported.stderr, exported.stdout + exported.stderr
    assert "Traceback" not in exported.stderr and not marker.exists(), exported.stderr
    assert exported.stderr.strip().splitlines()[-1].startswith("shardforge: error:"), exported.stderr


def test_a_manifest_must_list_every_file_the_loaders_open(stopped, tmp_path):
    r, ckpt = _copy(stopped, "ddp", "empty-manifest")
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = {}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    out = run_recipe(stopped[0], r, "train.stop_after=0", f"checkpoint.resume={ckpt}", expect=2)
    assert "is not listed in manifest.json" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
    exported = shardforge("export", r["run"]["dir"], str(tmp_path / "export"), "--step", "2")
    assert exported.returncode == 2 and "is not listed in manifest.json" in exported.stderr, exported.stderr
