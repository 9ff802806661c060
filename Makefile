# `make test` and `make demo` work on a fresh machine: each builds the local virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch: on these machines pip takes it from the local disk (no CUDA download).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Axolotl pins exact transformers/trl/peft/accelerate/datasets versions, so its tests get a venv of their own.
# 0.19.0 is the newest release for Python 3.11 (0.20+ need Python >= 3.12).
AXOLOTL_VENV ?= .venv-axolotl
AXOLOTL_SPEC ?= axolotl==0.19.0
AXOLOTL_STAMP := $(AXOLOTL_VENV)/.installed

.PHONY: venv test demo bench gpu-test clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# ~240 packages (torch stays the local CPU build), 4 GB installed; --no-compile skips byte-compiling them
# all, a third of the build time.
$(AXOLOTL_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(AXOLOTL_VENV)
	$(AXOLOTL_VENV)/bin/python -m pip install -q --upgrade pip
	$(AXOLOTL_VENV)/bin/python -m pip install -q --no-compile "$(TORCH_SPEC)" "$(AXOLOTL_SPEC)" pytest -e .
	touch $(AXOLOTL_STAMP)

# The main suite deselects tests/plugins/test_axolotl.py (axolotl is not in $(VENV)); it runs in its own venv,
# with the GRPO trainer tests again there: axolotl pins TRL 1.9, whose GRPO normalizations differ from 1.16's.
test: $(STAMP) $(AXOLOTL_STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 -m "not gpu" tests
	$(AXOLOTL_VENV)/bin/python -m pytest -q --durations=5 tests/plugins/test_axolotl.py tests/plugins/test_trl.py \
		-k "axolotl or grpo"

demo: $(STAMP)
	$(VENV)/bin/liger-plugins demo

# GPU machine (torch/triton preinstalled there): parity tests at real sizes, then benchmarks.
gpu-test:
	LIGER_TEST_DEVICE=cuda $(PYTHON) -m pytest -q tests/ops tests/losses

bench:
	$(PYTHON) -m liger_plugins.cli bench --out docs/bench

clean:
	rm -rf $(VENV) $(AXOLOTL_VENV) .pytest_cache
