"""Data: exactly-once sharding, O(1) resume on any world size, packing, the cache, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import train.data.pretraining as pretraining
from tests.helpers import data_error, data_recipe, make_corpus
from train.data.batches import TrainBatches
from train.data.samples import Samples
from train.data.prepare import prepare_data
from train.data.pretraining import tokenize_and_pack
from train.data.sources import DataError, load_source
from train.data.tokenizer import load_or_train_tokenizer


def numbered(n: int) -> Samples:
    """Sample i holds the tokens [i, i, i, i], so a batch names its sample ids."""
    return Samples.from_dict({"input_ids": [[i] * 4 for i in range(n)]})


def take_steps(ds, world: int, micro: int, accum: int, steps: int, seed: int = 0, state=None):
    """Run every rank's iterator for ``steps`` optimizer steps; return per-step global id lists."""
    gb = micro * accum * world
    ranks = [TrainBatches(ds, seed, gb, micro, r, world, num_workers=0) for r in range(world)]
    if state is not None:
        for it in ranks:
            it.load_state_dict(state)
    out = []
    for _ in range(steps):
        ids = []
        for it in ranks:
            for _ in range(accum):
                ids += next(it)["input_ids"][:, 0].tolist()
        out.append(ids)
    states = {json.dumps(it.state_dict()) for it in ranks}
    assert len(states) == 1, "ranks disagree on the data position"
    return out, ranks[0].state_dict()


@pytest.mark.parametrize("world,micro,accum", [(1, 4, 3), (2, 2, 3), (3, 2, 2), (3, 1, 4), (2, 6, 1)])
def test_each_sample_once_per_epoch(world, micro, accum):
    ds = numbered(48)  # 48 = 4 steps of 12
    steps, state = take_steps(ds, world, micro, accum, steps=8)
    epoch0, epoch1 = sum(steps[:4], []), sum(steps[4:], [])
    assert sorted(epoch0) == list(range(48)) and sorted(epoch1) == list(range(48))
    assert epoch0 != epoch1, "each epoch needs a fresh shuffle"
    assert state["epoch"] == 2 and state["consumed"] == 96


def test_no_overlap_between_ranks_and_remainder_skipped():
    ds = numbered(50)  # 50 = 4 steps of 12, 2 left over per epoch
    gb, world, micro = 12, 3, 2
    ranks = [TrainBatches(ds, 0, gb, micro, r, world, num_workers=0) for r in range(world)]
    seen = [set() for _ in range(world)]
    for _ in range(4 * 2):  # one epoch: 4 steps × 2 micro-batches per rank
        for r, it in enumerate(ranks):
            seen[r] |= set(next(it)["input_ids"][:, 0].tolist())
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert len(set().union(*seen)) == 48


def test_order_depends_on_seed_only():
    ds = numbered(48)
    a, _ = take_steps(ds, 2, 2, 3, 4, seed=5)
    b, _ = take_steps(ds, 3, 2, 2, 4, seed=5)
    c, _ = take_steps(ds, 2, 2, 3, 4, seed=6)
    assert a == b, "the global sample sequence must not depend on the world size"
    assert a != c


@pytest.mark.parametrize("after", [(2, 2, 3), (3, 2, 2), (1, 4, 3)])
def test_resume_mid_epoch_on_any_world_size(after):
    ds = numbered(48)
    straight, _ = take_steps(ds, 2, 2, 3, steps=7)
    first, state = take_steps(ds, 2, 2, 3, steps=3)
    assert state == {"consumed": 36, "epoch": 0, "num_samples": 48, "global_batch": 12, "seed": 0}
    rest, _ = take_steps(ds, *after, steps=4, state=state)
    assert first + rest == straight


def test_prefetching_workers_do_not_move_the_position():
    ds = numbered(48)
    it = TrainBatches(ds, 0, 12, 2, 0, 1, num_workers=2)
    for _ in range(6):  # one step; the workers have prefetched more
        next(it)
    assert it.state_dict()["consumed"] == 12
    resumed = TrainBatches(ds, 0, 12, 2, 0, 1, num_workers=0)
    resumed.load_state_dict(it.state_dict())
    assert next(resumed)["input_ids"].tolist() == next(it)["input_ids"].tolist()


