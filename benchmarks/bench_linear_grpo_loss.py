"""Benchmark of the fused LM head + GRPO loss op ``linear_grpo_loss`` (forward + backward) against plain PyTorch.

The problem: dapo, β = 0.04, token-level importance sampling, off-policy old log-probs, rows of L = 256 fully
masked in (N = T / 256 rows). Variants, on the same inputs:
  naive_grpo    logits = h @ W.T; log_softmax; gather; grpo_loss_ref; backward (holds several [T, V] tensors)
  fused_grpo    grpo_fast.kernels.linear_grpo_loss.linear_grpo_loss (linear_logprobs → grpo_loss: never [T, V])
How memory and time are measured: benchmarks/lm_head.py (fresh subprocess per variant for memory, interleaved
repeats for time, median after one warm-up). On a shared machine CPU times are noisy; the JSON keeps every repeat.

    python benchmarks/bench_linear_grpo_loss.py          # CPU: T in {1024, 4096}; CUDA: T in {1024, 4096, 16384}
    python benchmarks/bench_linear_grpo_loss.py --quick  # a small shape, for a smoke run
"""

from __future__ import annotations

import torch
from lm_head import main

VARIANTS = ("naive_grpo", "fused_grpo")
GRPO_L = 256  # completion length: N = T / 256 rows
LOSS = dict(loss_type="dapo", beta=0.04)


def grpo_inputs(t: torch.Tensor):
    """Completion shape (N, L), old/ref log-probs ``[N, L]``, advantages ``[N]`` and mask ``[N, L]`` for targets
    ``t [T]``."""
    T = t.shape[0]
    N, L = max(1, T // GRPO_L), min(T, GRPO_L)
    gen = torch.Generator(device="cpu").manual_seed(1)
    old = (-torch.rand(N, L, generator=gen) * 12 - 5).to(t.device)  # near log(1/V) for V = 49152
    ref = old + 0.1 * torch.randn(N, L, generator=gen).to(t.device)
    adv = torch.randn(N, generator=gen).to(t.device)
    mask = torch.ones(N, L, device=t.device)
    return (N, L), old, ref, adv, mask


def make_fn(variant: str):
    """``fn(hidden [T, D], weight [V, D], targets [T]) -> loss`` of one variant."""
    from grpo_fast.kernels.grpo_loss import grpo_loss_ref
    from grpo_fast.kernels.linear_grpo_loss import linear_grpo_loss

    def naive_grpo(h, w, t):
        shape, old, ref, adv, mask = grpo_inputs(t)
        logits = h @ w.t()  # [T, V]
        logp = logits.float().log_softmax(-1).gather(1, t[:, None]).view(shape)  # [N, L]
        return grpo_loss_ref(logp, old, ref, adv, mask, **LOSS)[0]

    def fused_grpo(h, w, t):
        shape, old, ref, adv, mask = grpo_inputs(t)
        return linear_grpo_loss(h, w, t, old, ref, adv, mask, completion_shape=shape, **LOSS)[0]

    return {"naive_grpo": naive_grpo, "fused_grpo": fused_grpo}[variant]


if __name__ == "__main__":
    main(__file__, __doc__, "linear_grpo_loss", VARIANTS, make_fn)
