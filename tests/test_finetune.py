"""Fine-tuning: SFT, sequence and token classification, metrics, early stopping, freezing (LoRA:
tests/test_lora.py).

Unit tests check the arithmetic and the labels by hand; the launches are real 2-process runs on
CPU (gloo), each task under two engines, one of them sharded. The data are real Shakespeare
passages (tests/helpers.make_finetune_data) and the tokenizer is the real MiniLM WordPiece one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import (assert_stop_and_resume_exact, finetune_recipe, launch_in_process, make_finetune_data,
                           minilm_dir, on_pretrained, read_metrics, run_recipe, train_losses)
from train.config.recipe import recipe_from_dict
from train.tasks import IGNORE


# ---------------------------------------------------------------- labels, without a launch


@pytest.fixture(scope="module")
def ft_data(tmp_path_factory) -> dict[str, Path]:
    return make_finetune_data(tmp_path_factory.mktemp("ftdata"), records=200)


def _prepare(task: str, path: Path, tmp: Path, **data):
    from train.data.prepare import prepare_data

    raw = finetune_recipe(task, path, tmp / "cache", tmp / "run")
    raw["data"].update(data)
    return prepare_data(recipe_from_dict(raw))


@pytest.mark.parametrize("task_name", ["sft", "token_classification"])
def test_accumulated_loss_weighs_every_token_equally(task_name):
    """Two micro-batches with 2 and 14 loss tokens: with the step's loss denominator the accumulated
    gradient equals the gradient of one batch holding both (the mean over all 16 tokens), not the
    mean of the two micro-batch means. The denominator comes from the per-sample loss-token counts
    of the training set (here 3 samples, of which the step takes 2), as in the loop."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    from train.data.samples import Samples
    from train.loop.step import step_loss_denominator
    from train.tasks import build_task

    torch.manual_seed(0)
    if task_name == "sft":
        config = AutoConfig.for_model("llama", vocab_size=50, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        model = AutoModelForCausalLM.from_config(config)
    else:
        config = AutoConfig.for_model("bert", vocab_size=50, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_labels=3)
        model = AutoModelForTokenClassification.from_config(config).eval()  # no dropout
    task = build_task(task_name, ["A", "B", "C"])
    ids = torch.randint(0, 50, (2, 16))
    labels = torch.full((2, 16), IGNORE)
    labels[0, 13:] = torch.randint(0, 3, (3,))  # micro-batch 0: 2 or 3 loss tokens
    labels[1, 1:] = torch.randint(0, 3, (15,))  # micro-batch 1: 14 or 15
    micro = [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones(1, 16, dtype=torch.long),
              "labels": labels[i:i + 1]} for i in range(2)]
    whole = {"input_ids": ids, "attention_mask": torch.ones(2, 16, dtype=torch.long), "labels": labels}

    def grads(batches: list[dict]) -> torch.Tensor:
        model.zero_grad()
        for b in batches:
            (task.loss(model, b) / len(batches)).backward()  # what the engines do with accumulation
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    reference = grads([whole])
    per_micro_mean = grads([dict(b) for b in micro])
    train_set = Samples.from_dict({"labels": [labels[1].tolist(), [0] * 16, labels[0].tolist()]})
    denominator = step_loss_denominator(task.sample_loss_tokens(train_set), np.array([2, 0]), 2)
    for b in micro:
        b["loss_denominator"] = denominator
    assert torch.allclose(grads(micro), reference, atol=1e-6)
    assert not torch.allclose(per_micro_mean, reference, atol=1e-4)  # what the denominator fixes


