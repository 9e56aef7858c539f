"""Checkpoints: kill -9 at every point of a save, corrupted files, the commit protocol, safe loading."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.helpers import World, launch_in_process, make_corpus, run_recipe, tiny_recipe, train_losses, write_recipe
from train.checkpoint.files import committed_checkpoints, latest_valid, verify


def recipe(world: World, name: str, **train) -> dict:
    """Six steps, a checkpoint every two (the last two kept and one at the end)."""
    return world.recipe(name, train={"max_steps": 6, **train},
                        checkpoint={"every_steps": 2, "keep_last": 2, "at_end": True})


@pytest.fixture(scope="module")
def straight(world: World) -> list[float]:
    """The training losses of the recipe run once without interruption."""
    r = recipe(world, "straight")
    run_recipe(world.tmp, r)
    return train_losses(Path(r["run"]["dir"]))


def steps_of(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in committed_checkpoints(run_dir / "checkpoints")]


@pytest.mark.parametrize("point,rank,step,expected", [
    ("write", 1, 4, 2), ("rename", 0, 4, 2), ("manifest", 0, 4, 2),
    ("prune", 0, 6, 6)])  # step 6 is the first save that prunes (keep_last=2); step 6 is committed
def test_kill_during_save_keeps_previous_checkpoint(world, straight, point, rank, step, expected):
    r = recipe(world, f"kill-{point}")
    run_dir = Path(r["run"]["dir"])
    path = write_recipe(world.tmp / f"kill-{point}.yaml", r)
    killed = launch_in_process("run", str(path), env={"SHARDFORGE_KILL_AT": f"{point}:{step}:{rank}"})
    assert killed.returncode != 0
    latest = latest_valid(run_dir / "checkpoints")
    assert latest is not None and latest.name == f"step-{expected:06d}"
    resumed = launch_in_process("run", str(path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {latest}" in resumed.stdout
    assert train_losses(run_dir) == straight
    assert steps_of(run_dir)[-2:] == [4, 6]


def test_corrupted_checkpoint_falls_back_to_previous(world, straight):
    r = recipe(world, "corrupt", stop_after=4)
    run_dir = Path(r["run"]["dir"])
    run_recipe(world.tmp, r, expect=75)
    assert steps_of(run_dir) == [2, 4]
    victim = run_dir / "checkpoints" / "step-000004" / "rank-00001.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))  # same size, altered bytes
    problem = verify(victim.parent)
    assert problem and "rank-00001.pt does not match its xxh3_128 digest" in problem
    out = run_recipe(world.tmp, r, "train.stop_after=0")
    lines = [line for line in out.stdout.splitlines() if "skipping" in line]
    assert len(lines) == 1 and "step-000004" in lines[0] and "xxh3_128" in lines[0]
    assert "resumed from" in out.stdout and "step-000002" in out.stdout
    assert train_losses(run_dir) == straight
    # every checkpoint corrupt: refused (exit 2), not a silent restart that overwrites the step directories
    saved = committed_checkpoints(run_dir / "checkpoints")
    for ckpt in saved:
        victim = sorted(ckpt.rglob("*.pt"))[0]
        victim.write_bytes(victim.read_bytes()[:-10])
    out = run_recipe(world.tmp, r, "train.stop_after=0", "train.max_steps=8", expect=2)
    assert f"none of the {len(saved)} committed checkpoints" in out.stdout + out.stderr
    assert committed_checkpoints(run_dir / "checkpoints") == saved and train_losses(run_dir) == straight


def test_a_refused_resume_leaves_the_run_as_it_was(world):
    r = recipe(world, "changed", stop_after=2)
    run_dir = Path(r["run"]["dir"])
    run_recipe(world.tmp, r, expect=75)
    before = (run_dir / "recipe.yaml").read_text()
    # a changed batch size or seed: refused by the launcher, before it writes anything
    out = run_recipe(world.tmp, r, "train.stop_after=0", "train.global_batch_size=16", "run.seed=9", expect=2)
    text = out.stdout + out.stderr
    assert "train.global_batch_size: 16 here but 8 in" in text and "run.seed: 9 here but" in text, text[-2000:]
    assert "Traceback" not in text and (run_dir / "recipe.yaml").read_text() == before
    # changed data (another validation split, so the next batch differs): refused by the ranks, and
    # the launcher puts the run's recipe back
    out = run_recipe(world.tmp, r, "train.stop_after=0", "data.val_fraction=0.2", expect=2)
    text = out.stdout + out.stderr
    assert "changed: data (sources, tokenizer or seq_len)" in text and "Traceback" not in text
    assert text.strip().splitlines()[-1].endswith("(checkpoint.resume=never) (exit 2)"), text[-2000:]
    assert (run_dir / "recipe.yaml").read_text() == before, "the refused launch's recipe.yaml was not undone"
    assert run_recipe(world.tmp, r, "train.stop_after=0").returncode == 0  # still resumable as it was


def test_every_minutes_saves_on_wall_clock(world, straight):
    """checkpoint.every_minutes=1e-5 (0.6 ms): every step is due. The ranks agree on a due save one
    step later, and a flag raised before a save does not trigger a second save right after it, so
    the saves land on every other step, the same on every machine."""
    r = recipe(world, "timed")
    r["checkpoint"].update({"every_steps": 0, "every_minutes": 1e-5, "keep_last": 10, "at_end": False})
    out = run_recipe(world.tmp, r)
    ckpts = committed_checkpoints(Path(r["run"]["dir"]) / "checkpoints")
    reasons = [json.loads((c / "manifest.json").read_text())["reason"] for c in ckpts]
    assert [c.name for c in ckpts] == ["step-000002", "step-000004", "step-000006"], out.stdout[-2000:]
    assert reasons == ["periodic", "periodic", "end"]  # the last step's due save is named "end"
    assert train_losses(Path(r["run"]["dir"])) == straight, "saving must not change training"


def test_manifest_is_the_commit_marker(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step-000010"
    ckpt.mkdir(parents=True)
    (ckpt / "a.bin").write_bytes(b"x")
    assert committed_checkpoints(tmp_path / "checkpoints") == []
    assert "no manifest.json" in verify(ckpt)
    import hashlib

    import xxhash

    (ckpt / "rank-00000.pt").write_bytes(b"r")
    manifest = {"step": 10, "world_size": 1, "digest": "xxh3_128", "files": {
        "a.bin": xxhash.xxh3_128(b"x").hexdigest(), "rank-00000.pt": xxhash.xxh3_128(b"r").hexdigest()}}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert latest_valid(tmp_path / "checkpoints") == ckpt
    (ckpt / "a.bin").write_bytes(b"y")  # altered, same size: the digest, not the length, finds it
    assert "a.bin does not match its xxh3_128 digest" in verify(ckpt)
    assert latest_valid(tmp_path / "checkpoints") is None
    # a manifest from before the "digest" field holds sha256 digests, and is still verified with them
    manifest = {"step": 10, "world_size": 1, "files": {"a.bin": hashlib.sha256(b"y").hexdigest(),
                                                       "rank-00000.pt": hashlib.sha256(b"r").hexdigest()}}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert verify(ckpt) is None
    (ckpt / "rank-00000.pt").write_bytes(b"s")
    assert "rank-00000.pt does not match its sha256 digest" in verify(ckpt)
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "digest": "md5"}))
    assert "manifest.json is unreadable" in verify(ckpt)


def test_a_sealed_manifest_refuses_its_own_edits_and_checks_sizes_before_hashing(tmp_path, monkeypatch):
    """Format 2: the manifest carries its own digest and each file's size. An edit that is not
    resealed is named as such; a file of the wrong size is refused without reading it (before, a
    manifest naming a huge file was hashed to the end)."""
    import xxhash

    from train.checkpoint import files as checkpoint_files
    from train.checkpoint.files import sealed_manifest

    ckpt = tmp_path / "step-000010"
    ckpt.mkdir()
    (ckpt / "rank-00000.pt").write_bytes(b"rank")
    record = {"step": 10, "world_size": 1, "digest": "xxh3_128",
              "files": {"rank-00000.pt": xxhash.xxh3_128(b"rank").hexdigest()}}
    sealed = sealed_manifest(record, ckpt)
    assert sealed["sizes"] == {"rank-00000.pt": 4} and sealed["format"] == 2
    (ckpt / "manifest.json").write_text(json.dumps(sealed, indent=1))
    assert verify(ckpt) is None
    (ckpt / "manifest.json").write_text(json.dumps({**sealed, "step": 11}))
    assert verify(ckpt).endswith("manifest.json does not match its own digest (edited or damaged after the save)")
    (ckpt / "manifest.json").write_text(json.dumps({k: v for k, v in sealed.items() if k != "format"}))
    assert "does not match its own digest" in verify(ckpt), "dropping the format field does not unseal it"
    (ckpt / "manifest.json").write_text(json.dumps(sealed_manifest({**sealed, "sizes": {}}, ckpt)))
    assert verify(ckpt) is None  # sealing recomputes the sizes
    (ckpt / "manifest.json").write_text(json.dumps({**sealed, "sizes": {}, "manifest_digest": None}))
    assert "does not match its own digest" in verify(ckpt)
    (ckpt / "manifest.json").write_text(json.dumps(sealed))
    (ckpt / "rank-00000.pt").write_bytes(b"rank" * 1000)
    monkeypatch.setattr(checkpoint_files, "file_digests", lambda *a, **k: pytest.fail("hashed a wrong-size file"))
    assert verify(ckpt).endswith("rank-00000.pt holds 4,000 bytes, manifest.json says 4 (truncated or altered)")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/shardforge-pwned",))


def test_malicious_pickle_in_checkpoint_is_refused(world, tmp_path):
    """A planted pickle that would run code is refused by weights_only loading."""
    r = recipe(world, "pickle", stop_after=2)
    run_dir = Path(r["run"]["dir"])
    run_recipe(world.tmp, r, expect=75)
    victim = run_dir / "checkpoints" / "step-000002" / "rank-00000.pt"
    with open(victim, "wb") as f:
        pickle.dump({"counters": Exploit()}, f)
    Path("/tmp/shardforge-pwned").unlink(missing_ok=True)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(victim, weights_only=True)
    # and through the trainer: resume=PATH forces this checkpoint; the checksum refuses it first,
    # and even with the manifest rewritten, weights_only refuses to unpickle
    manifest_path = victim.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    from train.checkpoint.files import file_digest, sealed_manifest

    manifest["files"]["rank-00000.pt"] = file_digest(victim)
    manifest_path.write_text(json.dumps(sealed_manifest(manifest, victim.parent)))  # resealed, sizes too
    out = run_recipe(world.tmp, r, "train.stop_after=0", f"checkpoint.resume={victim.parent}", expect=2)
    assert "refused: a file holds objects that would run code" in out.stdout + out.stderr
    assert not Path("/tmp/shardforge-pwned").exists()


def test_async_save_commits_in_the_background_and_resumes_bit_identically(tmp_path):
    """FSDP2 + checkpoint.async_save: periodic saves are written by DCP's background thread and
    committed at a later step boundary; resuming from one reproduces the run exactly, which also
    proves the state was copied when the save began, not read later while training moved on."""
    corpus = make_corpus(tmp_path / "corpus")
    r = tiny_recipe(corpus, tmp_path / "cache", tmp_path / "run", parallel={"engine": "fsdp", "precision": "fp32",
                                                                             "nproc": 2},
                    checkpoint={"every_steps": 2, "async_save": True, "at_end": True, "keep_last": 3})
    proc = run_recipe(tmp_path, r)
    assert "checkpoint: writing step-000004 in the background" in proc.stdout
    assert "checkpoint: committed step-000004 (written in the background" in proc.stdout
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in committed_checkpoints(root)] == ["step-000002", "step-000004", "step-000006"]
    assert all(verify(p) is None for p in committed_checkpoints(root))
    straight = train_losses(tmp_path / "run")
    again = run_recipe(tmp_path, r, f"checkpoint.resume={root / 'step-000004'}")
    assert "resumed from" in again.stdout and "step-000004" in again.stdout
    assert train_losses(tmp_path / "run") == straight


def test_dcp_writer_hashes_every_file_as_it_writes(tmp_path, monkeypatch):
    """Hash-on-write: the digests the writer records equal the xxh3-128 of the files read back, for every
    file DCP writes (data files from several writer threads and .metadata, renamed from .tmp)."""
    import torch.distributed.checkpoint as dcp

    from train.checkpoint.files import HashingStream, dcp_writer, io_threads, file_digest

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert io_threads() == 2
    state = {"a": torch.randn(300, 70), "b": torch.arange(1000), "c": {"d": torch.ones(5)}, "e": 3}
    digests: dict = {}
    dcp.save(state, storage_writer=dcp_writer(tmp_path / "dcp", digests), no_dist=True)
    files = sorted(p for p in (tmp_path / "dcp").iterdir())
    assert len([p for p in files if p.suffix == ".distcp"]) == 2  # two writer threads, two files
    assert digests == {str(p.absolute()): file_digest(p) for p in files}
    back = {"a": torch.zeros(300, 70), "b": torch.zeros(1000, dtype=torch.long), "c": {"d": torch.zeros(5)}, "e": 0}
    dcp.load(back, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert torch.equal(back["a"], state["a"]) and back["e"] == 3
    with open(tmp_path / "x", "wb") as raw:  # a writer that seeks back voids the running digest
        stream = HashingStream(raw)
        stream.write(b"abc")
        stream.seek(0)
        assert not stream.sequential


def test_each_rank_hashes_the_files_it_wrote():
    """Checksum work goes to the rank that wrote (and at the same world size reads) each shard;
    shared files are dealt out in turn; every file is covered exactly once, on any world size."""
    from train.checkpoint.files import share_of

    files = ["dcp/.metadata", "dcp/__0_0.distcp", "dcp/__0_1.distcp", "dcp/__1_0.distcp", "dcp/__1_1.distcp",
             "engine_extra.pt", "rank-00000.pt", "rank-00001.pt",
             "deepspeed/state/mp_rank_00_model_states.pt",
             "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert share_of(files, 1, 2) == ["dcp/__1_0.distcp", "dcp/__1_1.distcp",
                                     "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                     "rank-00001.pt", "deepspeed/state/mp_rank_00_model_states.pt"]
    for world in (1, 2, 3):
        shares = [share_of(files, r, world) for r in range(world)]
        assert sorted(f for share in shares for f in share) == sorted(files)


def test_prune_uncommits_at_once_and_deletes_in_the_background(tmp_path):
    """After a save returns, pruned checkpoints are already uncommitted; their files, and the
    leftovers of crashed saves (a .tmp directory, a step directory that never got its manifest),
    are deleted by rank 0's prune thread. One process, a real gloo group, a one-file engine."""
    import torch.distributed as dist

    from train.checkpoint.manager import Checkpointer
    from train.checkpoint.state import Counters

    class OneFileEngine:
        def save(self, path: Path, background: bool = False, digests: dict | None = None):
            (path / "weights.bin").write_bytes(os.urandom(1 << 16))

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        root = tmp_path / "checkpoints"
        ckpt = Checkpointer(root, OneFileEngine(), {"counters": Counters()}, 0, 1, {"engine": "test"})
        for step in (1, 2):
            ckpt.save(step, keep_last=1, keep_every=0, extra_manifest={})
        (root / ".tmp-step-000007").mkdir()  # a crashed save
        (root / "step-000005").mkdir()  # renamed, then killed before its manifest
        ckpt.save(3, keep_last=1, keep_every=0, extra_manifest={})
        assert [p.name for p in committed_checkpoints(root)] == ["step-000003"]
        ckpt._join_deleter()
        assert sorted(p.name for p in root.iterdir()) == ["step-000003"]
        assert verify(root / "step-000003") is None
        # keep_every=4 keeps every fourth step besides the last keep_last=2
        for step in range(4, 10):
            ckpt.save(step, keep_last=2, keep_every=4, extra_manifest={})
        assert [p.name for p in committed_checkpoints(root)] == ["step-000004", "step-000008", "step-000009"]
    finally:
        dist.destroy_process_group()


def test_no_checkpoint_holds_non_finite_weights():
    """Saver checks ``engine.weights_finite()`` (a collective over every rank's shards) before each save."""
    import torch.distributed as dist

    from train.engines.torch_engines import DDPEngine
    from train.config.recipe import recipe_from_dict, resolve_defaults

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        recipe = resolve_defaults(recipe_from_dict({"parallel": {"nproc": 1, "precision": "fp32"}}))
        engine = DDPEngine(recipe, torch.nn.Linear(4, 4), torch.device("cpu"), accum=1)
        assert engine.weights_finite()
        with torch.no_grad():
            engine.model.weight[2, 1] = float("inf")
        assert not engine.weights_finite()
    finally:
        dist.destroy_process_group()
