"""Data prepared by many tasks (issue 36 item 3): each task tokenizes its share of the files into a
shard of the cache entry; the shards join into the entry one process writes (key, samples, their
order, token counts); a preparation that finds an entry's shards incomplete refuses it in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import make_corpus, tiny_recipe, write_recipe
from train.data.prepare import prepare_data, prepare_share
from train.data.shards import shards_dir, units
from train.data.sources import DataError
from train.config.recipe import recipe_from_dict


def _tokens(data) -> list[np.ndarray]:
    return [np.asarray(split.table.column("input_ids").to_pylist(), dtype=np.int32) for split in (data.train, data.val)]


def _mixed_data(tmp: Path) -> tuple[Path, Path, Path]:
    """Three sources split into files: text with an empty file and documents cut into pieces on worker
    processes; jsonl records with a blank file; csv records with a file that holds none."""
    corpus = make_corpus(tmp / "corpus", files=6, words_per_file=300)
    big = make_corpus(tmp / "big", files=2, words_per_file=100_000, seed=1)  # 600 kB each: cut into pieces
    for name, text in zip(("doc01.txt", "doc03.txt"), sorted(big.iterdir())):  # both task 1's: 2 workers
        shutil.copy(text, corpus / name)
    (corpus / "empty.txt").write_text("")
    rows = tmp / "rows"
    rows.mkdir(exist_ok=True)
    for i in range(3):
        (rows / f"part{i}.jsonl").write_text("".join(json.dumps({"text": f"record {i}.{j} " * (j % 7 + 1)}) + "\n"
                                                     for j in range(300)))
    (rows / "part3.jsonl").write_text("\n")  # not empty, no records: nothing, as in the whole source
    table = tmp / "table"
    table.mkdir(exist_ok=True)
    (table / "a.csv").write_text("text\n" + "".join(f"row {i} of the table\n" for i in range(200)))
    (table / "b.csv").write_text("text\n")  # a header alone: no records either
    return corpus, rows, table


def _mixed_recipe(tmp: Path, corpus: Path, rows: Path, table: Path, cache: str):
    """The sources mixed 4:2:1, cached in ``tmp/cache``: the recipe and its file."""
    recipe = tiny_recipe(corpus, tmp / cache, tmp / "run")
    recipe["data"].update(sources=[{"path": str(corpus), "weight": 4.0}, {"path": str(rows), "weight": 2.0},
                                   {"path": str(table), "weight": 1.0}], num_proc=2, seq_len=64)
    return recipe_from_dict(recipe), write_recipe(tmp / f"{cache}.yaml", recipe)


def test_two_shards_join_into_the_cache_one_process_writes(tmp_path, capsys, logged):
    from launch.cli import main

    data = _mixed_data(tmp_path)
    one, _ = _mixed_recipe(tmp_path, *data, "one")
    whole = prepare_data(one)
    many, path = _mixed_recipe(tmp_path, *data, "many")
    (tmp_path / "many").mkdir()
    shutil.copytree(tmp_path / "one" / "tokenizers", tmp_path / "many" / "tokenizers")  # a shared cache's
    assert [u.src.path.rsplit("/", 1)[-1] for u in units(many)] == [
        "doc00.txt", "doc01.txt", "doc02.txt", "doc03.txt", "doc04.txt", "doc05.txt", "part0.jsonl",
        "part1.jsonl", "part2.jsonl", "a.csv", "b.csv"]  # empty and blank files add nothing and are left out

    assert prepare_share(many, 1, 2) is None  # task 0 has not run
    assert any("task(s) 0 of 2 have not finished" in line for line in logged), logged
    with pytest.raises(DataError) as err:  # a training start, or `shardforge prepare`, refuses
        prepare_data(many)
    msg = str(err.value)
    assert "\n" not in msg and "task(s) 0 have not finished" in msg and "--tasks 2" in msg, msg
    capsys.readouterr()
    assert main(["prepare", str(path)]) == 2  # `shardforge prepare` too, in one line
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "task(s) 0 have not finished" in err, err
    with pytest.raises(DataError, match="holds the shards of 2 tasks, not 3"):
        prepare_share(many, 0, 3)

    joined = prepare_share(many, 0, 2)
    assert joined is not None and joined.key == whole.key and not joined.stats["cache_hit"]
    for a, b in zip(_tokens(joined), _tokens(whole)):
        assert a.shape == b.shape and (a == b).all()
    drop = ("seconds", "cache_hit")
    assert {k: v for k, v in joined.stats.items() if k not in drop} == \
        {k: v for k, v in whole.stats.items() if k not in drop}
    out = Path(many.data.cache_dir) / joined.key
    assert not shards_dir(out).exists(), "the shards go once the entry is written"
    again = prepare_data(many)
    assert again.stats["cache_hit"] and again.key == whole.key


def test_bad_task_numbers_exit_2_in_one_line(capsys):
    from launch.cli import main

    assert main(["prepare", "tiny-cpu", "--task", "2", "--tasks", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "0 <= task < tasks" in err, err