def test_sft_labels_cover_the_response_only(ft_data, tmp_path):
    prepared = _prepare("sft", ft_data["sft"], tmp_path, val_fraction=0.0, test_fraction=0.0)
    tok = prepared.tokenizer
    records = [json.loads(line) for line in ft_data["sft"].read_text().splitlines()]
    by_prompt = {tuple(tok(r["prompt"], add_special_tokens=False)["input_ids"]): r for r in records}
    checked = 0
    for row in prepared.train.table.slice(0, 20).to_pylist():
        ids, labels, mask = row["input_ids"], row["labels"], row["attention_mask"]
        n = sum(mask)
        prompt_len = next(i for i, x in enumerate(labels) if x != IGNORE)
        record = by_prompt[tuple(ids[:prompt_len])]
        response = tok(record["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[:prompt_len] == [IGNORE] * prompt_len          # the loss ignores the prompt
        assert labels[prompt_len:n] == response == ids[prompt_len:n]  # and learns the response + EOS
        assert labels[n:] == [IGNORE] * (len(labels) - n)             # and never the padding
        checked += 1
    assert checked == 20


def test_sft_chat_learns_assistant_turns_only(ft_data, tmp_path):
    prepared = _prepare("sft", ft_data["chat"], tmp_path, val_fraction=0.0, test_fraction=0.0, seq_len=128)
    tok = prepared.tokenizer
    row = prepared.train.table.slice(0, 1).to_pylist()[0]
    learned = tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
    ignored = tok.decode([i for i, lab, m in zip(row["input_ids"], row["labels"], row["attention_mask"])
                          if lab == IGNORE and m])
    assert "<" not in learned and "user" not in learned and "assistant" not in learned  # content + EOS only
    assert learned.count("[SEP]") == 2  # MiniLM's EOS ends each of the 2 assistant turns
    assert ignored.count("< | user | >") == 2 and ignored.count("< | assistant | >") == 2  # headers are not learned


def test_saved_tokenizer_prompts_chat_as_in_training(ft_data, tmp_path):
    """The run's tokenizer (as the trainer saves it, written or from a cache hit) carries the chat
    template the samples were rendered with: ``apply_chat_template(history, add_generation_prompt=True)``
    gives, token for token, the sample's ids before each assistant turn's learned tokens."""
    from transformers import AutoTokenizer

    from train.data.finetuning import CHAT_TEMPLATE

    chats = [json.loads(line)["messages"] for line in ft_data["chat"].read_text().splitlines()]
    for attempt in ("written", "reused"):
        prepared = _prepare("sft", ft_data["chat"], tmp_path, val_fraction=0.0, test_fraction=0.0, seq_len=128)
        assert prepared.stats["cache_hit"] == (attempt == "reused")
        prepared.tokenizer.save_pretrained(tmp_path / attempt)  # what the trainer writes to RUN_DIR/tokenizer
        tok = AutoTokenizer.from_pretrained(tmp_path / attempt)
        assert tok.chat_template == CHAT_TEMPLATE  # MiniLM brings none: the default, saved
        prompts = {tuple(tok.apply_chat_template(chat[:turns], add_generation_prompt=True, return_dict=False)): chat
                   for chat in chats for turns in (1, 3)}
        checked = 0
        for i in range(20):
            row = prepared.train.rows([i])
            ids, labels = row["input_ids"][0].tolist(), row["labels"][0].tolist()
            starts = [k for k in range(len(labels)) if labels[k] != IGNORE and (k == 0 or labels[k - 1] == IGNORE)]
            assert len(starts) == 2  # the two assistant turns
            first, second = (prompts.get(tuple(ids[:k])) for k in starts)
            assert first is not None and first is second  # both prompts of the same conversation
            checked += 1
        assert checked == 20


def test_token_labels_go_on_the_first_sub_token(tmp_path):
    path = tmp_path / "ner.jsonl"
    path.write_text(json.dumps({"words": ["Rosencrantz", "and", "Guildenstern", "are", "dead"],
                                "tags": ["B-PER", "O", "B-PER", "O", "O"]}) + "\n")
    prepared = _prepare("token_classification", path, tmp_path, val_fraction=0.0, test_fraction=0.0)
    row = prepared.train.table.slice(0, 1).to_pylist()[0]
    tok = prepared.tokenizer
    enc = tok(["Rosencrantz", "and", "Guildenstern", "are", "dead"], is_split_into_words=True)
    assert len(enc["input_ids"]) > 7  # the names split into several word pieces
    names = prepared.labels
    expected, previous = [], None
    for word in enc.word_ids():
        tag = ["B-PER", "O", "B-PER", "O", "O"][word] if word is not None and word != previous else None
        expected.append(IGNORE if tag is None else names.index(tag))
        previous = word
    n = sum(row["attention_mask"])
    assert row["labels"][:n] == expected and row["input_ids"][:n] == enc["input_ids"]


def test_a_label_missing_from_training_is_one_clear_error(tmp_path):
    from train.data.sources import DataError

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"text": f"text {i}", "label": "a" if i % 2 else "b"}) + "\n" for i in range(8)))
    val.write_text(json.dumps({"text": "x", "label": "zebra"}) + "\n")
    with pytest.raises(DataError, match=r"data.val_source: label 'zebra' does not occur in the training data \(labels: a, b\)"):
        _prepare("sequence_classification", train, tmp_path, val_source={"path": str(val)}, test_fraction=0.0)


