"""Shared test fixtures. Lives in tests/ (never the repo root) so the checkout's ``kernels/`` folder is not on
``sys.path``: tests import the installed ``grpo_fast.kernels``.
"""

from __future__ import annotations

import os

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


@pytest.fixture
def assert_close_2x():
    """The precision-aware bound of STYLE.md rule 6: ``|ours - ref64| <= 2 * |plain - ref64| + atol`` (max norms),
    where ``plain`` is the plain PyTorch implementation evaluated in the same dtype as ``ours``."""

    def _check(ours: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, atol: float = 1e-5, name: str = ""):
        ours, ref64, plain = ours.double(), ref64.double(), plain.double()
        assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
        assert torch.isfinite(ours).all(), f"{name}: non-finite values in the result"
        err = (ours - ref64).abs().max().item() if ours.numel() else 0.0
        base = (plain - ref64).abs().max().item() if ours.numel() else 0.0
        assert err <= 2 * base + atol, f"{name}: error {err:.3e} > 2 x plain error {base:.3e} + atol {atol:.1e}"

    return _check
