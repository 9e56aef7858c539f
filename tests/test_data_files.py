"""Data as users bring it: CSV, TSV and ``save_to_disk`` folders read as the same samples as JSON
lines; the cache notices an edited file; a column that holds no text is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from tests.helpers import REPO, WORDS, data_error, data_recipe, make_corpus, tiny_recipe
from train.data.prepare import prepare_data
from train.data.sources import DataError, load_source
from train.data.tokenizer import load_or_train_tokenizer
from train.config.recipe import recipe_from_dict


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), files=4, words_per_file=800)


def _records(n: int = 40) -> list[dict]:
    """Text that CSV must quote (commas, quotes, newlines) and cells pandas would read as missing."""
    words = ["NA", "null", "a, b", 'say "hi"', "two\nlines", "plain words here"]
    return [{"text": f"{words[i % len(words)]} {' '.join(WORDS[i % 7: i % 7 + 9])} {i}",
             "label": "pos" if i % 3 else "neg"} for i in range(n)]


def _write_formats(root: Path, records: list[dict]) -> dict[str, dict]:
    """The same records as a jsonl file, a CSV, a TSV, a saved Dataset and a saved DatasetDict; each
    as the source (path and split) that reads them."""
    import csv

    root.mkdir(parents=True, exist_ok=True)
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, sep in (("rows.csv", ","), ("rows.tsv", "\t")):
        with open(root / name, "w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "label"], delimiter=sep)
            writer.writeheader()
            writer.writerows(records)
    ds = datasets.Dataset.from_list(records)
    ds.save_to_disk(str(root / "saved"), num_shards=2)
    other = datasets.Dataset.from_list(records[:3])
    datasets.DatasetDict({"train": other, "test": ds}).save_to_disk(str(root / "saved_dict"))
    return {"jsonl": {"path": str(root / "rows.jsonl")}, "csv": {"path": str(root / "rows.csv")},
            "tsv": {"path": str(root / "rows.tsv")}, "saved": {"path": str(root / "saved")},
            "saved_dict": {"path": str(root / "saved_dict"), "split": "test"}}


def _prepared(tmp: Path, task: str, source: dict, **data):
    r = tiny_recipe(tmp / "unused", tmp / "cache", tmp / "run")
    r["task"] = task
    r["data"].update(sources=[source], tokenizer={"path": str(REPO / "data" / "minilm")},
                     val_fraction=0.2, **data)
    if task != "causal_lm":
        r["eval"] = {"metric": "accuracy"}
    prepared = prepare_data(recipe_from_dict(r))
    splits = {"train": prepared.train, "val": prepared.val, "test": prepared.test}
    return prepared, {name: {c: s.table.column(c).to_pylist() for c in s.table.column_names}
                      for name, s in splits.items() if s is not None}


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_csv_tsv_and_save_to_disk_sources_give_the_samples_of_the_same_jsonl_records(tmp_path, task):
    sources = _write_formats(tmp_path / "data", _records())
    _, expected = _prepared(tmp_path, task, sources["jsonl"], test_fraction=0.1 if task != "causal_lm" else 0.0)
    assert len(expected["train"]["input_ids"]) > 10
    if task == "sequence_classification":
        assert sorted(set(expected["train"]["labels"])) == [0, 1]
    for kind in ("csv", "tsv", "saved", "saved_dict"):
        prepared, got = _prepared(tmp_path, task, sources[kind], test_fraction=0.1 if task != "causal_lm" else 0.0)
        assert got == expected, kind
        assert prepared.labels == (["neg", "pos"] if task != "causal_lm" else None), kind


def test_an_edited_csv_or_saved_dataset_prepares_again_and_reading_leaves_the_folder_alone(tmp_path):
    """The cache key stamps the CSV and the files save_to_disk wrote; reading a saved folder writes
    nothing into it (datasets' own cache-*.arrow files would otherwise land there)."""
    records = _records()
    sources = _write_formats(tmp_path / "data", records)
    for kind in ("csv", "saved"):
        before = sorted(p.name for p in Path(sources[kind]["path"]).iterdir()) if kind == "saved" else None
        first, _ = _prepared(tmp_path, "sequence_classification", sources[kind])
        again, _ = _prepared(tmp_path, "sequence_classification", sources[kind])
        assert again.stats["cache_hit"] and again.key == first.key, kind
        if kind == "saved":
            assert sorted(p.name for p in Path(sources[kind]["path"]).iterdir()) == before
        _write_formats(tmp_path / "data", records[:30])  # rewritten in place, fewer records
        edited, _ = _prepared(tmp_path, "sequence_classification", sources[kind])
        assert not edited.stats["cache_hit"] and edited.key != first.key, kind
        assert len(edited.train) + len(edited.val) == 30, kind
        _write_formats(tmp_path / "data", records)


def test_a_missing_split_of_a_saved_dataset_dict_is_named_with_the_splits_it_has(tmp_path, corpus):
    sources = _write_formats(tmp_path / "data", _records())
    msg = data_error(corpus, tmp_path, sources=[{**sources["saved_dict"], "split": "validation"}])
    assert msg.startswith("data.sources[0].split: 'validation' is not a split of the DatasetDict saved in") and \
        "(splits: train, test)" in msg and "set data.sources[0].split" in msg, msg


def test_a_text_field_that_holds_no_text_is_refused_before_a_tokenizer_is_trained(corpus, tmp_path):
    """`str()` of a list of chat messages used to be trained on as text."""
    chat = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}],
             "meta": {"lang": "en"}, "n": i} for i in range(20)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    recipe = data_recipe(corpus, tmp_path, sources=[{"path": str(tmp_path / "chat.jsonl"), "text_field": "messages"}])
    with pytest.raises(DataError) as err:
        load_or_train_tokenizer(recipe, tmp_path / "cache")  # the tokenizer is trained from the sources' text
    msg = str(err.value)
    assert "\n" not in msg and not (tmp_path / "cache" / "tokenizers").exists()
    assert msg.startswith(f"data.sources[0].text_field: column 'messages' of '{tmp_path / 'chat.jsonl'}' holds "
                          f"lists of mappings (role, content), not text (first record: [{{'role': 'user'"), msg
    assert "chat/messages data needs task: sft (with data.messages_field=messages)" in msg, msg
    for field, holds in (("meta", "holds mappings (lang)"), ("n", "holds int64 values")):
        msg = data_error(corpus, tmp_path, sources=[{"path": str(tmp_path / "chat.jsonl"), "text_field": field}])
        assert f"column {field!r}" in msg and holds in msg and "task: sft" in msg, msg
    # a template renders any column; text-valued columns pass
    ok = data_recipe(corpus, tmp_path, sources=[{"path": str(tmp_path / "chat.jsonl"), "template": "{n}: {meta}"}])
    assert load_source(ok.data.sources[0], "data.sources[0]")["text"][:1] == ["0: {'lang': 'en'}"]


