"""Every op's benchmark as pytest-benchmark cases: ours and its baseline on one small shape each, grouped by op.

    make bench-ops                                     # all cases, saved under .benchmarks/ for comparisons
    make bench-ops BENCH_OPS_ARGS=--benchmark-compare  # the same, compared with the last saved run
    .venv/bin/pytest-benchmark compare --group-by=group --columns=median,iqr  # saved runs side by side

The variants, inputs and baselines are the benchmark scripts' own (bench_<op>.py); the shapes are small so that the
whole file runs in about a minute on a CPU (the scripts measure the real sizes). Each ours-variant is checked
against its baseline on the same inputs first, forward and gradients, and is skipped, not timed, when they differ.
On the CPU the Triton ops dispatch to their PyTorch paths (TRITON_INTERPRET is no speed, so it is refused here);
with a CUDA device every case runs there. ``make test`` does not collect this file (testpaths = tests).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SYNC = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

if os.environ.get("TRITON_INTERPRET") == "1" and DEVICE == "cpu":
    pytest.skip("TRITON_INTERPRET=1: the Triton interpreter is not a speed measure", allow_module_level=True)


@pytest.fixture(autouse=True)
def _record_setup(request):
    """Device, versions and torch threads in every case's ``extra_info`` (pytest-benchmark adds machine and commit)."""
    from common import versions

    if "benchmark" in request.fixturenames:
        name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu ({os.cpu_count()} cores)"
        request.getfixturevalue("benchmark").extra_info.update(device=name, threads=torch.get_num_threads(),
                                                                **versions())


def _close_or_skip(ours, base, rtol, atol, what):
    """Skips the calling case (the op is not timed) when ``ours`` and ``base`` (tensors or lists) differ."""
    for a, b in zip(ours if isinstance(ours, (list, tuple)) else [ours], base if isinstance(base, (list, tuple))
                    else [base]):
        if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol):
            pytest.skip(f"{what}: differs from the baseline by {(a.float() - b.float()).abs().max().item():.2e}")


def _lm_head_grads(fn, h, w, t):
    h.grad = w.grad = None
    out = fn(h, w, t)
    out.sum().backward()
    return [out.detach(), h.grad.clone(), w.grad.clone()]


def _lm_head_case(benchmark, script: str, variant: str, what: str, atol: float):
    """An LM-head op's case: forward + backward at T=512, D=128, V=8192; ``VARIANTS[0]`` of ``script`` is the
    baseline."""
    from lm_head import inputs, stepper

    module = __import__(script)
    benchmark.group = f"{what} T=512 D=128 V=8192"
    h, w, t = inputs(512, 128, 8192, "float32", DEVICE)
    base = module.VARIANTS[0]
    if variant != base:
        _close_or_skip(_lm_head_grads(module.make_fn(variant), h, w, t),
                       _lm_head_grads(module.make_fn(base), h, w, t), 1e-4, atol, what)
    benchmark(stepper(module.make_fn(variant), h, w, t, DEVICE))


@pytest.mark.parametrize("variant", ["naive", "ours"])
def test_logprob(benchmark, variant):
    _lm_head_case(benchmark, "bench_logprob", variant, "logprob", 1e-5)


@pytest.mark.parametrize("variant", ["naive_grpo", "fused_grpo"])
def test_linear_grpo_loss(benchmark, variant):
    _lm_head_case(benchmark, "bench_linear_grpo_loss", variant, "linear_grpo_loss", 1e-6)


@pytest.mark.parametrize("variant", ["ref", "ours"])
def test_grpo_loss(benchmark, variant):
    from bench_grpo_loss import LOSS, VARIANTS, inputs

    benchmark.group = "grpo_loss N=64 L=1024"
    logp, *rest, ent = inputs(64, 1024, DEVICE)

    def step(fn):
        x = logp.detach().clone().requires_grad_()
        loss = fn(x, *rest, entropy=ent, **LOSS)[0]
        loss.backward()
        SYNC()
        return [loss.detach(), x.grad]

    if variant != "ref":
        _close_or_skip(step(VARIANTS[variant]), step(VARIANTS["ref"]), 1e-5, 1e-7, "grpo_loss")
    benchmark(step, VARIANTS[variant])


@pytest.mark.parametrize("variant", ["ref", "torch", "triton"])
def test_advantages(benchmark, variant):
    from bench_advantages import forced_backend, make_fn, max_error, rewards, unavailable

    benchmark.group = "advantages N=4096 R=4 G=8"
    if why := unavailable(variant, DEVICE):
        pytest.skip(why)
    x = rewards(4096, 4, DEVICE)
    fn, backend = make_fn(variant, 8)
    if (err := max_error(fn, backend, x, 8, "group", "sum_then_normalize")) > 1e-3:
        pytest.skip(f"group_advantages ({variant}): max abs error {err:.2e} against the fp64 reference")

    def call():
        fn(x)
        SYNC()

    with forced_backend(backend):
        benchmark(call)


@pytest.mark.parametrize("variant", ["sdpa_expanded", "ours"])
def test_prefix_attention(benchmark, variant):
    from bench_prefix_attention import inputs, make_fn, tolerance

    benchmark.group = "prefix_attention B=4 G=8 P=512 Ls=64"
    x = inputs(4, 8, 512, 64, torch.float32, DEVICE)
    fn = make_fn(variant)
    if variant != "sdpa_expanded":
        with torch.no_grad():
            _close_or_skip(fn(x), make_fn("sdpa_expanded")(x), 0.0, tolerance(torch.float32), "prefix_attention")

    @torch.no_grad()
    def call():
        fn(x)
        SYNC()

    benchmark(call)


@pytest.mark.parametrize("variant", ["padded", "shared_prefix"])
def test_shared_prefix(benchmark, variant):
    from bench_shared_prefix import _batch, _step_fn

    from grpo_fast.testing import tiny_causal_lm

    benchmark.group = "shared_prefix update B=1 G=8 P=256 L=32, tiny Llama"
    model = tiny_causal_lm("llama", vocab_size=512, hidden_size=128, init_std=0.02).to(DEVICE)
    batch = _batch(256, 32, 8, 512, DEVICE)

    def step(v):
        model.zero_grad(set_to_none=True)
        logp = _step_fn(model, v, batch, 0)()
        SYNC()
        return [logp] + [p.grad.clone() for p in model.parameters()]

    if variant != "padded":
        _close_or_skip(step(variant), step("padded"), 1e-4, 1e-5, "shared-prefix forward")
    benchmark(step, variant)
