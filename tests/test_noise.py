"""Known library noise is filtered narrowly (``train/noise.py``): transformers' new-head LOAD REPORT
becomes one line and any other report stays whole; peft's ``is_gradient_checkpointing`` warning
goes and other FutureWarnings stay; datasets' flattening and saving bars go and its others stay."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from tests.helpers import REPO
from train.noise import (TRANSFORMERS_MODELING, LoadReportFilter, load_report_line, quiet_bar_class,
                         silence_known_noise)

MINILM = REPO / "data" / "minilm"


def _report(model_name: str, **keys) -> str:
    """The message transformers 5.x logs for these load results (its own code builds the table)."""
    from transformers.utils.loading_report import LoadStateDictInfo

    info = LoadStateDictInfo(missing_keys=set(keys.get("missing", ())), unexpected_keys=set(keys.get("unexpected", ())),
                             mismatched_keys=set(keys.get("mismatched", ())), error_msgs=[], conversion_errors={},
                             skipped_pp_keys=set())
    return f"{model_name} LOAD REPORT from: data/minilm\n" + info.create_loading_report()


@pytest.fixture
def load_reports():
    """What transformers' modeling logger emits while LoadReportFilter is on it (the library's own
    logger does not propagate, so the records are collected on it)."""
    logger = logging.getLogger(TRANSFORMERS_MODELING)
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler, noise = Collect(), LoadReportFilter()
    logger.addFilter(noise)
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)
    logger.removeFilter(noise)


@pytest.mark.skipif(not MINILM.exists(), reason="data/minilm: run `make finetune-data`")
def test_a_new_task_head_on_a_pretrained_model_is_one_line(load_reports):
    import transformers

    transformers.AutoModelForTokenClassification.from_pretrained(str(MINILM), num_labels=3)
    reports = [m for m in load_reports if "BertForTokenClassification" in m]
    assert reports == [f"BertForTokenClassification from {MINILM}: new task head classifier.bias, classifier.weight "
                       f"initialised from run.seed; not used from the checkpoint: pooler.dense.bias, "
                       f"pooler.dense.weight"], load_reports


@pytest.mark.parametrize("keys", [
    {"missing": ["bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"]},  # the wrong checkpoint
    {"missing": ["classifier.weight"], "mismatched": [("bert.embeddings.word_embeddings.weight", (10, 4), (12, 4))]},
    {"missing": ["classifier.weight"], "unexpected": ["bert.encoder.layer.6.output.dense.weight"]},  # extra layers
    {"unexpected": ["pooler.dense.weight"]},  # no new head: not the known case
])
def test_any_other_load_report_is_left_whole(keys):
    assert load_report_line(_report("BertForTokenClassification", **keys)) is None
    assert load_report_line("Some other warning") is None


@pytest.fixture
def restored(monkeypatch):
    """silence_known_noise's process-wide changes undone after the test (its warning filters are
    undone by ``warnings.catch_warnings``)."""
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.auto.tqdm)
    logger = logging.getLogger(TRANSFORMERS_MODELING)
    before = list(logger.filters)
    yield
    logger.filters[:] = before


def test_the_gradient_checkpointing_future_warning_goes_and_others_stay(restored):
    import transformers

    model = transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=8, vocab_size=10))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert model.is_gradient_checkpointing is False
        assert any("is_gradient_checkpointing" in str(w.message) for w in seen), "the warning this test filters"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_known_noise()
        assert getattr(model, "is_gradient_checkpointing", True) is False  # what peft does
        warnings.warn_explicit("`something_else` is deprecated", FutureWarning, "modeling_utils.py", 1,
                               module=TRANSFORMERS_MODELING)
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)  # this module's: kept
        single = "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a " \
                 "single process."  # what export's one-process checkpoint read raises
        warnings.warn_explicit(single, UserWarning, "utils.py", 485, module="torch.distributed.checkpoint.utils")
        warnings.warn_explicit("another dcp warning", UserWarning, "utils.py", 485,
                               module="torch.distributed.checkpoint.utils")
    assert [str(w.message) for w in seen] == ["`something_else` is deprecated",
                                              "`is_gradient_checkpointing` is deprecated", "another dcp warning"]


def test_only_the_known_bars_are_turned_off():
    from tqdm import tqdm

    bars = quiet_bar_class(tqdm)
    for desc, off in (("Flattening the indices", True), ("Saving the dataset (0/1 shards)", True),
                      ("data.sources[0]: tokenize", False), ("Generating train split", False), (None, False)):
        bar = bars(total=1, desc=desc, file=open(os.devnull, "w"))
        assert bar.disable is off, desc
        bar.close()


def test_datasets_writes_the_cache_without_its_flattening_and_saving_bars(tmp_path):
    """In a fresh interpreter, as a rank or ``shardforge prepare`` does: silence, then import datasets."""
    script = (f"from train.noise import silence_known_noise\n"
              f"silence_known_noise()\n"
              f"import datasets\n"
              f"ds = datasets.Dataset.from_dict({{'x': list(range(50))}}).select(range(49, -1, -1))\n"
              f"ds = ds.map(lambda r: r, desc='tokenize here')\n"
              f"ds.flatten_indices().save_to_disk({str(tmp_path / 'saved')!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_DISABLE_PROGRESS_BARS"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokenize here" in proc.stderr, "datasets' other bars still show"
    assert "Flattening the indices" not in proc.stderr and "Saving the dataset" not in proc.stderr, proc.stderr
    assert (tmp_path / "saved" / "state.json").exists()
