"""What a recipe says about data, tokenizer and model ids reaches the ranks as meant: epochs become
steps, `prepare` fills the cache `run` reuses, an override of the tokenizer path or training replaces
the other, data files are checked at load, special token ids come from the tokenizer."""

from __future__ import annotations

import pytest
import yaml

from launch.cli import main as cli_main
from train.config.loading import CONFIG_DIR, RecipeError, load_recipe
from tests.helpers import REPO
from train.config.recipe import recipe_from_dict


def problems(*overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny-cpu", list(overrides))
    return err.value.problems


def test_an_architecture_default_token_id_outside_the_vocabulary_is_dropped():
    """Phi-3's default pad_token_id (32000) would make the embedding fail on a 2048-token vocabulary."""
    from transformers import AutoModelForCausalLM

    from train.model import build_config
    from train.config.recipe import ModelConfig

    cfg = ModelConfig(config={"model_type": "phi3", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2})
    config = build_config(cfg, vocab_size=2000)
    assert config.vocab_size == 2048 and config.pad_token_id is None
    AutoModelForCausalLM.from_config(config)  # builds (it raised with padding_idx 32000 before)
    kept = build_config(ModelConfig(config={**cfg.config, "pad_token_id": 5}), vocab_size=2000)
    assert kept.pad_token_id == 5, "an id the recipe sets is kept"


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma"])
def test_a_model_trained_from_scratch_carries_its_tokenizers_special_ids(tmp_path, model_type):
    """Not the architecture's defaults (gpt2 eos 50256 outside a 512-token vocabulary, llama eos 2,
    gemma pad 0): ``generate`` must stop at the tokenizer's end of text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import make_corpus, tiny_recipe
    from train.data.tokenizer import load_or_train_tokenizer
    from train.model import build_config, token_ids
    from train.config.recipe import ModelConfig

    corpus = make_corpus(tmp_path / "corpus", files=2, words_per_file=500)
    tokenizer = load_or_train_tokenizer(recipe_from_dict(tiny_recipe(corpus, tmp_path / "cache", tmp_path / "run")),
                                        tmp_path / "cache")
    ids = token_ids(tokenizer)
    assert ids["eos_token_id"] is not None and ids["pad_token_id"] == ids["eos_token_id"]
    sizes = ({"n_embd": 32, "n_layer": 1, "n_head": 2} if model_type == "gpt2" else
             {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16})
    config = build_config(ModelConfig(config={"model_type": model_type, **sizes}), len(tokenizer), special_ids=ids)
    assert (config.bos_token_id, config.eos_token_id) == (ids["bos_token_id"], ids["eos_token_id"])
    assert config.pad_token_id is None, "padding with end of text must not freeze its embedding row"
    model = AutoModelForCausalLM.from_config(config)
    assert model.generation_config.eos_token_id == ids["eos_token_id"]
    embedding = model.get_input_embeddings()
    assert getattr(embedding, "padding_idx", None) is None
    own = build_config(ModelConfig(config={"model_type": model_type, **sizes, "eos_token_id": 3}),
                       len(tokenizer), special_ids=ids)
    assert own.eos_token_id == 3, "an id the recipe sets is kept"
    pretrained = build_config(ModelConfig(pretrained=str(REPO / "data" / "minilm")), 30522, special_ids=ids)
    assert pretrained.pad_token_id == AutoTokenizer.from_pretrained(REPO / "data" / "minilm").pad_token_id == 0


def test_epochs_set_max_steps_from_the_training_split():
    from train.config.recipe import resolve_epochs

    recipe = recipe_from_dict({"train": {"epochs": 1.5, "global_batch_size": 32, "max_steps": 7}})
    line = resolve_epochs(recipe, train_samples=1000)  # 31 full steps per epoch; the remainder is skipped
    assert recipe.train.max_steps == 47 and line == "train: 1.5 epochs of 31 steps (1000 samples / global batch 32) = 47 steps"
    unset = recipe_from_dict({"train": {"max_steps": 7}})
    assert resolve_epochs(unset, 1000) is None and unset.train.max_steps == 7


def test_prepare_fills_the_cache_that_run_then_reuses(tmp_path):
    from tests.helpers import launch_in_process, make_corpus, tiny_recipe, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(make_corpus(tmp_path / "corpus", files=3), tmp_path / "cache",
                                                           tmp_path / "run"))
    first = launch_in_process("prepare", str(recipe))
    assert first.returncode == 0 and "shardforge: data cache written:" in first.stdout, first.stdout + first.stderr
    assert "data cache reused" in launch_in_process("prepare", str(recipe)).stdout
    assert not (tmp_path / "run").exists(), "prepare writes no run directory"


def _planned_tokenizer(capsys, *args: str) -> dict:
    """`shardforge plan ARGS`: the data.tokenizer section of the resolved recipe it prints."""
    assert cli_main(["plan", *args]) == 0
    out = capsys.readouterr().out
    return yaml.safe_load(out.split("# recipe (resolved)\n", 1)[1].split("# world size", 1)[0])["data"]["tokenizer"]


def test_an_override_of_the_tokenizer_path_or_train_replaces_the_other(tmp_path, capsys):
    """tiny-cpu trains a tokenizer; `data.tokenizer.path=...` used to be ignored (a tokenizer was
    trained anyway). A recipe file that sets both is refused in one line."""
    minilm = str(REPO / "data" / "minilm")
    assert _planned_tokenizer(capsys, "tiny-cpu", f"data.tokenizer.path={minilm}") == {"path": minilm, "train": None}
    r = load_recipe("tiny-cpu", ["data.tokenizer.path=null"])  # clearing the path keeps the trained tokenizer
    assert r.data.tokenizer.path is None and r.data.tokenizer.train.vocab_size == 2048
    loads = tmp_path / "loads.yaml"
    loads.write_text((CONFIG_DIR / "tiny-cpu.yaml").read_text().replace(
        "train: {vocab_size: 2048}", f"path: {minilm}"))
    assert load_recipe(str(loads)).data.tokenizer.path == minilm
    assert _planned_tokenizer(capsys, str(loads), "data.tokenizer.train.vocab_size=1024") == \
        {"path": None, "train": {"vocab_size": 1024, "max_chars": 20_000_000}}
    both = tmp_path / "both.yaml"
    both.write_text((CONFIG_DIR / "tiny-cpu.yaml").read_text().replace(
        "train: {vocab_size: 2048}", f"train: {{vocab_size: 2048}}\n    path: {minilm}"))
    for args in ([str(both)], ["tiny-cpu", f"data.tokenizer.path={minilm}", "data.tokenizer.train.vocab_size=512"]):
        with pytest.raises(RecipeError) as err:
            load_recipe(args[0], args[1:])
        (p,) = err.value.problems
        assert p.startswith(f"data.tokenizer: sets both path ({minilm!r}, a tokenizer to load) and train"), p
        assert cli_main(["plan", *args]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and "data.tokenizer: sets both" in captured.err


def test_data_files_of_an_unsupported_format_are_refused_at_recipe_load(tmp_path):
    """Before, a .csv failed in the ranks with "unsupported file types (['None'])" after `plan` passed."""
    import datasets

    for name in ("sheet.xlsx", "notes.docx"):
        (tmp_path / name).write_bytes(b"PK\x03\x04")
        (p,) = problems(f"data.sources.0.path={tmp_path / name}")
        ext = name.rsplit(".", 1)[1]
        assert p == (f"data.sources[0].path: {str(tmp_path / name)!r} is a .{ext} file, which shardforge cannot "
                     f"read; convert it to one of .txt .json .jsonl .csv .tsv .parquet files, or a folder written "
                     f"by Dataset.save_to_disk"), p
    (p,) = problems(f"data.sources.0.path={tmp_path}")  # a folder of nothing readable
    assert p.startswith(f"data.sources[0].path: no such file or no .txt .json .jsonl .csv .tsv .parquet files in "
                        f"{str(tmp_path)!r} (it holds .docx .xlsx); fix the path"), p
    (tmp_path / "a.csv").write_text("text,label\nhi,1\n")
    (tmp_path / "b.jsonl").write_text('{"text": "hi"}\n')
    (p,) = problems(f"data.sources.0.path={tmp_path}/[ab].*")
    assert p == f"data.sources[0].path: '{tmp_path}/[ab].*' mixes csv and json files; one source reads one " \
                f"format: split it into one source per format", p
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["hi"]})}).save_to_disk(str(tmp_path / "dd"))
    (p,) = problems(f"data.sources.0.path={tmp_path / 'dd'}", "data.sources.0.split=test")
    assert p.startswith(f"data.sources[0].split: 'test' is not a split of the DatasetDict saved in "
                        f"{str(tmp_path / 'dd')!r} (splits: train); set data.sources[0].split"), p
    (p,) = problems(f"data.sources.0.path={tmp_path}", f"data.val_source.path={tmp_path / 'a.csv'}")
    assert p.startswith(f"data.sources[0].path: {str(tmp_path)!r} holds a dataset written by save_to_disk in "
                        f"{str(tmp_path / 'dd')!r}; make that folder a source of its own"), p
    for ok in (tmp_path / "a.csv", tmp_path / "dd", tmp_path / "b.jsonl"):
        assert load_recipe("tiny-cpu", [f"data.sources.0.path={ok}"], check_model=False).data.sources[0].path == str(ok)


def test_a_missing_relative_data_path_names_the_working_directory_it_was_read_from(tmp_path, monkeypatch, capsys):
    """From the user's own folder, the shipped recipe's relative corpus path is not found: the line
    says where it was looked for and where the recipe expects to be run."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["plan", "tiny-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.sources[0].path: no such file" in err, err
    assert f"(relative paths are read from the working directory, {tmp_path}; the shipped recipes expect the " \
           f"repository root, where `make demo` fetches data/shakespeare" in err, err
    assert cli_main(["plan", "tiny-cpu", f"data.sources.0.path={tmp_path / 'none.txt'}"]) == 2
    assert "working directory" not in capsys.readouterr().err, "an absolute path needs no hint"
