"""The shared-prefix training forward: each prompt once, its G completions attending to it, exact gradients.

``completion_hidden_states`` (grpo_fast/forward.py) feeds every completion with its own left-padded copy of its
prompt: N·(P + L) tokens through every layer, forward and backward. Here one forward runs over a flat sequence
(batch size 1) of ``B·P + S`` tokens — the B prompts right-padded to P, then the N completions' S real tokens (no
trailing padding: the attention alone scatters them back into [N, L] rows) — with per-token
``position_ids`` (prompt token t at t, completion token t at ``P_b + t``, exactly the positions the padded path
gives), so norms, MLPs and RoPE see the same inputs as the padded path. Attention, the only layer that mixes
tokens, is ``shared_prefix_attention``, registered with ``transformers.AttentionInterface``; it reads the layout
from a keyword passed to the decoder (``shared_prefix=``). No model code is edited; the model's attention
implementation is restored in a ``finally``.

A flat layout rather than a ``[B + N, max(P, L)]`` stack: with P ≫ L (the case that matters) padding the
completion rows to P would waste most of the compute, and per-token layers do not care about the layout.

Per layer, prompt tokens attend causally within their own prompt (fused SDPA; right padding needs no mask because
a real token never sees a later pad). Completion tokens attend to their group's prompt keys/values and causally to
their own earlier tokens, in one of two PyTorch forms (``impl``):

- ``"matmul"`` (the CPU default): ONE batched matmul per (prompt, kv head), ``[(H/Hkv)·G·L, Dh] × [Dh, P]``, the
  keys never copied; the prompt and own-token score blocks share one softmax (both exponentiate against the same
  row max, detached because its exact gradient is zero). It materializes the ``[(H/Hkv)·G·L, P]`` fp32 score
  blocks; ``recompute_scores`` trades one more forward of this part for not keeping them (measured on SmolLM2-135M
  shapes, P = 1024, G = 8, L = 64, one CPU thread: 50 → 8 MiB kept per layer, +25% time of this op).
- ``"sdpa"`` (the CUDA default): each completion's keys are ``cat(its prompt's keys, its own keys)`` under one
  boolean mask, fed to PyTorch's fused memory-efficient attention, forward and backward: no score matrix is kept
  and far fewer kernels launch, at the price of one ``[N, H, P + L, Dh]`` copy of the keys and values per layer
  (what the padded forward holds anyway). The prompt's MLP and projections still run once per group.
  On an H100 (bf16, SmolLM2-135M shapes) the matmul form was 3x slower than the padded forward at P = 32.

Gradients flow into the prompt keys/values from all G completions (the batched matmul's or ``repeat_interleave``'s
backward sums them). A fused flash-style Triton kernel that reads the prompt keys once per group would be the next
step for long prompts on GPUs; it would live in kernels/ beside ``prefix_attention.py`` (the decode op).

The decoding side of the same split lives here too: ``SharedPrefixSampler``'s attention function (``DECODE_ATTN_NAME``:
the prompts packed without padding at prefill; at decode the Triton op ``prefix_decode_attention`` over each
prompt's keys once + each sample's suffix, merged by log-sum-exp). This module is where grpo_fast registers its
attention functions with transformers (``register_attention``), both of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface

from grpo_fast.kernels.prefix_attention import prefix_decode_attention

try:  # optional: the varlen prefill kernel on CUDA
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except ImportError:
    _flash_varlen = None

IMPLS = ("auto", "sdpa", "matmul")  # "auto": sdpa on CUDA, matmul elsewhere


@dataclass
class PolicyBatch:
    """One minibatch of the update. Prompts are stored once per group; ``group_size`` completions follow each."""

    prompt_ids: list[list[int]]  # B lists of token ids
    completion_ids: torch.Tensor  # [N, L]
    completion_mask: torch.Tensor  # [N, L]
    group_size: int
    # Per-prompt position offsets (B ints), for callers that reproduce transformers' default positions over a
    # left-padded row (TRL: no position_ids, so a prompt after k pads starts at k and every token, masked or not,
    # advances the position). RoPE attention sees only position differences, so a shift changes rounding alone;
    # RoPE variants that read the largest position (dynamic scaling) need the caller's exact positions.
    # None: grpo_fast's own positions (see SharedPrefixBatch.from_policy_batch).
    position_offsets: list[int] | None = None

    def __post_init__(self) -> None:
        n = self.completion_ids.shape[0]
        if n != len(self.prompt_ids) * self.group_size:
            raise ValueError(
                f"completion_ids has {n} rows; expected len(prompt_ids) * group_size = "
                f"{len(self.prompt_ids)} * {self.group_size}"
            )
        if self.position_offsets is not None and len(self.position_offsets) != len(self.prompt_ids):
            raise ValueError(f"position_offsets has {len(self.position_offsets)} entries; expected one per prompt "
                             f"({len(self.prompt_ids)})")


@dataclass
class SharedPrefixBatch:
    """A policy batch laid out for the shared-prefix forward, and how its attention runs. T = B·P + S tokens: S = the
    completions' real tokens when each row's padding trails it (``suffix_index``), else S = N·L."""

    input_ids: torch.Tensor  # [1, T]: B right-padded prompts, then the N completions' S tokens
    position_ids: torch.Tensor  # [1, T]
    prefix_valid: torch.Tensor | None  # [B, P] bool: real prompt tokens; None when every prompt has P tokens
    suffix_valid: torch.Tensor  # [N, L, L] bool: completion query i sees its own key j (causal, key kept)
    gather_index: torch.Tensor  # [N, L] token index (into T) of the hidden state predicting each completion token
    num_prompts: int  # B
    prompt_len: int  # P
    group_size: int  # G
    completion_len: int  # L
    impl: str = "auto"  # the completion attention's form, one of IMPLS
    recompute_scores: bool = False  # recompute the completion score blocks in the backward instead of keeping them
    # [S] flat indices (into N·L) of the completion tokens in the sequence, in order; None: all N·L (padding kept)
    suffix_index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @classmethod
    def from_policy_batch(cls, batch: PolicyBatch, pad_id: int, impl: str = "auto",
                          recompute_scores: bool = False) -> SharedPrefixBatch:
        """Lays out ``batch`` as one sequence of ``B·P + S`` tokens: each prompt appears once, whatever G is, and
        each completion with its real tokens only when its mask is 1…1 0…0 (the usual case: S = Σ lengths; no
        padding token passes a layer), else with all L (S = N·L).

        Positions match ``grpo_fast.forward.padded_inputs``: prompt token t at t, completion token t at
        ``P_b + cumsum(mask)[t] − 1`` (so tokens after a completion's end repeat its last position, as there).
        With ``batch.position_offsets`` (o_b): prompt token t at ``o_b + t``, completion token t at ``o_b + P_b + t``
        whatever the mask (a causal LM called without ``position_ids`` on a row left-padded by o_b tokens).
        """
        comp = batch.completion_ids  # [N, L]
        device = comp.device
        N, L = comp.shape
        B, G = len(batch.prompt_ids), batch.group_size
        lens = [len(p) for p in batch.prompt_ids]
        if min(lens) < 1:
            raise ValueError("every prompt needs at least one token (an empty prompt has no position to predict from)")
        if L < 1:
            raise ValueError("completion_ids must have at least one column")
        P = max(lens)
        prompts = torch.full((B, P), pad_id, dtype=torch.long, device=device)  # [B, P]
        for b, ids in enumerate(batch.prompt_ids):
            prompts[b, : lens[b]] = torch.tensor(ids, dtype=torch.long, device=device)
        plen = torch.tensor(lens, dtype=torch.long, device=device)  # [B]
        prefix_valid = torch.arange(P, device=device)[None, :] < plen[:, None]  # [B, P]

        keep = batch.completion_mask.to(device=device) != 0  # [N, L]
        if batch.position_offsets is None:
            offset = torch.zeros(B, dtype=torch.long, device=device)  # [B]
            steps = keep.long().cumsum(1) - 1  # [N, L]
        else:
            offset = torch.tensor(batch.position_offsets, dtype=torch.long, device=device)  # [B]
            steps = torch.arange(L, device=device).expand(N, L)  # [N, L]
        comp_pos = (offset + plen).repeat_interleave(G)[:, None] + steps  # [N, L]
        prompt_pos = offset[:, None] + torch.arange(P, device=device)[None]  # [B, P]
        # Trailing padding only (one host read): the completion part keeps the real tokens, else all N·L.
        trailing = bool((keep == (torch.arange(L, device=device) < keep.sum(1, keepdim=True))).all())
        suffix_index = keep.reshape(-1).nonzero().squeeze(1) if trailing and not bool(keep.all()) else None
        comp_ids, comp_pos_flat = comp.to(torch.long).reshape(-1), comp_pos.reshape(-1)  # [N·L]
        if suffix_index is not None:
            comp_ids, comp_pos_flat = comp_ids[suffix_index], comp_pos_flat[suffix_index]  # [S]
        input_ids = torch.cat([prompts.reshape(-1), comp_ids])[None]  # [1, T]
        position_ids = torch.cat([prompt_pos.reshape(-1), comp_pos_flat])[None]  # [1, T]

        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()  # [L, L]
        suffix_valid = causal[None] & keep[:, None, :]  # [N, L, L]

        # Token t of completion n is predicted by the hidden state of the token before it: the prompt's last real
        # token for t = 0, else completion token t − 1.
        first = (torch.arange(B, device=device) * P + plen - 1).repeat_interleave(G)[:, None]  # [N, 1]
        slot = torch.arange(N * L, device=device)  # sequence slot (after the prompts) of completion token n·L + t
        if suffix_index is not None:  # a dropped token's slot is 0: it predicts only padding, whose target is ignored
            slot = torch.zeros_like(slot).index_copy_(0, suffix_index, torch.arange(len(suffix_index), device=device))
        rest = B * P + slot.view(N, L)[:, : L - 1]  # [N, L − 1]
        gather_index = torch.cat([first, rest], 1)  # [N, L]
        if min(lens) == P:
            prefix_valid = None  # nothing to mask: spares the attention a pass over its [.., P] scores
        return cls(input_ids, position_ids, prefix_valid, suffix_valid, gather_index, B, P, G, L, impl,
                   recompute_scores, suffix_index)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and probabilities in fp32 at least (bf16 scores double the error of stock attention)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _matmul_attention(q, pk, pv, ck, cv, prefix_valid, suffix_valid, dropout):
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


def _sdpa_attention(comp_q, prompt_k, prompt_v, comp_k, comp_v, prefix_valid, suffix_valid, G, scale, dropout):
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


def shared_prefix_attention(
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
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a shared-prefix batch (B prompts once, N = B·G completions), forward and (autograd) backward.

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
        impl: ``"sdpa"``, ``"matmul"`` or ``"auto"`` (sdpa on CUDA, matmul elsewhere); see the module docstring.

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
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "sdpa" if comp_q.is_cuda else "matmul"
    g = H // Hkv

    prompt_out = F.scaled_dot_product_attention(
        prompt_q, prompt_k, prompt_v, is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=g > 1
    )  # [B, H, P, Dh]

    if impl == "sdpa":
        comp_out = _sdpa_attention(comp_q, prompt_k, prompt_v, comp_k, comp_v, prefix_valid, suffix_valid, G, scale,
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
        o = checkpoint(_matmul_attention, q, pk, pv, ck, cv, prefix_valid, suffix_valid, dropout,
                       use_reentrant=False)
    else:
        o = _matmul_attention(q, pk, pv, ck, cv, prefix_valid, suffix_valid, dropout)  # [B, Hkv, g, G, L, Dh]
    comp_out = o.permute(0, 3, 1, 2, 4, 5).reshape(N, H, L, Dh).to(comp_q.dtype)  # [N, H, L, Dh]
    return prompt_out, comp_out


def shared_prefix_attention_ref(
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


def register_attention(name: str, fn: Callable) -> str:
    """Registers ``fn`` as the transformers attention implementation ``name`` and returns ``name``.

    Every attention function of grpo_fast is registered through here, at import of the module that defines it;
    a model selects one with ``model.set_attn_implementation(name)``.
    """
    AttentionInterface.register(name, fn)
    return name


def _training_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        shared_prefix: SharedPrefixBatch | None = None, **kwargs):
    """The transformers attention function ``TRAIN_ATTN_NAME``: q ``[1, H, T, Dh]``, k/v ``[1, Hkv, T, Dh]`` (RoPE
    applied) → ``([1, T, H, Dh], None)``."""
    if shared_prefix is None:
        raise RuntimeError(f"attention {TRAIN_ATTN_NAME!r} needs the shared_prefix= keyword; use "
                           "shared_prefix_hidden_states")
    meta = shared_prefix
    B, P, L = meta.num_prompts, meta.prompt_len, meta.completion_len
    window = kwargs.get("sliding_window")
    if window is not None and window < P + L:
        raise ValueError(f"sliding_window={window} is shorter than the sequences ({P + L} tokens)")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"shared-prefix attention does not support {name}={kwargs[name]!r}")
    N = B * meta.group_size
    H, T, Dh = query.shape[1:]
    index = meta.suffix_index
    if query.shape[0] != 1 or T != meta.num_tokens:
        raise ValueError(f"query {tuple(query.shape)} is not the shared-prefix batch of {meta.num_tokens} tokens")

    def split(x):  # [1, h, T, Dh] -> [B, h, P, Dh], [N, h, L, Dh] (the completions back in their padded rows)
        comp = x[0, :, B * P :]  # [h, S, Dh]
        if index is not None:  # zero rows at the padding: masked as keys, their queries' outputs dropped below
            comp = comp.new_zeros(comp.shape[0], N * L, Dh).index_copy(1, index, comp)
        return x[0, :, : B * P].unflatten(1, (B, P)).transpose(0, 1), comp.unflatten(1, (N, L)).transpose(0, 1)

    (pq, cq), (pk, ck), (pv, cv) = split(query), split(key), split(value)
    scale = scaling if scaling is not None else Dh**-0.5
    p_out, c_out = shared_prefix_attention(pq, pk, pv, meta.prefix_valid, cq, ck, cv, meta.suffix_valid,
                                           meta.group_size, scale, dropout, meta.recompute_scores, meta.impl)
    c_out = c_out.transpose(1, 2).reshape(N * L, H, Dh)
    if index is not None:
        c_out = c_out.index_select(0, index)  # [S, H, Dh]
    return torch.cat([p_out.transpose(1, 2).reshape(B * P, H, Dh), c_out])[None], None  # [1, T, H, Dh]


TRAIN_ATTN_NAME = register_attention("grpo_fast_shared_prefix_train", _training_attention)
class _SwitchAttention(torch.autograd.Function):
    """Identity whose backward sets ``model``'s attention implementation to ``name``.

    Under gradient checkpointing the backward pass re-runs each layer's forward, which looks the attention function
    up by the model's current implementation name. Placed on the final hidden states (reached first in backward) it
    selects the shared-prefix attention for the recomputation; placed on the input embeddings (reached last) it
    restores the previous one.
    """

    @staticmethod
    def forward(ctx, x, model, name):
        ctx.model, ctx.name = model, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.model.set_attn_implementation(ctx.name)
        return grad, None, None


def can_share_prefix(model, max_len: int | None = None) -> tuple[bool, str]:
    """Whether ``shared_prefix_hidden_states`` reproduces this model's padded forward, and if not, why.

    A sliding attention window is accepted only when ``max_len`` (the longest prompt + completion) fits in it.
    """
    if not hasattr(model, "get_decoder"):
        return False, f"{type(model).__name__} has no get_decoder()"
    if not getattr(model, "_supports_attention_backend", False):
        return False, f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface"
    config = model.config
    decoder = model.get_decoder()
    if not hasattr(decoder, "rotary_emb"):
        return False, f"{type(decoder).__name__} has no rotary position embedding (packing needs per-token RoPE)"
    token_emb = model.get_input_embeddings()
    for name, mod in decoder.named_modules():
        if isinstance(mod, torch.nn.Embedding) and mod is not token_emb:
            return False, f"{name} looks like a learned position embedding; only RoPE models are supported"
    layer_types = set(getattr(config, "layer_types", None) or [])
    if layer_types - {"full_attention", "sliding_attention"}:
        return False, f"layer types {sorted(layer_types)}: only full and sliding attention layers are supported"
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is None and "sliding_attention" in layer_types:
        return False, "sliding attention layers without a sliding_window size"
    if window is not None and (max_len is None or max_len > window):
        return False, f"sliding_window={window} is shorter than the sequences ({max_len} tokens)"
    if getattr(config, "attn_logit_softcapping", None):
        return False, "attention logit soft-capping is not supported"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and ("mrope_section" in rope or rope.get("rope_type") == "mrope"):
        return False, "multimodal RoPE (3-D positions) is not supported"
    return True, ""


def shared_prefix_hidden_states(model, batch: PolicyBatch, pad_id: int, recompute_scores: bool | None = None,
                                impl: str = "auto") -> torch.Tensor:
    """Final (normed) hidden states predicting each completion token, ``[N, L, D]``: the same contract and values as
    ``grpo_fast.forward.completion_hidden_states``, computed from ``B·P + S`` tokens (S: the completions' real tokens,
    see ``SharedPrefixBatch``) instead of ``N·(P + L)``. Positions that predict padding hold another token's state.

    Gradients reach every parameter exactly as in the padded path; a prompt's activations receive the sum of its
    G completions' gradients. Raises ``ValueError`` for models ``can_share_prefix`` refuses.

    ``recompute_scores`` (default: on for CUDA tensors, off on the CPU) keeps only q/k/v of each layer's completion
    attention for the backward and recomputes its ``[N·H·L, P]`` fp32 scores there, instead of holding them; it
    applies to the matmul form of the attention (the CPU default; CUDA uses fused SDPA, which keeps no scores).
    ``impl`` picks that form (``IMPLS``; see ``shared_prefix_attention``).

    The model's attention implementation is switched for this forward and restored in a ``finally``; under
    gradient checkpointing it is switched again for the backward's recomputation and restored when the backward
    reaches the input embeddings.
    """
    recompute = batch.completion_ids.is_cuda if recompute_scores is None else recompute_scores
    layout = SharedPrefixBatch.from_policy_batch(batch, pad_id, impl, recompute)
    ok, reason = can_share_prefix(model, layout.prompt_len + layout.completion_len)
    if not ok:
        raise ValueError(f"shared-prefix forward unavailable: {reason}")
    decoder = model.get_decoder()
    previous = model.config._attn_implementation
    checkpointed = torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False)
                                                   for m in decoder.modules())
    model.set_attn_implementation(TRAIN_ATTN_NAME)
    try:
        embeds = model.get_input_embeddings()(layout.input_ids)  # [1, T, D]
        if checkpointed:
            embeds = _SwitchAttention.apply(embeds, model, previous)
        hidden = decoder(inputs_embeds=embeds, position_ids=layout.position_ids, use_cache=False,
                         shared_prefix=layout).last_hidden_state
    finally:
        model.set_attn_implementation(previous)
    if checkpointed:
        hidden = _SwitchAttention.apply(hidden, model, TRAIN_ATTN_NAME)
    return hidden[0][layout.gather_index]  # [N, L, D]


def _decoding_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             prefix_cache=None, **kwargs):
    """The transformers attention function ``DECODE_ATTN_NAME`` of ``SharedPrefixSampler``: the B prompts packed
    without padding at prefill, prefix + suffix cascade (``prefix_decode_attention``) at decode. The sampler's cache
    (its layers and decode state) arrives as the ``prefix_cache=`` keyword."""
    if prefix_cache is None:
        raise RuntimeError(f"attention '{DECODE_ATTN_NAME}' is only usable inside SharedPrefixSampler.generate")
    st = prefix_cache.state
    layer = prefix_cache.layers[module.layer_idx]
    if st.prefill:
        window = kwargs.get("sliding_window")
        if window is not None and window < st.total_len:
            raise ValueError(f"SharedPrefixSampler: layer {module.layer_idx} uses a sliding window of {window} tokens, "
                             f"smaller than prompt + max_new_tokens = {st.total_len}; this model cannot be served")
        for name in ("softcap", "s_aux"):
            if kwargs.get(name) is not None:
                raise ValueError(f"SharedPrefixSampler: attention with '{name}' is not supported")
        return _packed_prefill_attention(query, key, value, st.packed_cu, st.packed_bounds, scaling), None
    n = st.n
    out = prefix_decode_attention(query, layer.prefix_k, layer.prefix_v, st.prefix_lens, layer.suffix_k[:n],
                                  layer.suffix_v[:n], st.suffix_len, st.groups, scale=scaling,
                                  max_group_size=st.max_group, plan=st.plan)  # [n, H, 1, Dh]
    return out.transpose(1, 2), None


def _packed_prefill_attention(q, k, v, cu, bounds, scale):
    """Causal attention of the B prompts packed into one sequence (q ``[1, H, T, Dh]``, k/v ``[1, Hkv, T, Dh]``;
    prompt b holds tokens ``bounds[b]:bounds[b+1]``): flash-attention's varlen kernel when it is importable and
    applies, else SDPA per prompt — no padding either way. Returns ``[1, T, H, Dh]``."""
    if _flash_varlen is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        p_max = max(e - s for s, e in itertools.pairwise(bounds))
        out = _flash_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, p_max, p_max,
                            softmax_scale=scale, causal=True)  # [T, H, Dh]
        return out[None]
    out = q.new_empty(q.shape)  # [1, H, T, Dh]
    for start, end in itertools.pairwise(bounds):
        out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end],
                                                              v[:, :, start:end], is_causal=True, scale=scale,
                                                              enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


DECODE_ATTN_NAME = register_attention("grpo_fast_shared_prefix", _decoding_attention)
