"""LoRA fine-tuning: adapters on a frozen pretrained base under DDP and FSDP2, for SFT (chat),
sequence and token classification. Checkpoints hold only what trains; the base stays bit-unchanged;
both exports (merged, adapter) load the plain way (transformers; transformers + peft) and give the
training model's outputs. Real 2-process CPU runs (gloo) on real Shakespeare passages.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import (assert_stop_and_resume_exact, exported_state, finetune_recipe, launch_in_process,
                           make_finetune_data, make_pretrained, on_pretrained, run_recipe, train_losses)


@pytest.fixture(scope="module")
def ft_data(tmp_path_factory) -> dict[str, Path]:
    return make_finetune_data(tmp_path_factory.mktemp("ftdata"), records=200)


def _trainable_only(run_dir: Path, trainable: int, total: int) -> None:
    """The run's checkpoints hold the trainable parameters (and their optimizer state), not the
    frozen base: their DCP files are a small fraction of the model's fp32 bytes, and the manifest
    names the frozen base's digest."""
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        assert json.loads((ckpt / "manifest.json").read_text())["frozen_base"].startswith("xxh3_128:")
        stored = sum(f.stat().st_size for f in (ckpt / "dcp").iterdir())
        assert stored < 4 * (3 * trainable) + 0.05 * 4 * total, (stored, trainable, total)  # weights + 2 moments


