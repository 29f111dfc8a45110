# The two commands a user needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

# Reuse an installed torch (e.g. a CUDA build on a GPU box, seen through
# --system-site-packages); otherwise install the pinned CPU build, never the CUDA wheels.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,eval]"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/achilles demo --out-dir runs/demo

test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/stage1.py

clean:
	rm -rf runs .pytest_cache
