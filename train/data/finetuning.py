"""Fine-tuning data: records → fixed-length tokenized samples with labels, split and cached.

Unlike pre-training, nothing is packed: one record is one sample, right-padded to
``data.seq_len`` (the loader trims each micro-batch to its longest sample), with

* ``sft``: ``labels`` = the token ids of the response (or assistant turns) and -100 on the prompt
  and padding, so the loss ignores prompt tokens;
* ``sequence_classification``: ``labels`` = the class id; the label map (sorted labels found in
  the training split) is saved with the data and, by the trainer, with the model;
* ``token_classification``: ``text_field`` holds a list of words and ``label_field`` a tag per
  word; the tag goes on the first sub-token of each word, -100 on the rest.

Splits: ``val_source`` / ``test_source`` when given, else ``val_fraction`` / ``test_fraction``
of the records (a seeded shuffle). The cache key covers everything that shapes the samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np

from train.data.cache import PreparedData, fingerprint, read_cache, source_stamps, write_cache
from train.data.sources import DataError, check_template, load_records
from train.data.tokenizer import tokenizer_fingerprint
from train.config.recipe import Recipe, SourceConfig
from train.tasks import IGNORE

logger = logging.getLogger("shardforge")

FORMAT_VERSION = 3  # 2: chat assistant headers are no longer learned; 3: CHAT_TEMPLATE's newlines render
CHAT_TEMPLATE = ("{% for m in messages %}{{ '\\n' if not loop.first else '' }}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '\\n' if messages else '' }}<|assistant|>\n{% endif %}")
"""Used for chat records when the tokenizer brings no chat template of its own, and saved with the
run's tokenizer (``stats.json`` keeps it for cache hits), so the exported model is prompted the way
it was trained. Each newline between turns is an expression: transformers renders templates with
``trim_blocks``, which drops a newline written after a ``{% ... %}`` tag."""


def _pad(ids: list[int], length: int, value: int) -> list[int]:
    return ids + [value] * (length - len(ids))


class Featurizer:
    """Turns one source's records into samples for the recipe's task."""

    def __init__(self, recipe: Recipe, tokenizer, where: str, src: SourceConfig):
        self.recipe, self.tok, self.where, self.src = recipe, tokenizer, where, src
        self.seq_len, self.d, self.Error = recipe.data.seq_len, recipe.data, DataError
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _need(self, columns: list[str], name: str, key: str) -> None:
        if name not in columns:
            raise self.Error(f"{self.where}: no column {name!r} in {self.src.path!r} (columns: "
                             f"{', '.join(columns)}); set {key}")

    def _text(self, row: dict) -> str:
        return self.src.template.format_map(row) if self.src.template else str(row[self.src.text_field])

    def check(self, columns: list[str]) -> None:
        task, d = self.recipe.task, self.d
        if task == "sft":
            if d.prompt_field in columns or self.src.template:
                self._need(columns, d.response_field, "data.response_field")
            else:
                self._need(columns, d.messages_field, "data.prompt_field or data.messages_field")
        else:
            if not self.src.template:
                self._need(columns, self.src.text_field, f"{self.where}.text_field")
            self._need(columns, d.label_field, "data.label_field")

    # ---- one record → (input_ids, labels)

    def sft(self, row: dict) -> Optional[dict]:
        d, tok = self.d, self.tok
        if self.src.template or d.prompt_field in row:
            prompt = self.src.template.format_map(row) if self.src.template else str(row[d.prompt_field])
            pieces = [(prompt, False), (str(row[d.response_field]), True)]
            ids, labels = [], []
            if tok.bos_token_id is not None:
                ids, labels = [tok.bos_token_id], [IGNORE]
            for text, learn in pieces:
                part = tok(text, add_special_tokens=False)["input_ids"]
                ids += part
                labels += part if learn else [IGNORE] * len(part)
            ids.append(tok.eos_token_id)
            labels.append(tok.eos_token_id)
        else:
            ids, labels = self._chat(row[d.messages_field])
        ids, labels = ids[: self.seq_len], labels[: self.seq_len]
        if all(x == IGNORE for x in labels[1:]):  # the prompt filled seq_len: nothing to learn
            return None
        return {"input_ids": ids, "labels": labels}

    def _chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Render the chat turn by turn; learn the assistant turns' content and end, ignore the rest
        (the other turns and each assistant turn's header)."""
        tok = self.tok
        if not getattr(tok, "chat_template", None):
            tok.chat_template = CHAT_TEMPLATE
        ids, labels, before = [], [], ""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise self.Error(f"{self.where}: {self.d.messages_field} holds {message!r}; expected "
                                 f"a list of {{role, content}} mappings")
            text = tok.apply_chat_template(messages[: i + 1], tokenize=False)
            if not text.startswith(before):
                raise self.Error(f"{self.where}: the tokenizer's chat template does not render turn "
                                 f"by turn (turn {i} rewrites earlier text); use prompt/response records")
            head = self._assistant_header(messages[:i], before, text) if message["role"] == "assistant" else ""
            header = tok(head, add_special_tokens=False)["input_ids"] if head else []
            part = tok(text[len(before) + len(head):], add_special_tokens=False)["input_ids"]
            ids += header + part
            labels += [IGNORE] * len(header) + (part if message["role"] == "assistant" else [IGNORE] * len(part))
            before = text
        return ids, labels

    def _assistant_header(self, history: list[dict], before: str, text: str) -> str:
        """The text the template puts before an assistant turn's content (its role header), which is
        not learned: what ``add_generation_prompt`` adds to the history. "" when the template does
        not render it as a prefix of the turn (then the whole turn is learned)."""
        try:
            prompt = self.tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that cannot render this history alone (e.g. an empty one)
            return ""
        if prompt.startswith(before) and text.startswith(prompt):
            return prompt[len(before):]
        return ""

    def sequence_classification(self, row: dict) -> Optional[dict]:
        enc = self.tok(self._text(row), truncation=True, max_length=self.seq_len)
        return {"input_ids": enc["input_ids"], "labels": row[self.d.label_field]}

    def token_classification(self, row: dict) -> Optional[dict]:
        words, tags = row[self.src.text_field], row[self.d.label_field]
        if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
            raise self.Error(f"{self.where}: token classification needs a list of words in "
                             f"{self.src.text_field!r} and as many tags in {self.d.label_field!r}; "
                             f"got {str(words)[:60]} / {str(tags)[:60]}")
        enc = self.tok([str(w) for w in words], is_split_into_words=True, truncation=True,
                       max_length=self.seq_len)
        labels, previous = [], None
        for word in enc.word_ids():
            labels.append(tags[word] if word is not None and word != previous else None)
            previous = word
        return {"input_ids": enc["input_ids"], "labels": labels}

    def batch(self, batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        make = getattr(self, self.recipe.task)
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for i in range(n):
            sample = make({k: batch[k][i] for k in batch})
            if sample is not None:
                out["input_ids"].append(sample["input_ids"])
                out["labels"].append(sample["labels"])
        return out


def _featurize(recipe: Recipe, tokenizer, src: SourceConfig, where: str):
    records = load_records(src, where, recipe.data.max_record_mb)
    check_template(src, records, where)
    f = Featurizer(recipe, tokenizer, where, src)
    f.check(records.column_names)
    out = records.map(f.batch, batched=True, remove_columns=records.column_names,
                      desc=f"{where}: tokenize for {recipe.task}")
    if len(out) < len(records) and recipe.task == "sft":
        logger.warning(f"data: {where}: dropped {len(records) - len(out)} of {len(records)} records whose prompt "
                       f"fills data.seq_len={recipe.data.seq_len}")
    return out


def _label_names(train, task: str) -> list:
    if task == "sequence_classification":
        values = set(train["labels"])
    else:
        values = {t for row in train["labels"] for t in row if t is not None}
    return sorted(values, key=lambda v: (not isinstance(v, (int, np.integer)), v if isinstance(v, (int, np.integer)) else str(v)))


def _encode(ds, recipe: Recipe, names: list, pad_id: int, where: str):
    """Labels → ids, padding to ``seq_len``, an attention mask."""
    task, seq_len = recipe.task, recipe.data.seq_len
    index = {v: i for i, v in enumerate(names)}

    def encode(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            if task == "sequence_classification":
                if labels not in index:
                    raise DataError(f"{where}: label {labels!r} does not occur in the training data "
                                    f"(labels: {', '.join(map(str, names))}); fix the data or add "
                                    f"training examples of it")
                label: Any = index[labels]
            elif task == "token_classification":
                unknown = [t for t in labels if t is not None and t not in index]
                if unknown:
                    raise DataError(f"{where}: tag {unknown[0]!r} does not occur in the training data "
                                    f"(tags: {', '.join(map(str, names))}); fix the data")
                label = _pad([IGNORE if t is None else index[t] for t in labels], seq_len, IGNORE)
            else:
                label = _pad(labels, seq_len, IGNORE)
            out["input_ids"].append(_pad(ids, seq_len, pad_id))
            out["attention_mask"].append(_pad([1] * len(ids), seq_len, 0))
            out["labels"].append(label)
        return out

    return ds.map(encode, batched=True, desc=f"{where}: pad to {seq_len}")


def _split(ds, fraction: float, seed: int, salt: int):
    """(held-out, rest) by a seeded shuffle of the records."""
    n = int(round(len(ds) * fraction)) if fraction > 0 else 0
    order = np.random.default_rng([seed, salt]).permutation(len(ds))
    return ds.select(np.sort(order[:n])), ds.select(np.sort(order[n:]))


def task_cache_key(recipe: Recipe, tokenizer) -> str:
    d = recipe.data
    return fingerprint({"task": recipe.task, "sources": [asdict(s) for s in d.sources], "files": source_stamps(recipe),
                  "seq_len": d.seq_len,
                  "val": [d.val_fraction, d.val_source and asdict(d.val_source)],
                  "test": [d.test_fraction, d.test_source and asdict(d.test_source)],
                  "fields": [d.label_field, d.prompt_field, d.response_field, d.messages_field],
                  "max_samples": d.max_samples, "tokenizer": tokenizer_fingerprint(tokenizer),
                  "seed": recipe.run.seed, "v": FORMAT_VERSION})


def prepare_task_data(recipe: Recipe, tokenizer):
    """Tokenize, label, split and cache the data of a fine-tuning task; a :class:`PreparedData`."""
    d = recipe.data
    key = task_cache_key(recipe, tokenizer)
    out = Path(d.cache_dir).expanduser() / key
    if not (out / "stats.json").exists():
        import datasets

        start = time.time()
        had_template = bool(getattr(tokenizer, "chat_template", None))
        parts = [_featurize(recipe, tokenizer, s, f"data.sources[{i}]") for i, s in enumerate(d.sources)]
        train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        test = _featurize(recipe, tokenizer, d.test_source, "data.test_source") if d.test_source else None
        if test is None:
            test, train = _split(train, d.test_fraction, recipe.run.seed, 13)
        val = _featurize(recipe, tokenizer, d.val_source, "data.val_source") if d.val_source else None
        if val is None:
            val, train = _split(train, d.val_fraction, recipe.run.seed, 7)
        if d.max_samples is not None:
            train = train.select(range(min(d.max_samples, len(train))))
        if len(train) == 0:
            raise DataError("data: no training records left after holding out validation and test "
                            "records; lower data.val_fraction / data.test_fraction or add data")
        names = _label_names(train, recipe.task) if recipe.task != "sft" else []
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        splits = {"train": _encode(train, recipe, names, pad_id, "data.sources"),
                  "val": _encode(val, recipe, names, pad_id, "data.val_source" if d.val_source else "data (val split)"),
                  "test": _encode(test, recipe, names, pad_id, "data.test_source" if d.test_source else "data (test split)")}
        stats: dict[str, Any] = {"task": recipe.task, "labels": [str(n) for n in names], "seq_len": d.seq_len,
                 **{f"{k}_samples": len(v) for k, v in splits.items()},
                 "label_tokens": int(sum(np.sum(np.asarray(x) != IGNORE) for x in splits["train"]["labels"]))
                 if recipe.task != "sequence_classification" else None,
                 "seconds": round(time.time() - start, 2),
                 "chat_template": None if had_template else getattr(tokenizer, "chat_template", None)}
        write_cache(out, splits, stats)
        logger.info(f"data: {recipe.task}: {stats['train_samples']:,} train, {stats['val_samples']:,} val, "
                    f"{stats['test_samples']:,} test records of at most {d.seq_len} tokens"
                    + (f"; {len(names)} labels: {', '.join(stats['labels'][:10])}" if names else "")
            + f" (cache {out})")
        cache_hit = False
    else:
        cache_hit = True
    stats, load = read_cache(out, ("train", "val", "test"), ("input_ids", "attention_mask", "labels"))
    stats["cache_hit"] = cache_hit
    if stats.get("chat_template") and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = stats["chat_template"]  # the template the samples were rendered with
    return PreparedData(load("train"), load("val"), tokenizer, key, stats, test=load("test"),
                        labels=stats["labels"] or None)
