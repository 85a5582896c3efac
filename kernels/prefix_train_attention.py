"""Training-mode attention over a packed batch: each prompt once, its G completions attending to it (cascade).

The policy update feeds B prompts and N = B·G completions. Instead of copying each prompt G times, the packed
batch holds prompt rows ``[B, P]`` (right-padded) and completion rows ``[N, L]``; per layer:

- prompt tokens attend causally within their own prompt (fused SDPA; right padding needs no mask because a real
  token never sees a later pad);
- completion tokens attend to their group's prompt keys/values — ONE batched matmul per (prompt, kv head):
  ``[(H/Hkv)·G·L, Dh] × [Dh, P]``, the keys never copied — and causally to their own earlier tokens. The two
  score blocks share one softmax (an exact log-sum-exp merge: both exponentiate against the same row max).

Gradients flow into the prompt keys/values from all G completions (the batched matmul's backward sums them); the
row max is a constant shift, detached because its exact gradient is zero.

Two PyTorch implementations of the completion part (``impl``; the module-level ``IMPL`` sets the default):

- ``"matmul"`` (the CPU default): the batched matmuls above; it materializes the ``[(H/Hkv)·G·L, P]`` fp32 score
  blocks, and ``recompute_scores`` trades one more forward of this part for not keeping them (measured on SmolLM2-
  135M shapes, P = 1024, G = 8, L = 64, one CPU thread: 50 → 8 MiB kept per layer, +25% time of this op).
- ``"sdpa"`` (the CUDA default): each completion's keys are ``cat(its prompt's keys, its own keys)`` under one
  boolean mask, fed to PyTorch's fused memory-efficient attention, forward and backward: no score matrix is kept
  and far fewer kernels launch, at the price of one ``[N, H, P + L, Dh]`` copy of the keys and values per layer
  (what the padded forward holds anyway). The prompt's MLP and projections still run once per group.
  On an H100 (bf16, SmolLM2-135M shapes) the matmul form was 3x slower than the padded forward at P = 32.

Under ``TRITON_INTERPRET`` nothing here changes. A fused flash-style Triton kernel that reads the prompt keys once
per group is the next step for long prompts on GPUs.
Layout: helper → public function → ``prefix_train_attention_ref``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IMPL = "auto"  # "auto" (sdpa on CUDA, matmul elsewhere), "sdpa" or "matmul"; see the module docstring
_IMPLS = ("auto", "sdpa", "matmul")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and probabilities in fp32 at least (bf16 scores double the error of stock attention)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _cascade(q, pk, pv, ck, cv, prefix_valid, suffix_valid, dropout):
    """Completion rows against [group prompt ∪ own causal suffix], one softmax. q ``[B, Hkv, g, G, L, Dh]`` (pre-
    scaled), pk/pv ``[B, Hkv, P, Dh]``, ck/cv ``[B, Hkv, 1, G, L, Dh]`` → ``[B, Hkv, g, G, L, Dh]``."""
    B, Hkv, g, G, L, Dh = q.shape
    P = pk.shape[2]
    s_pre = torch.matmul(q.reshape(B, Hkv, g * G * L, Dh), pk.transpose(-1, -2))  # [B, Hkv, g·G·L, P]
    s_pre = s_pre.view(B, Hkv, g, G, L, P)
    if prefix_valid is not None:
        s_pre = s_pre.masked_fill(~prefix_valid.view(B, 1, 1, 1, 1, P), float("-inf"))
    s_suf = torch.matmul(q, ck.transpose(-1, -2))  # [B, Hkv, g, G, L, L]
    s_suf = s_suf.masked_fill(~suffix_valid.view(B, 1, 1, G, L, L), float("-inf"))

    # Every row sees ≥ 1 prompt key, so the max is finite and no row is all -inf.
    m = torch.maximum(s_pre.amax(-1), s_suf.amax(-1)).detach().unsqueeze(-1)  # [B, Hkv, g, G, L, 1]
    e_pre = torch.exp(s_pre - m)  # [B, Hkv, g, G, L, P]
    e_suf = torch.exp(s_suf - m)  # [B, Hkv, g, G, L, L]
    denom = e_pre.sum(-1, keepdim=True) + e_suf.sum(-1, keepdim=True)  # [B, Hkv, g, G, L, 1]
    if dropout > 0.0:
        e_pre = F.dropout(e_pre, dropout)
        e_suf = F.dropout(e_suf, dropout)
    o = torch.matmul(e_pre.view(B, Hkv, g * G * L, P), pv).view(B, Hkv, g, G, L, Dh)
    return (o + torch.matmul(e_suf, cv)) / denom  # [B, Hkv, g, G, L, Dh]


def _concat_sdpa(comp_q, prompt_k, prompt_v, comp_k, comp_v, prefix_valid, suffix_valid, G, scale, dropout):
    """Completion rows through fused SDPA over ``cat(prompt keys, own keys)``: q ``[N, H, L, Dh]``, prompt k/v
    ``[B, Hkv, P, Dh]``, completion k/v ``[N, Hkv, L, Dh]`` → ``[N, H, L, Dh]``. The prompt keys are repeated per
    completion (their gradient sums back through ``repeat_interleave``) and per query head of a kv group."""
    N, H, L, _ = comp_q.shape
    B, Hkv, P, _ = prompt_k.shape
    g = H // Hkv
    k = torch.cat([prompt_k.repeat_interleave(G, dim=0), comp_k], dim=2)  # [N, Hkv, P + L, Dh]
    v = torch.cat([prompt_v.repeat_interleave(G, dim=0), comp_v], dim=2)
    if g > 1:  # explicit heads: the fused kernels take a mask only without enable_gqa
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [N, H, P + L, Dh]
    pre = (prefix_valid.repeat_interleave(G, dim=0)[:, None, :].expand(N, L, P) if prefix_valid is not None
           else suffix_valid.new_ones(N, L, P))  # fmt: skip
    mask = torch.cat([pre, suffix_valid], dim=2)[:, None]  # [N, 1, L, P + L]
    return F.scaled_dot_product_attention(comp_q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def prefix_train_attention(
    prompt_q: torch.Tensor,
    prompt_k: torch.Tensor,
    prompt_v: torch.Tensor,
    prefix_valid: torch.Tensor | None,
    comp_q: torch.Tensor,
    comp_k: torch.Tensor,
    comp_v: torch.Tensor,
    suffix_valid: torch.Tensor,
    group_size: int,
    scale: float,
    dropout: float = 0.0,
    recompute_scores: bool = False,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a packed shared-prefix batch, forward and (through autograd) backward.

    Args:
        prompt_q: ``[B, H, P, Dh]`` queries of the right-padded prompt rows (any strides).
        prompt_k, prompt_v: ``[B, Hkv, P, Dh]``; head ``h`` reads kv head ``h // (H / Hkv)``.
        prefix_valid: ``[B, P]`` bool, True on the real tokens of each prompt (a prefix of the row, length ≥ 1);
            ``None`` when every prompt fills its row (skips one masking pass over the ``[.., P]`` scores).
        comp_q: ``[N, H, L, Dh]`` completion queries, completion ``n`` belonging to prompt ``n // G``.
        comp_k, comp_v: ``[N, Hkv, L, Dh]``.
        suffix_valid: ``[N, L, L]`` bool: query ``i`` may see key ``j`` of its own completion (causal ∧ key kept).
        group_size: G.
        scale: softmax scale (usually ``Dh ** -0.5``).
        dropout: attention-probability dropout (training only).
        recompute_scores: keep only q/k/v of the completion part for the backward and recompute its
            ``[(H/Hkv)·G·L, P]`` score blocks there (activation checkpointing of this part): saves
            ``N·H·L·P`` fp32 per layer for one more forward of the completion part (``"matmul"`` only).
        impl: ``"sdpa"``, ``"matmul"`` or ``"auto"`` (sdpa on CUDA); default the module-level ``IMPL``.

    Returns:
        ``(prompt_out [B, H, P, Dh], comp_out [N, H, L, Dh])`` in the input dtype, where for completion query
        ``(n, h, i)`` with ``b = n // G``::

            s_j = scale · q·k_j over  {prompt_k[b, j] : prefix_valid[b, j]} ∪ {comp_k[n, j] : suffix_valid[n, i, j]}
            out = Σ_j softmax(s)_j · v_j

        Rows of prompt padding hold finite values nobody should read.
    """
    B, H, P, Dh = prompt_q.shape
    N, _, L, _ = comp_q.shape
    Hkv = prompt_k.shape[1]
    G = group_size
    if N != B * G:
        raise ValueError(f"comp_q has {N} rows; expected B * group_size = {B} * {G}")
    if H % Hkv or comp_k.shape[1] != Hkv:
        raise ValueError(f"{H} query heads cannot share {Hkv} kv heads (comp_k has {comp_k.shape[1]})")
    if (prefix_valid is not None and prefix_valid.shape != (B, P)) or suffix_valid.shape != (N, L, L):
        raise ValueError(f"masks {None if prefix_valid is None else tuple(prefix_valid.shape)}, "
                         f"{tuple(suffix_valid.shape)}; expected {(B, P)}, {(N, L, L)}")
    g = H // Hkv
    impl = IMPL if impl is None else impl
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "sdpa" if comp_q.is_cuda else "matmul"

    prompt_out = F.scaled_dot_product_attention(
        prompt_q, prompt_k, prompt_v, is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=g > 1
    )  # [B, H, P, Dh]

    if impl == "sdpa":
        comp_out = _concat_sdpa(comp_q, prompt_k, prompt_v, comp_k, comp_v, prefix_valid, suffix_valid, G, scale,
                                dropout)
        return prompt_out, comp_out

    wd = _work_dtype(comp_q.dtype)
    # Query rows of one (prompt, kv head) block: (head in kv group, completion in group, position).
    q = (comp_q.to(wd) * scale).reshape(B, G, Hkv, g, L, Dh).permute(0, 2, 3, 1, 4, 5)  # [B, Hkv, g, G, L, Dh]
    pk, pv = prompt_k.to(wd), prompt_v.to(wd)  # [B, Hkv, P, Dh]
    ck = comp_k.to(wd).reshape(B, G, Hkv, L, Dh).transpose(1, 2).unsqueeze(2)  # [B, Hkv, 1, G, L, Dh]
    cv = comp_v.to(wd).reshape(B, G, Hkv, L, Dh).transpose(1, 2).unsqueeze(2)  # [B, Hkv, 1, G, L, Dh]

    if recompute_scores and torch.is_grad_enabled():
        # Keeps only q, k, v for the backward, which recomputes the [.., P] scores (one more forward of this part).
        o = checkpoint(_cascade, q, pk, pv, ck, cv, prefix_valid, suffix_valid, dropout, use_reentrant=False)
    else:
        o = _cascade(q, pk, pv, ck, cv, prefix_valid, suffix_valid, dropout)  # [B, Hkv, g, G, L, Dh]
    comp_out = o.permute(0, 3, 1, 2, 4, 5).reshape(N, H, L, Dh).to(comp_q.dtype)  # [N, H, L, Dh]
    return prompt_out, comp_out


