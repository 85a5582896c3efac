"""``triton`` and ``triton.language`` when installed, else inert stand-ins so the kernel modules still import.

Triton is a Linux-only dependency; on other platforms the CPU paths of every op work and the ``@triton.jit``
functions below are plain, never-launched Python functions (dispatch never picks them: see _backend.use_triton).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests/test_packaging.py in a subprocess
    HAS_TRITON = False

    class _Language:
        constexpr = object  # only used as an annotation

        def __getattr__(self, name):
            return None

    class _Triton:
        language = _Language()

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*args, **kwargs):
            return lambda f: f

        @staticmethod
        def heuristics(*args, **kwargs):
            return lambda f: f

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(int(n) - 1, 0).bit_length()

    triton = _Triton()
    tl = triton.language

__all__ = ["HAS_TRITON", "tl", "triton"]
