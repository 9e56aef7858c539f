"""Data at scale (issue 36): documents tokenized in bounded pieces exactly as whole, the packed samples
and their order unchanged from the ``datasets.map`` pipeline, nothing written outside
``data.cache_dir``, memory bounded whatever the size of a file, and the benchmark still runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train.data.encode as encode_module
from tests.helpers import REPO, SHAKESPEARE, data_recipe, make_corpus
from train.data.scratch import scratch_in
from train.data.encode import Splitter
from train.data.prepare import prepare_data
from train.data.encode import backend_of
from train.data.tokenizer import load_or_train_tokenizer

WHITESPACE = ["\n", "\n\n", "  \n", "\n  ", " \n\n  ", "\t", "\r\n", "   ", "\n\n\n", " \t\n"]


def awkward_text(chars: int) -> str:
    """Shakespeare with every kind of whitespace run between its lines, ``chars`` long."""
    lines = (SHAKESPEARE / "hamlet_gut.txt").read_text().splitlines()
    out, n, i = [], 0, 0
    while n < chars:
        piece = lines[i % len(lines)] + WHITESPACE[i % len(WHITESPACE)]
        out.append(piece)
        n, i = n + len(piece), i + 1
    return "".join(out)[:chars]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), files=4, words_per_file=800)


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    """The byte-level BPE shardforge trains (as every pre-training recipe without a tokenizer path)."""
    tmp = tmp_path_factory.mktemp("bpe")
    return load_or_train_tokenizer(data_recipe(corpus, tmp), tmp / "cache")


def _tokenizers(bpe):
    yield "shardforge byte-level BPE", bpe
    if (REPO / "data" / "minilm" / "tokenizer.json").exists():  # `make finetune-data`
        from transformers import AutoTokenizer

        yield "MiniLM WordPiece", AutoTokenizer.from_pretrained(str(REPO / "data" / "minilm"))


def test_a_document_cut_into_pieces_tokenizes_token_for_token_as_whole(bpe):
    text = awkward_text(120_000)
    for name, tokenizer in _tokenizers(bpe):
        splitter = Splitter(backend_of(tokenizer), piece_chars=3000)
        pieces = list(splitter.pieces([text[i:i + 7000] for i in range(0, len(text), 7000)]))
        assert "".join(p for p, _ in pieces) == text and [last for _, last in pieces][-1]
        assert splitter.cuts >= 30 and splitter.unverified == 0, (name, splitter.cuts, splitter.unverified)
        ids = np.concatenate([np.asarray(tokenizer(p, add_special_tokens=False)["input_ids"]) for p, _ in pieces])
        assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"], name


def test_a_tokenizer_that_prepends_to_every_input_gets_line_break_cuts_and_says_so():
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.train_from_iterator([awkward_text(20_000)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                                        show_progress=False))
    splitter = Splitter(backend_of(PreTrainedTokenizerFast(tokenizer_object=tk)), piece_chars=2000)
    pieces = [p for p, _ in splitter.pieces([awkward_text(40_000)])]
    assert "".join(pieces) == awkward_text(40_000) and splitter.unverified == splitter.cuts >= 10
    assert all(p.endswith("\n") for p in pieces[:-1]), "the fallback cuts after a line break"


def _splits(data) -> list[list]:
    return [data.train.table.column("input_ids").to_pylist(), data.val.table.column("input_ids").to_pylist()]


def test_big_files_in_pieces_on_worker_processes_give_the_same_samples(corpus, tmp_path, monkeypatch):
    """One 400 kB file: whole in this process, or in 4 kB pieces on 2 worker processes."""
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "all.txt").write_text(awkward_text(400_000))
    src = [{"path": str(tmp_path / "big")}, {"path": str(corpus), "weight": 0.5}]
    whole = prepare_data(data_recipe(corpus, tmp_path / "a", sources=src, num_proc=1))
    monkeypatch.setattr(encode_module, "PIECE_CHARS", 4096)
    started = []
    real = encode_module.Workers.__init__
    monkeypatch.setattr(encode_module.Workers, "__init__", lambda self, *a: (started.append(a[1]), real(self, *a))[1])
    pieces = prepare_data(data_recipe(corpus, tmp_path / "b", sources=src, num_proc=2))
    assert started == [2, 2], "each source (over 2 pieces) goes to 2 worker processes"
    assert whole.key == pieces.key and whole.stats["tokens_total"] == pieces.stats["tokens_total"]
    assert _splits(whole) == _splits(pieces)


def test_an_unreadable_file_mid_stream_is_one_line_and_leaves_no_process_or_scratch(tmp_path):
    import psutil

    from train.data.sources import DataError

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("hello world\n" * 100_000)
    (tmp_path / "c" / "b.txt").write_bytes(b"ok " * 500_000 + b"\xff\xfe")
    recipe = data_recipe(tmp_path / "c", tmp_path, num_proc=2, tokenizer={"train": {"vocab_size": 300, "max_chars": 10_000}})
    with pytest.raises(DataError, match=r"b\.txt' is not UTF-8 \(invalid start byte\); convert it to UTF-8"):
        prepare_data(recipe)
    assert not psutil.Process().children() and not list((tmp_path / "cache").glob(".scratch-*"))


def reference_prepare(recipe, tokenizer) -> list[list]:
    """The ``datasets.map`` pipeline this replaced (commit 4f3f6d4): its train and val samples."""
    import datasets

    from train.data.sources import load_source

    d, eos, seq_len = recipe.data, tokenizer.eos_token_id, recipe.data.seq_len

    def tok(batch):
        return {"input_ids": [x + [eos] for x in tokenizer(batch["text"], add_special_tokens=False)["input_ids"] if x]}

    def pack(batch):
        flat = np.fromiter((t for doc in batch["input_ids"] for t in doc), dtype=np.int64)
        return {"input_ids": flat[: len(flat) // seq_len * seq_len].reshape(-1, seq_len).tolist()}

    def packed(src, where):
        ds = load_source(src, where)
        ds = ds.map(tok, batched=True, remove_columns=ds.column_names)
        return ds.map(pack, batched=True, batch_size=1000, remove_columns=ds.column_names)

    parts = [(packed(s, f"data.sources[{i}]"), s.weight) for i, s in enumerate(d.sources)]
    train = parts[0][0]
    if len(parts) > 1:
        total, wsum, chosen = sum(len(b) for b, _ in parts), sum(w for _, w in parts), []
        for i, (blocks, w) in enumerate(parts):
            idx = np.resize(np.random.default_rng([recipe.run.seed, 11, i]).permutation(len(blocks)),
                            max(1, int(round(total * w / wsum))))
            chosen.append(blocks.select(np.sort(idx)).flatten_indices())
        train = datasets.concatenate_datasets(chosen)
    if d.val_source is not None:
        val = packed(d.val_source, "data.val_source")
    else:
        n_val = max(1, int(round(len(train) * d.val_fraction))) if d.val_fraction > 0 else 0
        order = np.random.default_rng([recipe.run.seed, 7]).permutation(len(train))
        val, train = train.select(np.sort(order[:n_val])), train.select(np.sort(order[n_val:]))
    if d.max_samples is not None:
        train = train.select(range(min(d.max_samples, len(train))))
    return [train["input_ids"], val["input_ids"]]


def test_samples_and_their_order_are_those_of_the_datasets_pipeline(corpus, tmp_path):
    import random

    rng = random.Random(1)
    words = "a bb ccc dddd the king".split()
    rows = [{"text": "" if i % 7 == 0 else " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))}
            for i in range(2500)]  # > 1000 documents: packed in groups of 1000; empty ones add nothing
    (tmp_path / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"q": f"q {i}", "a": f"answer {i} " * 9}) + "\n"
                                               for i in range(60)))
    cases = [{},
             {"sources": [{"path": str(tmp_path / "many.jsonl")}, {"path": str(corpus), "weight": 0.5}], "seq_len": 16},
             {"sources": [{"path": str(corpus), "weight": 3.0},
                          {"path": str(tmp_path / "qa.jsonl"), "template": "Q: {q}\nA: {a}"}], "val_fraction": 0.0},
             {"val_source": {"path": str(corpus / "doc00.txt")}, "max_samples": 50}]
    for i, case in enumerate(cases):
        data = prepare_data(data_recipe(corpus, tmp_path / f"case{i}", **case))
        with scratch_in(tmp_path / f"ref{i}"):
            expected = reference_prepare(data_recipe(corpus, tmp_path / f"case{i}", **case), data.tokenizer)
        assert _splits(data) == expected, f"case {i}: {case}"
        assert len(data.train) > 0


def _run_python(code: str, env: dict, timeout: float = 600, args: tuple = ()) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_CACHE", "HF_HUB_CACHE")}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**inherited, "PYTHONPATH": str(REPO), **env})


def test_nothing_is_written_outside_the_data_cache_and_no_scratch_is_left(corpus, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 20, "label": "ab"[i % 2]}) + "\n"
                                                 for i in range(200)))
    recipes = [data_recipe(corpus, tmp_path / "lm", sources=[{"path": str(corpus)}, {"path": str(tmp_path / "rows.jsonl")}]),
               data_recipe(corpus, tmp_path / "cls", sources=[{"path": str(tmp_path / "rows.jsonl")}])]
    recipes[1].task, recipes[1].data.label_field = "sequence_classification", "label"
    import pickle

    blob = pickle.dumps(recipes).hex()
    code = (f"import pickle\nfrom train.console import show_on_console\nfrom train.data.prepare import prepare_data\n"
            f"show_on_console(True)\nfor r in pickle.loads(bytes.fromhex({blob!r})):\n    print(prepare_data(r).stats)\n")
    proc = _run_python(code, {"HOME": str(home), "HF_HOME": str(home / "hf"), "XDG_CACHE_HOME": str(home / "cache"),
                              "TMPDIR": str(home)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("cache_hit") == 2
    assert [str(p) for p in home.rglob("*")] == [], "written outside data.cache_dir"
    for cache in (tmp_path / "lm" / "cache", tmp_path / "cls" / "cache"):
        assert not list(cache.glob(".scratch-*")) and not list(cache.glob("*.tmp*"))


BIG_MB = 24
PEAK = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""
"""Runs a command and prints the peak RSS (KiB) of its largest process. Run from this small process:
a child's ``ru_maxrss`` starts at its parent's peak (Linux folds the parent's at ``exec``)."""


@pytest.mark.slow
def test_memory_stays_bounded_for_one_file_far_over_the_piece_bound(tmp_path):
    """One 24 MB document on 2 worker processes. The datasets pipeline held it as one document and
    its tokens as Python lists (877 MB here, growing ~26 MB per MB of the file); streamed, no process
    passes 600 MB (measured: 451 MB, mostly imports and training the tokenizer)."""
    (tmp_path / "big").mkdir()
    text = awkward_text(1 << 20)
    with open(tmp_path / "big" / "one.txt", "w") as f:
        for _ in range(BIG_MB):
            f.write(text)
    code = ("import json\nfrom tests.helpers import data_recipe\n"
            "from train.data.prepare import prepare_data\nfrom pathlib import Path\n"
            f"tmp = Path({str(tmp_path)!r})\n"
            "r = data_recipe(tmp / 'big', tmp, num_proc=2, seq_len=128, tokenizer={'train': {'vocab_size': 400, "
            "'max_chars': 2_000_000}})\n"
            "print(json.dumps(prepare_data(r).stats['tokens_total']))\n")
    proc = _run_python(PEAK, {"TOKENIZERS_PARALLELISM": "false"}, args=[sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    tokens, peak_kb = map(int, proc.stdout.strip().splitlines()[-2:])
    assert tokens > BIG_MB * 200_000
    assert 0 < peak_kb < 600 << 10, f"{peak_kb >> 10} MB"