def prefix_train_attention_ref(
    prompt_q, prompt_k, prompt_v, prefix_valid, comp_q, comp_k, comp_v, suffix_valid, group_size, scale
):
    """Oracle: every completion gets its own copy of its prompt's real keys; dense masked softmax per sequence.
    Prompt padding rows come back as zeros."""
    B, H, P, Dh = prompt_q.shape
    if prefix_valid is None:
        prefix_valid = torch.ones(B, P, dtype=torch.bool, device=prompt_q.device)
    g = H // prompt_k.shape[1]
    prompt_out = torch.zeros_like(prompt_q)
    comp_out = torch.zeros_like(comp_q)
    for b in range(B):
        p = int(prefix_valid[b].sum())
        k = prompt_k[b, :, :p].repeat_interleave(g, 0)  # [H, p, Dh]
        v = prompt_v[b, :, :p].repeat_interleave(g, 0)
        s = prompt_q[b, :, :p] @ k.transpose(-1, -2) * scale  # [H, p, p]
        s = s.masked_fill(~torch.ones(p, p, dtype=torch.bool, device=s.device).tril(), float("-inf"))
        prompt_out[b, :, :p] = s.softmax(-1) @ v
        for n in range(b * group_size, (b + 1) * group_size):
            kk = torch.cat([k, comp_k[n].repeat_interleave(g, 0)], 1)  # [H, p + L, Dh]
            vv = torch.cat([v, comp_v[n].repeat_interleave(g, 0)], 1)
            valid = torch.cat([suffix_valid.new_ones(comp_q.shape[2], p), suffix_valid[n]], 1)  # [L, p + L]
            s = (comp_q[n] @ kk.transpose(-1, -2) * scale).masked_fill(~valid, float("-inf"))  # [H, L, p + L]
            comp_out[n] = s.softmax(-1) @ vv
    return prompt_out, comp_out