def test_read_ahead_thread_and_workers_give_the_same_batches_and_the_thread_ends_with_close():
    import threading

    ds = numbered(48)
    ahead = TrainBatches(ds, 0, 12, 2, 0, 1)  # the default: a read-ahead thread in this process
    workers = TrainBatches(ds, 0, 12, 2, 0, 1, num_workers=2)
    for _ in range(20):
        assert next(ahead)["input_ids"].tolist() == next(workers)["input_ids"].tolist()
    thread = ahead._it._thread
    assert thread.name == "batch-read-ahead" and thread.is_alive() and thread in threading.enumerate()
    ahead.close()
    workers.close()
    assert not thread.is_alive()


def test_a_read_error_in_the_read_ahead_thread_is_raised_in_the_training_thread():
    from train.data import batches

    class Broken(batches._PackedSamples):
        def __getitems__(self, indices):
            raise OSError("disk gone")

    it = TrainBatches(numbered(48), 0, 12, 2, 0, 1)
    original, batches._PackedSamples = batches._PackedSamples, Broken
    try:
        with pytest.raises(OSError, match="disk gone"):
            next(it)
    finally:
        batches._PackedSamples = original
        it.close()


def test_closing_never_waits_for_a_read_ahead_thread_with_a_full_queue():
    """A reader whose queue is full (or that failed with nobody reading) leaves at once on close."""
    import time

    from train.data.batches import _ReadAhead

    def numbers_then_error():
        yield from range(3)
        raise OSError("late failure")

    for source in (iter(range(100)), numbers_then_error()):
        ahead = _ReadAhead(source, depth=2)
        time.sleep(0.3)  # the queue fills (and the failure waits for room)
        started = time.monotonic()
        ahead.close()
        assert time.monotonic() - started < 1 and not ahead._thread.is_alive()


def test_samples_read_from_the_cache_equal_what_datasets_reads(tmp_path):
    """The trainer reads a prepared split straight from the Arrow files ``datasets`` saved (several
    shards, several chunks each): the same rows, in any order and with repeats, as ``datasets``'
    own numpy formatter gives; ``_PackedSamples`` trims a batch to its longest attention mask. A
    column that is not integers or fixed-width integer lists is refused by name."""
    from train.data.batches import _PackedSamples

    rng = np.random.default_rng(0)
    parts = []
    for n in (5, 7, 6):  # three Arrow chunks
        mask = [[1] * int(k) + [0] * (6 - int(k)) for k in rng.integers(1, 6, n)]
        parts.append(datasets.Dataset.from_dict({"input_ids": rng.integers(0, 99, (n, 6)).tolist(),
                                                 "attention_mask": mask, "labels": rng.integers(0, 3, n).tolist()}))
    datasets.concatenate_datasets(parts).save_to_disk(str(tmp_path / "split"), num_shards=2)
    ours = Samples.read(tmp_path / "split")
    theirs = datasets.load_from_disk(str(tmp_path / "split")).with_format("numpy")
    assert len(ours) == len(theirs) == 18 and len(json.loads((tmp_path / "split" / "state.json").read_text())["_data_files"]) == 2
    assert max(len(c) for c in ours._columns.values()) > 0
    for idx in ([0, 4, 5, 11, 17], [11], [6, 2, 6], list(range(18))[::-1], []):
        a, b = ours.rows(idx), theirs[idx]
        assert a.keys() == b.keys()
        for k in a:
            expected = np.asarray(b[k]).reshape(a[k].shape)
            assert a[k].dtype.kind == "i" and np.array_equal(a[k], expected), (k, idx)  # int32 as stored
    batch = _PackedSamples(ours).__getitems__([0, 4, 5])
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    assert batch["input_ids"].equal(torch.from_numpy(ours.rows([0, 4, 5])["input_ids"][:, :batch["input_ids"].shape[1]]))
    with pytest.raises(IndexError, match="outside the 18 samples"):
        ours.rows([18])
    with pytest.raises(DataError, match="column 'input_ids' holds lists of 1 to 2 tokens"):
        Samples.from_dict({"input_ids": [[1, 2], [3]]})
    with pytest.raises(DataError, match="column 'text' holds string"):
        Samples.from_dict({"input_ids": [[1, 2]], "text": ["a"]})
    assert len(Samples.from_dict({"input_ids": []}).rows([])["input_ids"]) == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), files=4, words_per_file=800)


def test_packing_conserves_tokens(corpus, tmp_path):
    recipe = data_recipe(corpus, tmp_path)
    tok = load_or_train_tokenizer(recipe, tmp_path / "cache")
    src = load_source(recipe.data.sources[0], "data.sources[0]")
    packed, stats = tokenize_and_pack(src, tok, 32, 1, "test")
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in src["text"]]
    flat = [t for d in docs for t in d]
    assert stats["tokens_total"] == len(flat) == stats["tokens_kept"] + stats["tokens_dropped"]
    assert stats["tokens_dropped"] < 32 and flat.count(tok.eos_token_id) == len(docs)
    assert np.asarray(packed["input_ids"]).ravel().tolist() == flat[: stats["tokens_kept"]]


