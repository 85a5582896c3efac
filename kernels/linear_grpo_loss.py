"""Fused LM head + GRPO loss: ``linear_grpo_loss`` chains ``linear_logprobs`` into ``grpo_loss``, so a training step
never holds the [T, V] logits, forward or backward (the backward recomputes them per chunk: 4 GEMMs in all).

Why no one-pass variant that forms the gradients in the forward (3 GEMMs, not 4): it only pays on the PyTorch
(CPU) backend, where it measured 1.2-1.7x faster than this chain for the LM head + loss alone (a few % of a
SmolLM2-135M update, the head being ~19% of its FLOPs), and cannot serve sequence-level IS, vespo, the entropy
mask or an entropy gradient. On CUDA the chain runs Triton kernels: on an H100 (bf16, V = 49152) it took 0.71x
the naive time at T = 4096 and 0.59x at T = 16384 (benchmarks/results/linear_grpo_loss_cuda.json).
Layout: public function → ``linear_grpo_loss_ref``.
"""

from __future__ import annotations

import torch

from .grpo_loss import _validate as _validate_loss
from .grpo_loss import grpo_loss, grpo_loss_ref, high_entropy_mask
from .logprob import _validate as _validate_head
from .logprob import _autocast_inputs, linear_logprobs, linear_logprobs_ref
from .loss_options import LossOptions, resolve_options


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    options: LossOptions | None = None,
    *,
    completion_shape: tuple[int, int],
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    top_entropy_quantile: float = 1.0,
    ignore_index: int = -100,
    return_logp: bool = False,
    chunk_size: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
    num_processes: int = 1,
    **option_keywords,
):
    """Fused LM head + GRPO loss (TRL 1.16 ``_compute_loss`` semantics), never materializing the [T, V] logits.

    ``hidden [T, D]`` and ``targets [T]`` are the completion positions flattened row-major, ``T = N·L`` with
    ``completion_shape=(N, L)`` (padding included; ``mask [N, L]`` removes it; a target equal to ``ignore_index``
    gives logp = entropy = 0 and no gradient). ``weight [V, D]``, ``bias [V]``; ``old_logp``, ``ref_logp``
    ``[N, L]``, ``advantages [N]``. With y = hidden @ weight.T + bias, z = y / temperature (``softcap`` c: z =
    c·tanh(y/c) / temperature), logp[t] = log_softmax(z[t]) at targets[t] (``linear_logprobs``, chunks of
    ``chunk_size`` rows; under ``torch.autocast`` the head computes as ``nn.Linear`` does there); then
    ``grpo_loss(logp, ..., entropy=entropy)`` with ``options`` / option keywords and the per-batch arguments as
    in ``grpo_loss``; ``top_entropy_quantile < 1`` masks the policy term with ``high_entropy_mask`` of the
    entropies, as TRL. Gradients flow to hidden, weight and bias.

    Returns:
        ``(loss, metrics)``, or ``(loss, metrics, logp, entropy)`` with ``return_logp=True`` (logp and entropy
        ``[N, L]`` fp32, detached).
    """
    N, L = completion_shape
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _validate_head(hidden, weight, targets, temperature, bias, chunk_size,
                   (torch.float32, torch.bfloat16, torch.float16))  # fmt: skip
    if hidden.shape[0] != N * L:
        raise ValueError(f"hidden must be [N*L, D] = [{N * L}, D] for completion_shape={completion_shape}, "
                         f"got {tuple(hidden.shape)}")  # fmt: skip
    for name in ("entropy", "entropy_mask"):
        if name in option_keywords:
            raise ValueError(f"linear_grpo_loss computes {name} itself; do not pass it")
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    opts = resolve_options(options, option_keywords, "linear_grpo_loss")
    batch = dict(num_items_in_batch=num_items_in_batch, gradient_accumulation_steps=gradient_accumulation_steps,
                 steps_per_generation=steps_per_generation, num_processes=num_processes)
    placeholder = torch.empty((N, L), device=hidden.device, dtype=torch.float32)
    _validate_loss(placeholder, old_logp, ref_logp, advantages, mask, None, None, opts, batch)
    logp, entropy = linear_logprobs(hidden, weight, targets, temperature, bias, return_entropy=True,
                                    ignore_index=ignore_index, chunk_size=chunk_size, softcap=softcap)
    logp = logp.view(N, L)  # [N, L]
    entropy = entropy.detach().view(N, L)  # [N, L]
    emask = high_entropy_mask(entropy, mask, top_entropy_quantile) if top_entropy_quantile < 1.0 else None
    loss, metrics = grpo_loss(logp, old_logp, ref_logp, advantages, mask, opts, entropy=entropy, entropy_mask=emask,
                              **batch)
    if return_logp:
        return loss, metrics, logp.detach(), entropy
    return loss, metrics


def linear_grpo_loss_ref(
    hidden, weight, targets, old_logp, ref_logp, advantages, mask, options=None, *, completion_shape, temperature=1.0,
    bias=None, softcap=None, top_entropy_quantile=1.0, ignore_index=-100, return_logp=False, chunk_size=None,
    **keywords,
):
    """Plain PyTorch: materialized [T, V] logits (``linear_logprobs_ref``) → ``grpo_loss_ref``, in the inputs' dtype
    (float64 inputs give the oracle). Same signature and returns; ``chunk_size`` is ignored."""
    N, L = completion_shape
    logp, entropy = linear_logprobs_ref(hidden, weight, targets, temperature, bias, return_entropy=True,
                                        ignore_index=ignore_index, softcap=softcap)
    logp = logp.view(N, L)  # [N, L]
    entropy = entropy.detach().view(N, L)  # [N, L]
    emask = high_entropy_mask(entropy, mask, top_entropy_quantile) if top_entropy_quantile < 1.0 else None
    dt = logp.dtype
    loss, metrics = grpo_loss_ref(logp, *(None if t is None else t.to(dt) for t in (old_logp, ref_logp)),
                                  advantages.to(dt), mask, options, entropy=entropy, entropy_mask=emask, **keywords)
    if return_logp:
        return loss, metrics, logp.detach(), entropy
    return loss, metrics