def test_token_classification_fsdp_lora(ft_data, tmp_path):
    """LoRA under FSDP2: base weights bit-unchanged; the merged export gives the training model's logits."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from safetensors.torch import load_file

    from launch.export import build_export_model
    from train.config.loading import read_recipe

    pretrained = make_pretrained(tmp_path / "pretrained", "token_classification")
    run_dir = tmp_path / "ner-lora"
    recipe = finetune_recipe("token_classification", ft_data["ner"], tmp_path / "cache", run_dir,
                             parallel={"engine": "fsdp"}, train={"max_steps": 8, "eval_every": 4},
                             model={"pretrained": str(pretrained), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                             optim={"lr": 2e-2, "warmup_steps": 0})
    recipe["model"].pop("config")
    recipe["data"]["tokenizer"] = {}
    proc = run_recipe(tmp_path, recipe)
    counts = re.search(r"model: ([\d,]+) of ([\d,]+) parameters trainable", proc.stdout)
    _trainable_only(run_dir, *(int(n.replace(",", "")) for n in counts.groups()))
    results = json.loads((run_dir / "test_results.json").read_text())["metrics"]
    assert {"entity_f1", "entity_precision", "entity_recall", "token_accuracy"} <= set(results)

    state = exported_state(run_dir)
    base = load_file(str(pretrained / "model.safetensors"))
    compared = 0
    for key, value in state.items():
        if "lora_" in key or "classifier" in key:
            continue
        name = key.removeprefix("base_model.model.").removeprefix("bert.").replace(".base_layer", "")
        assert torch.equal(value, base[name]), key  # bit-unchanged
        compared += 1
    assert compared == len([k for k in base if not k.startswith("pooler.")])  # token heads have no pooler
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in state.items())

    out = tmp_path / "merged"
    assert launch_in_process("export", str(run_dir), str(out)).returncode == 0
    merged = AutoModelForTokenClassification.from_pretrained(out, dtype=torch.float32).eval()
    training = build_export_model(read_recipe(run_dir), run_dir, AutoTokenizer.from_pretrained(run_dir / "tokenizer"))
    training.load_state_dict(state)
    training.eval()
    ids = torch.tensor([[101, 7592, 2026, 2935, 1010, 2017, 2024, 6659, 102]])
    with torch.no_grad():
        expected, got = training(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()

    adapter = tmp_path / "adapter"
    assert launch_in_process("export", str(run_dir), str(adapter), "--lora", "adapter").returncode == 0
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "model.safetensors").exists()
    # as the README says: peft loads the adapter (and the trained head) on top of model.pretrained
    from peft import PeftModel

    base_model = AutoModelForTokenClassification.from_pretrained(pretrained, dtype=torch.float32,
                                                                 num_labels=merged.config.num_labels)
    loaded = PeftModel.from_pretrained(base_model, str(adapter)).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
    assert_stop_and_resume_exact(tmp_path, recipe, stop_after=4)  # BERT's dropout 0.1 in the frozen base


def test_sequence_classification_lora_saves_trainable_only_and_exports_the_peft_way(ft_data, tmp_path):
    """LoRA on a pretrained encoder under DDP: checkpoints hold the adapters and the head; both
    exports load the plain way (transformers alone; transformers + peft with the label config the
    export carries) and give the training model's logits; a changed base is refused in one line on
    resume and on export."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from launch.export import ExportError, export

    run_dir = tmp_path / "cls-lora"
    recipe = finetune_recipe("sequence_classification", ft_data["classification"], tmp_path / "cache", run_dir,
                             train={"max_steps": 6, "eval_every": 3}, optim={"lr": 1e-2, "warmup_steps": 0},
                             model={"lora": {"r": 4, "alpha": 8}})
    pretrained = on_pretrained(recipe, tmp_path, "sequence_classification")
    proc = run_recipe(tmp_path, recipe)
    counts = re.search(r"model: ([\d,]+) of ([\d,]+) parameters trainable", proc.stdout)
    _trainable_only(run_dir, *(int(n.replace(",", "")) for n in counts.groups()))

    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    assert launch_in_process("export", str(run_dir), str(merged_dir), "--lora", "merged").returncode == 0
    assert launch_in_process("export", str(run_dir), str(adapter_dir), "--lora", "adapter").returncode == 0
    ids = AutoTokenizer.from_pretrained(run_dir / "tokenizer")(["To be, or not to be", "Full fathom five"],
                                                               padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    info = json.loads((adapter_dir / "shardforge_export.json").read_text())
    peft_config = PeftConfig.from_pretrained(adapter_dir)
    assert peft_config.base_model_name_or_path == str(pretrained.resolve()) == info["base_model"]
    assert any("classifier" in name for name in peft_config.modules_to_save)
    base = AutoModelForSequenceClassification.from_pretrained(peft_config.base_model_name_or_path,
                                                              **info["label_config"])
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    training = exported_state(run_dir)
    with torch.no_grad():
        got_merged, got_adapter = merged(**ids).logits, adapted(**ids).logits
    assert merged.config.id2label == {i: name for i, name in enumerate(json.loads((run_dir / "labels.json").read_text()))}
    assert torch.allclose(got_merged, got_adapter, atol=1e-5)
    assert torch.equal(training["base_model.model.classifier.modules_to_save.default.weight"],
                       merged.state_dict()["classifier.weight"])

    # another base under the same path: the trainable parameters no longer fit it
    from safetensors.torch import load_file, save_file

    weights = load_file(str(pretrained / "model.safetensors"))
    weights["encoder.layer.0.attention.self.query.weight"] += 0.01
    save_file(weights, str(pretrained / "model.safetensors"), metadata={"format": "pt"})
    again = run_recipe(tmp_path, recipe, "train.max_steps=9", expect=2)
    assert "holds only the trainable parameters" in again.stdout + again.stderr
    with pytest.raises(ExportError, match="differ from those it was trained with"):
        export(run_dir, tmp_path / "refused", lora_export="merged")


OWN_CHAT_TEMPLATE = ("{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] }}"
                     "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '### assistant:' }}{% endif %}")
"""A pretrained tokenizer's own chat template (not shardforge's default)."""


def test_sft_ddp_chat_lora(ft_data, tmp_path):
    """Chat SFT with LoRA (and the final norm trained in full) on a pretrained model whose tokenizer
    brings its own chat template: the rest of the base stays bit-unchanged, and the merged export is prompted the plain way, through
    ``apply_chat_template(..., add_generation_prompt=True)`` with the template it was trained with."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from examples.shakespeare_plays import ask
    from train.config.loading import read_recipe

    pretrained = make_pretrained(tmp_path / "pretrained", "sft")
    tok = AutoTokenizer.from_pretrained(pretrained)
    tok.chat_template = OWN_CHAT_TEMPLATE
    tok.save_pretrained(pretrained)
    run_dir = tmp_path / "sft-chat"
    recipe = finetune_recipe("sft", ft_data["chat"], tmp_path / "cache", run_dir,
                             model={"pretrained": str(pretrained), "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"],
                                                                            "modules_to_save": ["model.norm"]}},
                             train={"max_steps": 6, "eval_every": 3}, data={"seq_len": 128})
    recipe["model"].pop("config")
    recipe["data"]["tokenizer"] = {}
    run_recipe(tmp_path, recipe)
    assert train_losses(run_dir)[-1] < train_losses(run_dir)[0]
    state, base = exported_state(run_dir), load_file(str(pretrained / "model.safetensors"))
    trained_norm = state.pop("base_model.model.model.norm.modules_to_save.default.weight")
    assert not torch.equal(trained_norm, base["model.norm.weight"]), "modules_to_save trains the final norm"
    for key, value in state.items():
        if "lora_" not in key:
            name = key.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
            assert torch.equal(value, base[name]), key
    assert read_recipe(run_dir).model.lora.dropout > 0  # LoRA's default dropout, kept across the stop below

    out = tmp_path / "chat-model"
    assert launch_in_process("export", str(run_dir), str(out)).returncode == 0
    assert torch.equal(load_file(str(out / "model.safetensors"))["model.norm.weight"], trained_norm)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == OWN_CHAT_TEMPLATE, "the pretrained model's own template, not the default"
    chat = json.loads(ft_data["chat"].read_text().splitlines()[0])["messages"]
    prompt = tok.apply_chat_template(chat[:1], add_generation_prompt=True, return_dict=True)
    assert tok.decode(prompt["input_ids"]).endswith("# # # assistant :")  # WordPiece splits the marker
    questions = tmp_path / "questions.jsonl"  # as `make demo-chat-lora` asks the held-out ones
    questions.write_text("".join(ft_data["chat"].read_text().splitlines(keepends=True)[:3]))
    asked = ask(out, questions, max_new_tokens=4)
    assert asked["questions"] == 3 and sum(asked["answers"].values()) == 3 and 0 <= asked["accuracy"] <= 1
    assert_stop_and_resume_exact(tmp_path, recipe, stop_after=3)