@pytest.mark.parametrize("change, message", [
    ({"eval": {"metric": "entity_f1"}}, "eval.metric: 'entity_f1' is not a sequence_classification metric"),
    ({"eval": {"patience": 2}, "train": {"eval_every": 0}}, "eval.patience: early stopping needs periodic evaluation"),
    ({"model": {"lora": {"r": 4}}, "parallel": {"engine": "zero2"}}, "model.lora: supported (and tested) with"),
    ({"model": {"freeze_layers": 9}}, "model.freeze_layers: 9 is not between 0 and the model's 2 layers"),
    ({"data": {"test_fraction": 0.95}}, "data.test_fraction: must be in [0, 1) and leave training data"),
])
def test_bad_finetune_recipes_are_refused_in_one_line(ft_data, tmp_path, change, message):
    from train.config.loading import RecipeError, load_recipe
    from tests.helpers import write_recipe

    raw = finetune_recipe("sequence_classification", ft_data["classification"], tmp_path / "c", tmp_path / "r")
    for key, value in change.items():
        raw[key] = {**raw.get(key, {}), **value}
    with pytest.raises(RecipeError) as err:
        load_recipe(str(write_recipe(tmp_path / "bad.yaml", raw)))
    assert message in str(err.value) and str(err.value).count("\n") == 0


# ---------------------------------------------------------------- real 2-process runs


