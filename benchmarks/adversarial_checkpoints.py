"""The tampered-checkpoint cases of ``python -m benchmarks.adversarial``: planted pickles, edited and
resealed manifests, resumes with a changed recipe, another engine or another model's checkpoint."""

from __future__ import annotations

import json

from benchmarks.adversarial import Case, World


def checkpoint_cases() -> list[Case]:
    def tampered(engine: str, name: str, rel: str, torch_format: bool, command: str) -> Case:
        def args(w: World) -> list[str]:
            path = w.copy_run(engine, name)
            w.plant(name, rel, torch_format)
            return ["run", str(path), "train.stop_after=0"] if command == "run" else \
                ["export", str(w.tmp / name), str(w.tmp / f"{name}-export")]
        return Case(f"{command}: planted pickle in {engine} {rel.split('/')[-1]}", args)

    def changed(name: str, *overrides: str) -> Case:
        def args(w: World) -> list[str]:
            return ["run", str(w.copy_run("ddp", name)), "train.stop_after=0", *overrides]
        return Case(f"resume with {' '.join(overrides)}", args, guarded=[name])

    def empty_manifest(w: World) -> list[str]:
        path = w.copy_run("ddp", "empty-manifest")
        m = w.tmp / "empty-manifest" / "checkpoints" / "step-000002" / "manifest.json"
        from train.checkpoint.files import sealed_manifest

        m.write_text(json.dumps(sealed_manifest({**json.loads(m.read_text()), "files": {}}, m.parent)))
        return ["run", str(path), "train.stop_after=0"]

    def edited_manifest(name: str, edit, reseal: bool = True) -> Case:
        """Export from a copy whose step-2 manifest was edited (and resealed, as a determined
        editor would: the seal guards against mistakes and damage, the checks behind it against the rest)."""
        def args(w: World) -> list[str]:
            from train.checkpoint.files import sealed_manifest

            w.copy_run("ddp", name)
            ckpt = w.tmp / name / "checkpoints" / "step-000002"
            (w.tmp / name / "victim.txt").write_text("someone else's")
            m = json.loads((ckpt / "manifest.json").read_text())
            edit(m)
            (ckpt / "manifest.json").write_text(json.dumps(sealed_manifest(m, ckpt) if reseal else m))
            return ["export", str(w.tmp / name), str(w.tmp / f"{name}-export")]
        return Case(f"export: manifest {name.removeprefix('manifest-')}", args, guarded=[], timeout_s=120)

    def other_engine(w: World) -> list[str]:
        return ["run", str(w.copy_run("zero2", "zero2-as-ddp")), "train.stop_after=0", "parallel.engine=ddp"]

    def other_model(w: World) -> list[str]:
        ckpt = w.tmp / "other-model-source" / "checkpoints" / "step-000002"
        if not ckpt.exists():
            w.copy_run("ddp", "other-model-source")
        path = w.recipe("other-model", model={"config": {"model_type": "llama", "hidden_size": 48,
                                                         "intermediate_size": 96, "num_hidden_layers": 2,
                                                         "num_attention_heads": 2, "num_key_value_heads": 2,
                                                         "max_position_embeddings": 64}},
                        checkpoint={"resume": str(ckpt)})
        return ["run", str(path)]

    def linked_metrics(w: World) -> list[str]:
        path = w.copy_run("ddp", "linked-metrics")
        metrics = w.tmp / "linked-metrics" / "metrics.jsonl"
        (w.tmp / "notes").mkdir(exist_ok=True)
        (w.tmp / "notes" / "not-json.txt").write_text("a user's notes, not JSON\n")
        metrics.unlink()
        metrics.symlink_to(w.tmp / "notes" / "not-json.txt")
        return ["run", str(path), "train.stop_after=0"]

    def all_corrupt(w: World) -> list[str]:
        path = w.copy_run("ddp", "all-corrupt")
        victim = w.tmp / "all-corrupt" / "checkpoints" / "step-000002" / "rank-00000.pt"
        victim.write_bytes(victim.read_bytes()[:-10])
        return ["run", str(path), "train.stop_after=0"]

    cases = []
    for command in ("run", "export"):
        cases += [tampered("ddp", f"{command}-dcp-meta", "dcp/.metadata", False, command),
                  tampered("zero2", f"{command}-ds-optim",
                           "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", True, command),
                  tampered("zero2", f"{command}-ds-model", "deepspeed/state/mp_rank_00_model_states.pt", True,
                           command)]
    cases += [Case("resume: manifest with files {}", empty_manifest, guarded=["empty-manifest"]),
              Case("resume: every checkpoint corrupt", all_corrupt, guarded=["all-corrupt"]),
              edited_manifest("manifest-world_size 10^12", lambda m: m.update(world_size=10**12)),
              edited_manifest("manifest-listing /dev/zero", lambda m: m["files"].update({"/dev/zero": "0" * 32})),
              edited_manifest("manifest-listing ../../victim.txt",
                              lambda m: m["files"].update({"../../victim.txt": "0" * 32})),
              edited_manifest("manifest-step edited, not resealed", lambda m: m.update(step=3), reseal=False),
              Case("resume: a zero2 checkpoint with parallel.engine=ddp", other_engine, guarded=["zero2-as-ddp"]),
              Case("run: checkpoint.resume of another model's checkpoint", other_model,
                   guarded=["other-model-source"]),
              Case("resume: metrics.jsonl a link to a non-JSON file (replaced, the file untouched)", linked_metrics,
                   untouched=["notes"], succeeds=True),
              changed("changed-seed", "run.seed=9"), changed("changed-batch", "train.global_batch_size=16"),
              changed("changed-model", "model.config.hidden_size=96"),
              changed("changed-data", "data.val_fraction=0.2")]
    return cases
