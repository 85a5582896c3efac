"""Shared test fixtures. Lives in tests/ (never the repo root) so the checkout's ``kernels/`` folder is not on
``sys.path``: tests import the installed ``grpo_fast.kernels``.
"""

from __future__ import annotations

import os
import types

import torch

# The Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def force_backend(monkeypatch):
    """``force_backend("triton")`` makes every op dispatch to that backend for the rest of the test."""

    def _force(name: str) -> None:
        monkeypatch.setenv("GRPO_FAST_BACKEND", name)

    return _force


@pytest.fixture
def spy(monkeypatch):
    """``calls = spy(owner, "name")`` wraps ``owner.name`` for the rest of the test: each call still runs the real one
    and appends its ``(args, kwargs)`` to ``calls``."""

    def _spy(owner, name: str) -> list:
        calls, real = [], getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append((args, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
        return calls

    return _spy


@pytest.fixture
def poison(monkeypatch):
    """Within a test, ``torch.empty``/``empty_like``/``new_empty`` return NaN-filled float tensors, so an output a
    kernel forgot to write shows up as NaN instead of as whatever the allocator left there."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))
    yield


# The precision-aware bound of STYLE.md rule 6, in one place. An implementation computed in dtype X passes when
#     max|ours − ref64| <= 2 · max(max|plain − ref64|, floor),   floor = ULPS · eps(X) · scale,
# with `plain` the plain PyTorch implementation run in X on the same machine (so the bound follows this CPU's
# rounding, whatever its vector width). The floor stands in for a plain error that is unrepresentatively small: a
# scalar whose rounding errors happened to cancel (one sample, not the typical error) or a value plain PyTorch gets
# exact. `scale` is the magnitude the rounding acts on: max|ref64| by default (each element carries at least its
# own rounding); for a reduction that may cancel (a loss), `condition_scale`: Σ|∂f/∂x|·|x| over f's inputs, the
# first-order error of a backward-stable computation being eps·Σ|∂f/∂x_i|·|x_i|; for gradients deep in a model,
# `ulp_response_scales`; for a K-term GEMM, √K·max(|A|·|B|) (tests/test_logprob.py). A bound built this way still
# fails a missing 1/temperature, a normalizer off by one token or bf16-rounded log-probs by 100x or more
# (tests/test_linear_grpo_loss.py::test_bound_catches_injected_bugs).
ULPS = 8
NUMERICS_MODULES = ("test_grpo_loss", "test_linear_grpo_loss", "test_logprob", "test_advantages",
                    "test_prefix_attention", "test_trl_parity_loss", "test_trl_dropin", "test_shared_prefix",
                    "test_models")


def pytest_collection_modifyitems(items):
    """Marks the numerics tests (`-m numerics`; CI reruns them under other ATen vector widths): every test of the
    modules above and any test using the precision bound."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module is not None else ""
        if module in NUMERICS_MODULES or "assert_close_2x" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.numerics)


def condition_scale(*pairs: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Σ|∂f/∂x|·|x| over (gradient, input) pairs of a scalar f, in float64: the `scale` of f's rounding floor."""
    return sum((g.double() * x.double()).abs().sum().item() for g, x in pairs if g is not None)


def ulp_response_scales(model: torch.nn.Module, grads_fn, ref_grads: dict, dtype: torch.dtype = torch.float32,
                        seed: int = 1) -> dict[str, float]:
    """Floor scales for a float64 model's parameter gradients ``ref_grads`` (name → tensor): how far one ulp of
    ``dtype`` on every weight (random signs) moves them, over eps. A backward-stable computation in ``dtype`` gives
    the exact result of weights perturbed by O(eps), so this is the scale of its error — for gradients deep in a
    network, sums that cancel, far above the gradient's own magnitude. ``grads_fn()`` recomputes the gradients
    (name → tensor); the weights are restored afterwards."""
    eps, gen = torch.finfo(dtype).eps, torch.Generator().manual_seed(seed)
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + eps * (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype))
            p.grad = None
    moved = grads_fn()
    with torch.no_grad():
        for p, v in zip(model.parameters(), saved):
            p.copy_(v)
            p.grad = None
    return {k: (moved[k].double() - g.double()).abs().max().item() / eps for k, g in ref_grads.items()
            if g is not None}


def check_2x(ours: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, *, name: str = "",
             scale: float | None = None, dtype: torch.dtype | None = None, atol: float = 0.0) -> None:
    """Asserts the bound above (max norms; NaN must sit where ref64 has NaN). ``dtype`` is the precision the
    computation ran in (default: plain's dtype); ``atol`` adds absolute slack for a rounding the floor cannot
    model (no test here needs it)."""
    eps = torch.finfo(dtype or plain.dtype).eps
    ours, ref64, plain = ours.detach().cpu().double(), ref64.detach().cpu().double(), plain.detach().cpu().double()
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    nan = ref64.isnan()
    assert torch.equal(ours.isnan(), nan), f"{name}: NaN where the reference has none, or the reverse"
    assert torch.isfinite(ours[~nan]).all(), f"{name}: non-finite values in the result"
    ours, ref64, plain = ours[~nan], ref64[~nan], plain[~nan]
    if not ours.numel():
        return
    err = (ours - ref64).abs().max().item()
    base = (plain - ref64).abs().max().item()
    scale = ref64.abs().max().item() if scale is None else scale
    floor = ULPS * eps * scale
    bound = 2 * max(base, floor) + atol
    report = os.environ.get("GRPO_FAST_NUMERICS_REPORT")
    if report:  # how close each check sits to its bound, for auditing tolerances on a new CPU
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(report, "a") as f:
            f.write(f"{err / bound if bound else float(err > 0):.3f} {test} {name!r} err={err:.2e} plain={base:.2e} "
                    f"floor={floor:.2e}\n")
    assert err <= bound, (f"{name}: error {err:.3e} > 2 x max(plain error {base:.3e}, floor {floor:.3e})"
                          + (f" + atol {atol:.1e}" if atol else ""))


@pytest.fixture
def assert_close_2x():
    """``check_2x`` as a fixture (test modules cannot import conftest under --import-mode=importlib)."""
    return check_2x


@pytest.fixture
def numerics():
    """The bound's helpers: ``check_2x``, ``condition_scale``, ``ulp_response_scales``, ``ULPS``."""
    return types.SimpleNamespace(check_2x=check_2x, condition_scale=condition_scale,
                                 ulp_response_scales=ulp_response_scales, ULPS=ULPS)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """A tiny random-init Llama saved to disk, for trainers that load by path (TRL builds its reference model,
    beta > 0, from the path)."""
    from grpo_fast.testing import tiny_causal_lm

    path = tmp_path_factory.mktemp("model")
    tiny_causal_lm(seed=1).save_pretrained(path)
    return str(path)
