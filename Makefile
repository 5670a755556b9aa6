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

.PHONY: venv demo test test-fast bench assets check-cuda clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The C++ extension (csrc/) is built against the torch in .venv, so the package is installed
# without build isolation, after torch and the build tools.
$(STAMP): $(PY) setup.py pyproject.toml $(wildcard csrc/*)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)"
	$(PY) -m pip install -q "setuptools>=64" wheel ninja pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	@$(PY) -c "import json; i = json.load(open('invdiff/_build_info.json')); print('invdiff._C:', 'built' if i.get('built') else 'NOT built: ' + i.get('reason', '?'))"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/invdiff demo --out demo_out

test: $(STAMP) check-cuda
	$(PY) -m pytest -q tests

# Compile-check the CUDA sources with nvcc against torch's headers (nothing runs without a GPU).
check-cuda: $(STAMP)
	bash scripts/check_cuda.sh $(PY)

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only

assets: $(STAMP)
	$(PY) scripts/make_assets.py

clean:
	rm -rf $(VENV) demo_out build *.egg-info invdiff/_C*.so invdiff/_build_info.json
