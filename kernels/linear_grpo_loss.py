"""Fused LM head + GRPO loss: ``linear_grpo_loss``, with a one-pass, 3-GEMM forward that also forms the gradients.

When the loss is a sum of per-token terms each depending only on its own token's log-prob (token-level importance
sampling, a loss type other than VESPO, no entropy mask, no entropy gradient), d loss / d logp of a row chunk is
known as soon as that chunk's log-probs are: the forward then turns each [C, V] logit tile into d_logits in place
and runs the two gradient GEMMs right away. Other configurations chain ``linear_logprobs`` into ``grpo_loss``
(4 GEMMs: the backward recomputes the logits). The fused pass is chunked PyTorch and serves the PyTorch backend
(CPU); where the Triton kernels run (CUDA), the chained path is faster and is always taken: on an H100 (bf16,
T = 4096, V = 49152) chained took 0.75x the naive time and the chunked fused pass 6.6x
(benchmarks/results/linear_grpo_loss_cuda.json).
Layout: chunk loop → autograd.Function → public function → ``linear_grpo_loss_ref``.
"""

from __future__ import annotations

import torch

from ._backend import use_triton
from .grpo_loss import LossOptions, grpo_loss, grpo_loss_ref, high_entropy_mask, resolve_options
from .grpo_loss import _validate as _validate_loss
from .logprob import _torch_logits, linear_logprobs, linear_logprobs_ref
from .logprob import _validate as _validate_head

# Elements of one logit tile of the fused pass (fp32: 24 MiB, 128 rows at V = 49152); it holds two. Tiles grow to
# T / 16 rows, up to twice this: every tile makes a pass over d_weight [V, D] with a K = C GEMM. Measured at
# T = 1024/4096, D = 576, V = 49152 on a busy 2-core CPU: 85-row tiles ran 15-25% slower than 128-row ones,
# 256-row ones 5-20% faster at T = 4096 (their 2 x 48 MiB are still under 5% of the naive path's memory there).
_TILE_ELEMS = 6 * 1024 * 1024


def _chunk_token_grads(logp, r0, r1, old, ref, adv, mask, opts, batch):
    """d loss / d logp at flat positions [r0, r1) → [C] fp32. Exact for a per-token-separable loss: every other
    entry of ``logp`` [N, L] is a placeholder (a later chunk's zero), which those positions' derivatives ignore."""
    x = logp.clone().requires_grad_()
    with torch.enable_grad():
        loss, _ = grpo_loss(x, old, ref, adv, mask, opts, **batch)
        (gx,) = torch.autograd.grad(loss, x)
    return gx.view(-1)[r0:r1].float()


