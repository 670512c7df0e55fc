# The two commands of the README's quick start: `make demo` and `make test`.
# Both create .venv on first use (about 2 minutes), then reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# This machine kind keeps the CPU build of torch on local disk; elsewhere pip takes torch from PyPI.
TORCH_WHEELS := $(wildcard /opt/wheels)

.PHONY: demo demo-full test test-fast test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS)) torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,split]"
	touch $(STAMP)

# `make demo`: plain LoRA caught, DP-LoRA at chance, the control, the report card (about 2 min on 2 cores).
demo: $(STAMP)
	$(BIN)/privdiff demo

# `make demo-full` adds SMP-LoRA and the early-stopped plain LoRA (about 4.5 min in all on 2 cores).
demo-full: $(STAMP)
	$(BIN)/privdiff demo --full

# CI runs `make test` (lint-imports, then about 9.5 min of tests on 2 cores with the venv installed); `make test-all` adds the long end-to-end tests.
test: $(STAMP)
	$(BIN)/lint-imports
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not long" --durations=25

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not long"

test-all: $(STAMP)
	$(BIN)/lint-imports
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_finetune.py
	$(BIN)/python benchmarks/bench_evaluate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
