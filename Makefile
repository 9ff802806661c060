# `make test` and `make demo` work on a fresh machine: each builds the local virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch: on these machines pip takes it from the local disk (no CUDA download).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench gpu-test clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 -m "not gpu" tests

demo: $(STAMP)
	$(VENV)/bin/liger-plugins demo

# GPU machine (torch/triton preinstalled there): parity tests at real sizes, then benchmarks.
gpu-test:
	LIGER_TEST_DEVICE=cuda $(PYTHON) -m pytest -q tests/ops tests/losses

bench:
	$(PYTHON) -m liger_plugins.cli bench --out docs/bench

clean:
	rm -rf $(VENV) .pytest_cache