def test_a_record_longer_than_max_record_mb_is_refused_naming_its_line(corpus, tmp_path):
    """A 200 MB single-line record made `prepare` die in the JSON reader (exit 134, > 12 GB); the
    line is found while holding at most max_record_mb of it."""
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        f.write(json.dumps({"text": "a short one"}) + "\n")
        f.write(json.dumps({"text": "x" * (3 << 20)}) + "\n")
    msg = data_error(corpus, tmp_path, sources=[{"path": str(big)}], max_record_mb=1)
    assert msg == (f"data.sources[0].path: line 2 of {str(big)!r} is longer than data.max_record_mb=1 MiB; split "
                   f"that record, or raise data.max_record_mb"), msg
    recipe = data_recipe(corpus, tmp_path, sources=[{"path": str(big)}], max_record_mb=4)
    assert len(load_source(recipe.data.sources[0], "data.sources[0]", recipe.data.max_record_mb)) == 2


def test_a_damaged_tokenizer_file_is_named(corpus, tmp_path):
    """A truncated tokenizer.json gave "Unterminated string starting at: line 182" and no file name."""
    import shutil

    bad = tmp_path / "tok"
    shutil.copytree(REPO / "data" / "minilm", bad, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx"))
    text = (bad / "tokenizer.json").read_text()
    (bad / "tokenizer.json").write_text(text[: len(text) // 2])
    msg = data_error(corpus, tmp_path, tokenizer={"path": str(bad)})
    assert msg.startswith(f"data.tokenizer.path: cannot load tokenizer {str(bad / 'tokenizer.json')!r} (line "), msg
    assert msg.endswith("fix the path or the file"), msg
