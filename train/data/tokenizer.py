"""The tokenizer: loaded from a path or the pretrained model, or a byte-level BPE trained once on
the training text and cached by a fingerprint of its sources and settings."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

from train.data.cache import DATA_FORMAT_VERSION, fingerprint
from train.data.documents import leading_text
from train.data.sources import DataError
from train.rundir import first_line
from train.config.recipe import DataConfig, Recipe


def load_or_train_tokenizer(recipe: Recipe, cache_root: Path):
    """A fast tokenizer with an EOS token: loaded from a path or trained (once, cached)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = recipe.data.tokenizer
    if cfg.train is None:
        name = cfg.path or recipe.model.pretrained
        if name is None:
            raise DataError("data.tokenizer: no tokenizer given; set data.tokenizer.path, "
                            "model.pretrained, or data.tokenizer.train.vocab_size")
        try:
            tok = AutoTokenizer.from_pretrained(name, use_fast=True)
        except Exception as err:
            where = broken_json(Path(name)) or repr(name)
            raise DataError(f"data.tokenizer.path: cannot load tokenizer {where}: "
                            f"{first_line(err)}; fix the path or the file") from None
        if tok.eos_token_id is None:
            tok.eos_token = tok.sep_token or tok.pad_token
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    key = fingerprint({"sources": [asdict(s) for s in recipe.data.sources], "train": asdict(cfg.train),
                 "v": DATA_FORMAT_VERSION})
    out = cache_root / "tokenizers" / key
    if not (out / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        texts = _training_text(recipe.data, cfg.train.max_chars)
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.train.vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tk.train_from_iterator(texts, trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
        tmp = out.with_name(out.name + f".tmp-{socket.gethostname()}-{os.getpid()}")
        fast.save_pretrained(tmp)
        try:  # the tasks of a prepare job may train it at once: the first one's copy is kept
            os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
        except OSError:
            if not (out / "tokenizer.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(out))
    except Exception as err:  # a damaged cache entry
        raise DataError(f"data.tokenizer.train: cannot load the tokenizer trained before, {broken_json(out) or out}: "
                        f"{first_line(err)}; delete {out} to train it again") from None


def broken_json(folder: Path) -> Optional[str]:
    """The first JSON file in a local tokenizer folder that does not parse (``'path' (line L)``)."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(errors="replace"))
        except ValueError as err:
            return f"{str(path)!r} (line {getattr(err, 'lineno', '?')})"
        except OSError:
            return repr(str(path))
    return None


def _training_text(cfg: DataConfig, max_chars: int) -> Iterator[str]:
    """The first ``max_chars`` characters of the training sources, document by document (a text
    file is read only as far as needed)."""
    seen = 0
    for i, src in enumerate(cfg.sources):
        for text in leading_text(src, f"data.sources[{i}]", cfg.max_record_mb, max_chars - seen):
            seen += len(text)
            yield text
            if seen >= max_chars:
                return


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