def test_sequence_classification_ddp_freezing_early_stopping_best_checkpoint(ft_data, tmp_path):
    """Freeze embeddings + layer 0; stop early after 2 evaluations without gain; keep the best."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from train.data.batches import eval_batches
    from train.data.prepare import prepare_data
    from train.config.loading import read_recipe
    from train.model import build_model, token_ids

    run_dir = tmp_path / "cls"
    recipe = finetune_recipe("sequence_classification", ft_data["classification"], tmp_path / "cache", run_dir,
                             model={"freeze_embeddings": True, "freeze_layers": 1},
                             train={"max_steps": 40, "eval_every": 4},
                             eval={"metric": "accuracy", "patience": 2, "min_delta": 1.0},  # only the 1st counts
                             checkpoint={"keep_last": 1, "at_end": True})
    on_pretrained(recipe, tmp_path, "sequence_classification")
    proc = run_recipe(tmp_path, recipe)
    assert "early stopping: accuracy did not improve for 2 evaluations" in proc.stdout
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics if "eval_accuracy" in m] == [4, 8, 12]
    assert max(m["step"] for m in metrics if "loss" in m) == 12
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["step"] == 4 and best["metric"] == "accuracy"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000004", "step-000012"]
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["checkpoint"].startswith("step-000004") and 0 <= results["metrics"]["accuracy"] <= 1
    assert "| hamlet |" in (run_dir / "test_results.md").read_text()
    eval_record = next(m for m in metrics if m["step"] == 4 and "eval_accuracy" in m)
    assert {"eval_macro_f1", "eval_micro_f1", "eval_f1/hamlet", "eval_precision/tempest"} <= set(eval_record)
    # the token counter sums every rank's own (trimmed) micro-batches, replayed here rank by rank;
    # tokens/s comes from the same all-reduced sums
    from train.data.batches import TrainBatches

    resolved = read_recipe(run_dir)
    t, data = resolved.train, prepare_data(resolved)
    expected = 0
    for rank in range(2):
        replay = TrainBatches(data.train, resolved.run.seed, t.global_batch_size, t.micro_batch_size,
                              rank, 2, num_workers=0)
        expected += sum(next(replay)["input_ids"].numel() for _ in range(12 * t.global_batch_size
                                                                        // (t.micro_batch_size * 2)))
    logs, previous, counted = [m for m in metrics if "loss" in m], 0, 0.0
    for m in logs:
        counted += m["tokens_per_s"] * m["step_time_s"] * (m["step"] - previous)
        previous = m["step"]
    assert logs[-1]["tokens"] == expected and abs(counted - expected) < 1e-6 * expected, (counted, expected)

    # stopped right after an evaluation and resumed: the same run, early stop and test results
    assert_stop_and_resume_exact(tmp_path, recipe, stop_after=4)
    again = run_recipe(tmp_path, recipe)  # an early-stopped run stays stopped
    assert max(m["step"] for m in read_metrics(run_dir) if "loss" in m) == 12, again.stdout

    out = tmp_path / "export"
    assert launch_in_process("export", str(run_dir), str(out)).returncode == 0
    exported = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    labels = json.loads((run_dir / "labels.json").read_text())
    assert [exported.config.id2label[i] for i in range(len(labels))] == labels
    assert json.loads((out / "shardforge_export.json").read_text())["checkpoint"] == "step-000004"

    trained = read_recipe(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    initial = build_model(trained.model, len(tokenizer), trained.run.seed, trained.task, labels,
                          special_ids=token_ids(tokenizer)).state_dict()
    final = exported.state_dict()
    frozen = [k for k in initial if k.startswith(("bert.embeddings.word_embeddings", "bert.embeddings.position",
                                                  "bert.encoder.layer.0."))]
    learned = [k for k in initial if k.startswith(("bert.encoder.layer.1.", "classifier."))]
    assert frozen and all(torch.equal(initial[k], final[k]) for k in frozen)
    assert all(not torch.equal(initial[k], final[k]) for k in learned if k.endswith("weight"))

    # the exported best model reproduces the run's test accuracy, computed by the distributed evaluation
    data = prepare_data(trained)
    right = total = 0
    with torch.no_grad():
        for batch in eval_batches(data.test, 8, 0, 1, 0):
            logits = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            right += int(((logits.argmax(-1) == batch["labels"]).float() * batch["sample_weight"]).sum())
            total += int(batch["sample_weight"].sum())
    assert total == results["samples"] and right / total == pytest.approx(results["metrics"]["accuracy"], abs=1e-12)


def test_sequence_classification_zero2(ft_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run_dir = tmp_path / "cls-zero2"
    recipe = finetune_recipe("sequence_classification", ft_data["classification"], tmp_path / "cache", run_dir,
                             parallel={"engine": "zero2"}, train={"max_steps": 8, "eval_every": 4})
    on_pretrained(recipe, tmp_path, "sequence_classification")
    run_recipe(tmp_path, recipe)
    losses = train_losses(run_dir)
    # 8 steps do not move a fresh 4-class head reliably (the losses stay near ln 4 either way, so
    # "the last below the first" held or not by the batches' luck); the loss itself is checked
    assert len(losses) == 4 and all(abs(loss - math.log(4)) < 0.3 for loss in losses), losses
    results = json.loads((run_dir / "test_results.json").read_text())["metrics"]
    assert {"accuracy", "macro_f1", "micro_f1", "loss"} <= set(results)
    out = tmp_path / "export"
    assert launch_in_process("export", str(run_dir), str(out)).returncode == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 4 and model.config.label2id["tempest"] == 2
    assert model.config.hidden_dropout_prob > 0  # BERT's default dropout, kept across the stop below
    assert_stop_and_resume_exact(tmp_path, recipe, stop_after=4)  # right after the evaluation of step 4


def test_token_classification_ddp(ft_data, tmp_path):
    run_dir = tmp_path / "ner-ddp"
    recipe = finetune_recipe("token_classification", ft_data["ner"], tmp_path / "cache", run_dir,
                             train={"max_steps": 8, "eval_every": 4})
    on_pretrained(recipe, tmp_path, "token_classification")
    run_recipe(tmp_path, recipe)
    losses = train_losses(run_dir)
    assert losses[-1] < losses[0]
    evals = [m for m in read_metrics(run_dir) if "eval_entity_f1" in m]
    assert [m["step"] for m in evals] == [4, 8] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert_stop_and_resume_exact(tmp_path, recipe, stop_after=5)  # after an evaluation; BERT's dropout 0.1 throughout


def test_sft_fsdp_prompt_response(ft_data, tmp_path):
    run_dir = tmp_path / "sft-fsdp"
    recipe = finetune_recipe("sft", ft_data["sft"], tmp_path / "cache", run_dir, parallel={"engine": "fsdp"},
                             train={"max_steps": 8, "eval_every": 4})
    on_pretrained(recipe, tmp_path, "sft")
    run_recipe(tmp_path, recipe)
    evals = [m for m in read_metrics(run_dir) if "eval_loss" in m]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and "eval_ppl" in evals[-1]
    assert "perplexity" in json.loads((run_dir / "test_results.json").read_text())["metrics"]
    assert_stop_and_resume_exact(tmp_path, recipe, stop_after=4)  # the Llama's attention dropout 0.1 throughout


def test_minilm_demo_beats_the_majority_baseline(tmp_path):
    """The shipped recipe, kept short: the real pretrained MiniLM-L6 on 2 CPU processes."""
    from examples.shakespeare_plays import build
    from tests.helpers import SHAKESPEARE
    from train.data.prepare import prepare_data
    from train.config.loading import read_recipe

    passages = build(SHAKESPEARE, tmp_path / "plays")
    records = [json.loads(line) for line in passages.read_text().splitlines()]
    chats = [json.loads(line)["messages"] for name in ("chat.jsonl", "chat_test.jsonl")
             for line in (tmp_path / "plays" / name).read_text().splitlines()]
    assert len(chats) == len(records) and len((tmp_path / "plays" / "chat_test.jsonl").read_text().splitlines()) \
        == len(records[::10])  # the chat demo's data: the same passages, every tenth held out
    assert chats[-1][0]["content"].startswith("Which play is this from?\n") and \
        chats[-1][1] == {"role": "assistant", "content": "Twelfth Night"}
    run_dir = tmp_path / "minilm"
    proc = launch_in_process("run", "minilm-plays", f"run.dir={run_dir}", f"model.pretrained={minilm_dir()}",
                             f"data.sources.0.path={passages}", f"data.cache_dir={tmp_path / 'cache'}",
                             "train.epochs=0", "train.max_steps=30", "data.seq_len=64",  # the recipe's lr: 5e-4 can
                             # collapse to the majority class in 30 steps (seed 1234 did, with today's shuffle)
                             "train.eval_every=0", "eval.patience=0", "logging.console=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "test_results.json").read_text())
    test = prepare_data(read_recipe(run_dir)).test
    majority = np.bincount(test.rows(range(len(test)))["labels"]).max() / len(test)
    assert results["samples"] == len(test) > 200
    assert results["metrics"]["accuracy"] >= majority + 0.05, (results["metrics"]["accuracy"], majority)
