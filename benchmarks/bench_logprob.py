"""Benchmark of the fused LM-head log-prob op ``linear_logprobs`` (forward + backward) against the plain PyTorch path.

For each T it times forward+backward (median of repeats after one warm-up) and measures peak extra memory for:
  naive    logits = h @ W.T; log_softmax; gather; backward (holds several [T, V] tensors)
  ours     grpo_fast.kernels.logprob.linear_logprobs (chunked torch path on CPU, Triton on CUDA)
  compile  torch.compile of the naive function (not chunked; skipped with a note when compilation fails)
  compile_chunked  the compiled naive function over 1024-row chunks under activation checkpointing (the usual
           "chunk it in PyTorch" answer: recomputes each chunk's logits in the backward)
  liger    Liger's fused linear cross-entropy, only when liger_kernel is importable
How memory and time are measured: benchmarks/lm_head.py (fresh subprocess per variant for memory, interleaved
repeats for time). Simplifications: loss = logp.sum() (upstream gradient of ones), no bias, no entropy. On a shared
machine CPU times are noisy; the JSON keeps every repeat. The LM head + GRPO loss is bench_linear_grpo_loss.py.

    python benchmarks/bench_logprob.py            # CPU: T in {1024, 4096}; CUDA: T in {1024, 4096, 16384}
    python benchmarks/bench_logprob.py --quick    # a small shape, for a smoke run
"""

from __future__ import annotations

import torch
from lm_head import main

VARIANTS = ("naive", "ours", "compile", "compile_chunked", "liger")
CHUNK_ROWS = 1024  # rows per checkpointed chunk of the compile_chunked variant


def naive(h, w, t):
    logits = h @ w.t()  # [T, V]
    return logits.float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)  # [T]


def make_fn(variant: str):
    """``fn(hidden [T, D], weight [V, D], targets [T]) -> logp [T]`` of one variant."""
    if variant == "ours":
        from grpo_fast.kernels.logprob import linear_logprobs

        return lambda h, w, t: linear_logprobs(h, w, t)
    if variant == "naive":
        return naive
    if variant == "compile":
        return torch.compile(naive)
    if variant == "compile_chunked":
        from torch.utils.checkpoint import checkpoint

        compiled = torch.compile(naive)

        def chunked(h, w, t):
            parts = [
                checkpoint(compiled, h[i : i + CHUNK_ROWS], w, t[i : i + CHUNK_ROWS], use_reentrant=False)
                for i in range(0, h.shape[0], CHUNK_ROWS)
            ]
            return torch.cat(parts)

        return chunked
    if variant == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none")
    raise ValueError(variant)


if __name__ == "__main__":
    main(__file__, __doc__, "logprob", VARIANTS, make_fn, needs={"liger": "liger_kernel"})
