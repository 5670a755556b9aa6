# Each target first creates or refreshes .venv idempotently.
# TORCH_SPEC picks the torch build (default: the CPU build on these machines); an importable
# torch in .venv is kept as it is.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Triton runs the kernels on CUDA and, in its interpreter, in the CPU tests. 3.8.0 lies on disk here.
TRITON_SPEC ?= triton==3.8.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.invdiff-installed

.PHONY: venv demo test test-fast bench assets clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/invdiff demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only

assets: $(STAMP)
	$(PY) scripts/make_assets.py

clean:
	rm -rf $(VENV) demo_out build *.egg-info