def _fused_pass(hidden, weight, bias, targets, valid, inv_t, chunk, need, loss_args, opts, batch):
    """One pass over row chunks: logits (GEMM 1), log-softmax, logp and entropy, the per-token loss gradient g, q =
    softmax − onehot in place (p_target − 1 in fp32), then d_logits = −g·q/temperature with the per-row factor moved
    onto the [C, D] operands: d_hidden = −g ⊙ (q @ W) (GEMM 2), d_weight += qᵀ @ (−g ⊙ h) (GEMM 3),
    d_bias += qᵀ(−g). Returns logp [T], entropy [T] (fp32) and d_hidden [T, D], d_weight [V, D], d_bias [V] (fp32,
    or None when not needed)."""
    old, ref, adv, mask = loss_args
    N, L = mask.shape
    T, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    low = hidden.dtype != torch.float32
    logp = torch.zeros((T,), device=dev, dtype=torch.float32)  # zeros: placeholders for chunks not yet reached
    entropy = torch.empty((T,), device=dev, dtype=torch.float32)
    d_hidden = torch.empty((T, D), device=dev, dtype=torch.float32) if need[0] else None
    d_weight = torch.zeros((V, D), device=dev, dtype=torch.float32) if need[1] else None
    d_bias = torch.zeros((V,), device=dev, dtype=torch.float32) if need[2] else None
    c_max = max(1, min(chunk, T))
    zbuf = torch.empty((c_max, V), device=dev, dtype=torch.float32)  # logits → log p → p·log p
    pbuf = torch.empty_like(zbuf)  # p → softmax − onehot
    for r0 in range(0, T, c_max):
        r1 = min(T, r0 + c_max)
        c = r1 - r0
        h, tgt, ok = hidden[r0:r1], targets[r0:r1], valid[r0:r1]  # [C, D], [C], [C]
        z = zbuf[:c]  # [C, V]
        if low:
            z.copy_(_torch_logits(h, weight, bias, inv_t))
        elif bias is not None:
            torch.addmm(bias, h, weight.t(), beta=inv_t, alpha=inv_t, out=z)
        else:
            torch.mm(h, weight.t(), out=z)
            if inv_t != 1.0:
                z.mul_(inv_t)
        torch.log_softmax(z, dim=1, out=z)  # one fused pass per row
        logp[r0:r1] = torch.where(ok, z.gather(1, tgt[:, None]).squeeze(1), 0.0)
        q = pbuf[:c]  # [C, V]
        torch.exp(z, out=q)
        entropy[r0:r1] = torch.where(ok, z.mul_(q).sum(1).neg_(), 0.0)
        g = _chunk_token_grads(logp.view(N, L), r0, r1, old, ref, adv, mask, opts, batch)  # [C]
        neg_g = torch.where(ok, g * -inv_t, 0.0)  # [C]; ignored rows pass no gradient, even a NaN one
        q[torch.arange(c, device=dev), tgt] -= 1.0  # p_target − 1, in fp32 before any scaling
        if d_bias is not None:
            d_bias.addmv_(q.t(), neg_g)
        q_mm = q.to(hidden.dtype) if low else q
        if d_hidden is not None:
            if low:
                d_hidden[r0:r1] = (q_mm @ weight).float().mul_(neg_g[:, None])
            else:
                torch.mm(q_mm, weight, out=d_hidden[r0:r1]).mul_(neg_g[:, None])
        if d_weight is not None:
            gh = h * neg_g[:, None].to(h.dtype)  # [C, D]
            if low:
                d_weight += q_mm.t() @ gh
            else:
                d_weight.addmm_(q_mm.t(), gh)
        del q, q_mm
    return logp, entropy, d_hidden, d_weight, d_bias


