"""Hostile checkpoints (issue 16.1): someone who can write a checkpoint directory and rewrite its
manifest must not get code run by ``shardforge run`` (resume) or ``shardforge export``. Each case
plants a pickle that would create a file, fixes the manifest's digest, and expects exit 2 with
one line, and no file created."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import launch_in_process, make_corpus, run_recipe, tiny_recipe
from train.checkpoint.files import MANIFEST, file_digest, sealed_manifest


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
    manifest["files"][rel] = file_digest(ckpt / rel)  # the attacker rewrites and reseals the manifest too
    (ckpt / MANIFEST).write_text(json.dumps(sealed_manifest(manifest, ckpt)))


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
    exported = launch_in_process("export", r["run"]["dir"], str(tmp_path / "export"))
    assert exported.returncode == 2 and "refused" in exported.stderr, exported.stdout + exported.stderr
    assert "Traceback" not in exported.stderr and not marker.exists(), exported.stderr
    assert exported.stderr.strip().splitlines()[-1].startswith("shardforge: error:"), exported.stderr


def test_a_manifest_must_list_every_file_the_loaders_open(stopped, tmp_path):
    r, ckpt = _copy(stopped, "ddp", "empty-manifest")
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = {}
    (ckpt / MANIFEST).write_text(json.dumps(sealed_manifest(manifest, ckpt)))
    out = run_recipe(stopped[0], r, "train.stop_after=0", f"checkpoint.resume={ckpt}", expect=2)
    assert "is not listed in manifest.json" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
    exported = launch_in_process("export", r["run"]["dir"], str(tmp_path / "export"), "--step", "2")
    assert exported.returncode == 2 and "is not listed in manifest.json" in exported.stderr, exported.stderr


@pytest.mark.parametrize("edit, fragment", [
    (lambda m, ckpt: m.update(world_size=10**12), "manifest.json gives world_size 1000000000000, not a count of ranks"),
    (lambda m, ckpt: m.update(world_size="2"), "manifest.json gives world_size '2', not a count of ranks"),
    (lambda m, ckpt: m["files"].update({"/dev/zero": "x"}), "manifest.json lists '/dev/zero', a path outside"),
    (lambda m, ckpt: m["files"].update({"../../victim.txt": file_digest(ckpt.parents[1] / "victim.txt")}),
     "manifest.json lists '../../victim.txt', a path outside the checkpoint"),
    (lambda m, ckpt: (m["files"].update({"zero": "x"}), (ckpt / "zero").symlink_to("/dev/zero")),
     "zero is not a regular file of the checkpoint (a link, device or folder); never read"),
])
def test_a_manifest_names_only_files_inside_its_checkpoint_and_a_real_world_size(stopped, tmp_path, edit, fragment):
    """Before, export built 10^12 rank names, hashed /dev/zero forever, or read ../../victim.txt."""
    r, ckpt = _copy(stopped, "ddp", f"edited-{tmp_path.name}")
    (ckpt.parents[1] / "victim.txt").write_text("someone else's")
    manifest = json.loads((ckpt / MANIFEST).read_text())
    edit(manifest, ckpt)
    (ckpt / MANIFEST).write_text(json.dumps(sealed_manifest(manifest, ckpt)))  # resealed by the editor
    from launch.export import ExportError, export

    with pytest.raises(ExportError) as err:
        export(Path(r["run"]["dir"]), tmp_path / "out", step=2)
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_dcp_metadata_declaring_more_than_its_files_hold_is_refused_before_loading(stopped, tmp_path):
    """A .metadata declaring a 2^40-element tensor gave a raw "Size mismatch" (export) and a rank
    traceback (resume); now verification names it, so resume falls back and export refuses."""
    import pickle

    r, ckpt = _copy(stopped, "ddp", "huge-tensor")
    with open(ckpt / "dcp" / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # the test's own file
    name, meta = next((k, v) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size"))
    meta.size = torch.Size([2**40])
    with open(ckpt / "dcp" / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"]["dcp/.metadata"] = file_digest(ckpt / "dcp" / ".metadata")  # the manifest rewritten too
    (ckpt / MANIFEST).write_text(json.dumps(sealed_manifest(manifest, ckpt)))
    fragment = f"dcp/.metadata declares {name!r} of shape ({2**40},) ({4 * 2**40:,} bytes), more than the checkpoint's"
    exported = launch_in_process("export", r["run"]["dir"], str(tmp_path / "export"), "--step", "2")
    assert exported.returncode == 2 and fragment in exported.stderr, exported.stderr
    out = run_recipe(stopped[0], r, "train.stop_after=0", expect=2)
    assert "none of the 1 committed checkpoints" in out.stdout + out.stderr and fragment in out.stdout + out.stderr


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_tensor_records_are_read_in_place_and_anything_else_by_the_weights_only_loader(tmp_path, monkeypatch):
    """DCP's tensor records (one ``torch.save`` archive each) are rebuilt by the reader's own small
    unpickler, which knows three names; a record holding anything else goes to torch's weights-only
    loader, so a planted object is refused there and runs nothing."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from train.checkpoint.safe_load import load_tensor_record, safe_reader

    state = {"w": torch.randn(5, 7), "t": torch.randn(3, 4).t(), "view": torch.arange(10)[2:7],
             "empty": torch.zeros(0, 3), "bf16": torch.randn(4, 4, dtype=torch.bfloat16), "scalar": torch.tensor(3.5),
             "mask": torch.ones(2, 3, dtype=torch.bool), "f8": torch.randn(3).to(torch.float8_e4m3fn)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "dcp")), no_dist=True)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    back = {k: torch.full_like(v, 0) if v.dtype != torch.float8_e4m3fn else torch.zeros(3).to(v.dtype)
            for k, v in state.items()}
    dcp.load(back, storage_reader=safe_reader(tmp_path / "dcp"), no_dist=True)
    for key, value in state.items():
        assert torch.equal(back[key].float(), value.float()) and back[key].dtype == value.dtype, key
    assert len(calls) == 1, "only the float8 record (rebuilt by _rebuild_tensor_v3) is left to torch.load"

    marker = tmp_path / "pwned"
    record = io.BytesIO()
    torch.save(Exploit(marker), record)
    with pytest.raises(pickle.UnpicklingError):
        load_tensor_record(bytearray(record.getvalue()))
    assert not marker.exists()


def test_resuming_another_models_checkpoint_names_the_shapes_that_differ(stopped, tmp_path):
    """checkpoint.resume=<a checkpoint of a wider model> gave DCP's "Size mismatch" traceback."""
    r, ckpt = _copy(stopped, "ddp", "other-model-source")
    fresh = json.loads(json.dumps(r))
    fresh["run"]["dir"] = str(tmp_path / "wider")
    fresh["model"]["config"].update(hidden_size=48, intermediate_size=96)
    fresh["checkpoint"]["resume"] = str(ckpt)
    out = run_recipe(stopped[0], fresh, expect=2)
    text = out.stdout + out.stderr
    assert f"resume: {ckpt} holds another model: model.embed_tokens.weight is (448, 32) there, (448, 48) here" \
        in text and "Traceback" not in text, text[-3000:]