def test_second_prepare_reuses_the_cache(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pretraining.pack_documents

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pretraining, "pack_documents", counting)
    recipe = data_recipe(corpus, tmp_path)
    first = prepare_data(recipe)
    assert calls["n"] > 0 and not first.stats["cache_hit"]
    calls["n"] = 0
    second = prepare_data(recipe)
    assert calls["n"] == 0 and second.stats["cache_hit"] and second.key == first.key
    assert second.train.table.column("input_ids").to_pylist() == first.train.table.column("input_ids").to_pylist()
    changed = prepare_data(data_recipe(corpus, tmp_path, seq_len=16))
    assert changed.key != first.key and not changed.stats["cache_hit"]
    assert len(changed.train) + len(changed.val) > len(first.train) + len(first.val)


def test_jsonl_template_and_mixing(tmp_path, corpus):
    rows = [{"q": f"question {i}", "a": f"answer {i} " * 20} for i in range(60)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = data_recipe(corpus, tmp_path, sources=[
        {"path": str(corpus), "weight": 3.0},
        {"path": str(tmp_path / "qa.jsonl"), "template": "Q: {q}\nA: {a}", "weight": 1.0}],
        val_fraction=0.0)
    mixed = prepare_data(recipe)
    total = mixed.stats["tokens_kept"] // 32  # packed samples of both sources before mixing
    assert len(mixed.train) == round(total * 3 / 4) + round(total / 4)
    assert mixed.stats["val_samples"] == 0
    qa = [row for row in mixed.train.table.column("input_ids").to_pylist() if mixed.tokenizer.decode(row).count("answer") > 0]
    assert abs(len(qa) - round(total / 4)) <= 1, "the QA source must fill a quarter of the samples"


def test_bad_inputs_name_the_source_and_fix(corpus, tmp_path):
    msg = data_error(corpus, tmp_path, sources=[{"path": str(tmp_path / "none.txt")}])
    assert "data.sources[0].path" in msg and "no such file" in msg
    (tmp_path / "rows.jsonl").write_text('{"body": "hello world"}\n' * 50)
    msg = data_error(corpus, tmp_path, sources=[{"path": str(tmp_path / "rows.jsonl")}])
    assert "data.sources[0].text_field: 'text' is not a column" in msg and "body" in msg
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.jsonl").write_text("")
    msg = data_error(corpus, tmp_path, sources=[{"path": str(tmp_path / "empty" / "e.jsonl")}])
    assert "data.sources[0]" in msg
    msg = data_error(corpus, tmp_path, seq_len=10_000_000)
    assert "fewer than one sample of data.seq_len=10000000" in msg
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file at all")
    msg = data_error(corpus, tmp_path, sources=[{"path": str(tmp_path / "bad.parquet")}])
    assert "could not read" in msg and "as parquet" in msg
    (tmp_path / "holes.jsonl").write_text('{"text": "hello world"}\n' * 5 + '{"other": 1}\n' + '{"text": "x"}\n')
    msg = data_error(corpus, tmp_path, sources=[{"path": str(tmp_path / "holes.jsonl")}])
    assert "data.sources[0].text_field: record 6 of" in msg and "has no 'text' value" in msg, msg


def test_empty_documents_add_no_bare_eos(corpus, tmp_path):
    import datasets

    tok = load_or_train_tokenizer(data_recipe(corpus, tmp_path), tmp_path / "cache")
    docs = datasets.Dataset.from_dict({"text": ["to be", "", "or not", ""]})
    packed, stats = tokenize_and_pack(docs, tok, 2, 1, "test")
    ids = [tok("to be", add_special_tokens=False)["input_ids"], tok("or not", add_special_tokens=False)["input_ids"]]
    assert stats["tokens_total"] == len(ids[0]) + len(ids[1]) + 2  # one EOS per non-empty document


# ---------------------------------------------------------------- the NER demo's data


def test_dictionary_baseline_scores_by_hand():
    from examples.shakespeare_ner import dictionary_baseline, tag

    train = [{"words": ["Good", "Horatio", "of", "Elsinore"], "tags": ["O", "B-PER", "O", "B-LOC"]},
             {"words": ["Sir", "Toby", "Belch"], "tags": ["B-TITLE", "B-PER", "I-PER"]}]
    assert tag(["Sir", "Toby", "Belch", "and", "Toby"], {"Toby Belch": "PER", "Toby": "PER", "Sir": "TITLE"}) == \
        ["B-TITLE", "B-PER", "I-PER", "O", "B-PER"]  # the longest match wins
    test = [{"words": ["Horatio", "met", "Ophelia", "in", "Elsinore"], "tags": ["B-PER", "O", "B-PER", "O", "B-LOC"]},
            {"words": ["Toby", "Belch", ",", "Sir"], "tags": ["B-PER", "I-PER", "O", "B-TITLE"]}]
    # the dictionary {Horatio, Elsinore, Sir, Toby Belch} finds 4 of the 5 gold entities, all right
    scores = dictionary_baseline(train, test)
    assert (scores["entity_precision"], scores["entity_recall"]) == pytest.approx((1.0, 0.8))
    assert scores["entity_f1"] == pytest.approx(2 * 0.8 / 1.8) and scores["dictionary_size"] == 4


def test_ner_demo_data_tags_unseen_plays_from_their_own_lists(tmp_path):
    """Built from the real corpus (`make data`): aligned, valid BIO; test plays held out by play."""
    from examples.shakespeare_ner import TEST_PLAYS, VAL_PLAYS, build
    from train.metrics.scores import bio_entities

    counts = build(Path(__file__).resolve().parents[1] / "data" / "shakespeare", tmp_path)
    assert min(counts.values()) > 500, counts
    splits = {s: [json.loads(line) for line in (tmp_path / f"{s}.jsonl").read_text().splitlines()]
              for s in ("train", "val", "test")}
    assert {r["play"] for r in splits["test"]} == set(TEST_PLAYS)
    assert {r["play"] for r in splits["val"]} == set(VAL_PLAYS)
    assert not {r["play"] for r in splits["train"]} & (set(TEST_PLAYS) | set(VAL_PLAYS))
    kinds = set()
    for records in splits.values():
        for r in records:
            assert len(r["words"]) == len(r["tags"]) > 0
            for i, t in enumerate(r["tags"]):
                assert t == "O" or t[:2] in ("B-", "I-")
                assert not t.startswith("I-") or r["tags"][i - 1][2:] == t[2:], r  # every I- continues an entity
            kinds |= {kind for kind, _, _ in bio_entities(r["tags"])}
    assert kinds == {"PER", "LOC", "TITLE"}
    hamlet = {(w, t) for r in splits["test"] if r["play"] == "hamlet" for w, t in zip(r["words"], r["tags"])}
    assert {("Horatio", "B-PER"), ("Ophelia", "B-PER"), ("Denmark", "B-LOC"), ("King", "B-TITLE")} <= hamlet
    assert ("Horatio", "O") not in hamlet and ("the", "O") in hamlet
    baseline = json.loads((tmp_path / "baseline.json").read_text())
    assert 0 < baseline["entity_f1"] < 1 and baseline["gold_entities"] > 1000


def test_the_epoch_permutation_is_a_keyed_bijection_computed_per_position():
    """Each epoch visits every sample once, in an order that depends on (seed, epoch); any slice of
    positions is computed alone (no array of all samples: start-up does not grow with the data),
    and over many keys every sample lands at every position about equally often."""
    from train.data.batches import GlobalSampleStream, shuffled_positions

    for n in (1, 2, 3, 5, 64, 1000, 4097):
        assert sorted(shuffled_positions(np.arange(n, dtype=np.uint64), n, (7, 0)).tolist()) == list(range(n))
    stream = GlobalSampleStream(1000, seed=7)
    whole = stream.permutation(0)
    assert np.array_equal(stream.permutation(0, 300, 310), whole[300:310])
    assert not np.array_equal(whole, stream.permutation(1)) and not np.array_equal(whole, np.arange(1000))
    assert not np.array_equal(whole, GlobalSampleStream(1000, seed=8).permutation(0))
    assert np.array_equal(stream.step_indices(1000 // 8 * 8 + 16, 8), stream.permutation(1, 16, 24))  # the second epoch
    counts = np.zeros((6, 6))
    for k in range(6000):
        counts[np.arange(6), shuffled_positions(np.arange(6, dtype=np.uint64), 6, (k, 0))] += 1
    assert counts.min() > 850 and counts.max() < 1150  # 1000 expected; a biased shuffle misses by far more