class _AttachGrads(torch.autograd.Function):
    """Gives an already computed loss value the gradients the fused pass formed: backward scales them by the scalar
    grad_output. The fp32 buffers are scaled in place and released, so a second backward raises."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, d_hidden, d_weight, d_bias):
        ctx.grads = (d_hidden, d_weight, d_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_grpo_loss: the fused path's gradients were already consumed by a backward")
        grads, ctx.grads = ctx.grads, None
        g = grad_loss.float()
        out = [None if t is None else t.mul_(g).to(dt) for t, dt in zip(grads, ctx.dtypes)]
        return None, *out, None, None, None


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
    ``[N, L]``, ``advantages [N]``. With z = (hidden @ weight.T + bias) / temperature, logp[t] = log_softmax(z[t])
    at targets[t]; then ``grpo_loss(logp, ..., entropy=entropy)`` (every other keyword is ``grpo_loss``'s;
    ``top_entropy_quantile < 1`` masks the policy term with ``high_entropy_mask`` of the entropies, as TRL).

    Paths (same values; gradients flow to hidden, weight and bias):
      - fused, on the PyTorch backend (CPU), when the loss is a sum of per-token terms each depending only on its own
        logp (token-level IS, a loss type other than vespo, ``top_entropy_quantile == 1``) and a gradient is needed:
        ONE pass over row chunks of ``chunk_size`` rows computes the logits (GEMM 1), logp, entropy, g = d loss / d
        logp of the chunk (exact: autograd of ``grpo_loss`` taken at the chunk's entries, the others being
        placeholders the separable loss ignores), d_logits = g·(onehot − softmax)/temperature in place (p_target − 1
        in fp32), d_hidden += d_logits @ W (GEMM 2), d_weight += d_logitsᵀ @ h (GEMM 3), d_bias += Σ d_logits. The
        forward keeps the fp32 gradients [T, D], [V, D], [V] (cast to the input dtype in the backward, which only
        scales them by the scalar upstream gradient): 3 GEMMs in all, two [C, V] fp32 tiles and O(T) floats besides.
        One backward per call (the buffers are consumed).
      - chained otherwise (the Triton backend, sequence-level IS, vespo, entropy mask, or no gradient needed):
        ``linear_logprobs`` → ``grpo_loss``; the backward recomputes the logits (4 GEMMs).
    The loss value and metrics always come from ``grpo_loss`` on the full logp, so both paths report the same.

    Args:
        chunk_size: rows of logits per tile (default: T / 16 rows, within 24-48 MiB of fp32 per tile; 128-256 rows
            at V = 49152). The chained path passes it to ``linear_logprobs``.
        return_logp: also return logp [N, L] and entropy [N, L] (fp32, detached).
    Returns:
        ``(loss, metrics)``, or ``(loss, metrics, logp, entropy)`` with ``return_logp=True``.
    """
    N, L = completion_shape
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
    V = weight.shape[0]
    base = max(1, _TILE_ELEMS // V)
    chunk = chunk_size if chunk_size is not None else min(2 * base, max(base, hidden.shape[0] // 16))
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    fused = (
        opts.importance_sampling_level == "token" and opts.loss_type != "vespo" and top_entropy_quantile >= 1.0
        and torch.is_grad_enabled() and any(need) and not use_triton(hidden)
    )  # fmt: skip
    if fused:
        valid = targets != ignore_index  # [T]
        tgt = torch.where(valid, targets, 0)  # ignored rows read column 0; their results are zeroed
        old = old_logp.detach() if old_logp is not None else None
        ref = ref_logp.detach() if ref_logp is not None else None
        loss_args = (old, ref, advantages.detach(), mask)
        with torch.no_grad():
            logp, entropy, d_h, d_w, d_b = _fused_pass(hidden.detach(), weight.detach(),
                                                       bias.detach() if bias is not None else None, tgt, valid,
                                                       1.0 / temperature, chunk, need, loss_args, opts, batch)
            logp, entropy = logp.view(N, L), entropy.view(N, L)  # [N, L]
            loss, metrics = grpo_loss(logp, old, ref, advantages.detach(), mask, opts, entropy=entropy, **batch)
        loss = _AttachGrads.apply(loss, hidden, weight, bias, d_h, d_w, d_b)
    else:
        logp, entropy = linear_logprobs(hidden, weight, targets, temperature, bias, return_entropy=True,
                                        ignore_index=ignore_index, chunk_size=chunk_size)
        logp = logp.view(N, L)  # [N, L]
        entropy = entropy.detach().view(N, L)  # [N, L]
        emask = high_entropy_mask(entropy, mask, top_entropy_quantile) if top_entropy_quantile < 1.0 else None
        loss, metrics = grpo_loss(logp, old_logp, ref_logp, advantages, mask, opts, entropy=entropy,
                                  entropy_mask=emask, **batch)
    if return_logp:
        return loss, metrics, logp.detach(), entropy
    return loss, metrics


def linear_grpo_loss_ref(
    hidden, weight, targets, old_logp, ref_logp, advantages, mask, options=None, *, completion_shape, temperature=1.0,
    bias=None, top_entropy_quantile=1.0, ignore_index=-100, return_logp=False, chunk_size=None, **keywords,
):
    """Plain PyTorch: materialized [T, V] logits (``linear_logprobs_ref``) → ``grpo_loss_ref``, in the inputs' dtype
    (float64 inputs give the oracle). Same signature and returns; ``chunk_size`` is ignored."""
    N, L = completion_shape
    logp, entropy = linear_logprobs_ref(hidden, weight, targets, temperature, bias, return_entropy=True,
                                        ignore_index=ignore_index)
    logp = logp.view(N, L)  # [N, L]
    entropy = entropy.detach().view(N, L)  # [N, L]
    emask = high_entropy_mask(entropy, mask, top_entropy_quantile) if top_entropy_quantile < 1.0 else None
    dt = logp.dtype
    loss, metrics = grpo_loss_ref(logp, *(None if t is None else t.to(dt) for t in (old_logp, ref_logp)),
                                  advantages.to(dt), mask, options, entropy=entropy, entropy_mask=emask, **keywords)
    if return_logp:
        return loss, metrics, logp.detach(), entropy
    return loss, metrics
