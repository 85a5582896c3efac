"""Backend dispatch shared by every op: compiled Triton on CUDA tensors, a PyTorch path on the CPU.

``GRPO_FAST_BACKEND=torch|triton`` forces one. Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``
(the interpreter runs the same kernels on the host; that is how the tests exercise them).
"""

from __future__ import annotations

import os

import torch

from ._triton import HAS_TRITON

_VALID = ("auto", "torch", "triton")


def triton_available() -> bool:
    return HAS_TRITON


def backend() -> str:
    """The backend requested by ``GRPO_FAST_BACKEND`` ('auto' when unset)."""
    name = os.environ.get("GRPO_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in _VALID:
        raise ValueError(f"GRPO_FAST_BACKEND must be one of {_VALID}, got {name!r}")
    return name


def use_triton(t: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernels on tensors like ``t``."""
    name = backend()
    if name == "torch":
        return False
    if name == "triton":
        if not triton_available():
            raise RuntimeError("GRPO_FAST_BACKEND=triton but triton is not installed")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("GRPO_FAST_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return t.is_cuda and triton_available()
