"""The shared-prefix policy forward: each prompt once, its G completions attending to it, exact gradients.

``completion_hidden_states`` (grpo_fast/forward.py) feeds every completion with its own left-padded copy of its
prompt: N·(P + L) tokens through every layer, forward and backward. Here one forward runs over a packed 1-D
sequence (batch size 1) of ``B·P + N·L`` tokens — the B prompts right-padded to P, then the N completions — with
per-token ``position_ids`` (prompt token t at t, completion token t at ``P_b + t``, exactly the positions the
padded path gives), so norms, MLPs and RoPE see the same inputs as the padded path. Attention, the only layer
that mixes tokens, is a function registered with ``transformers.AttentionInterface``; it reads the packing from a
keyword passed to the decoder (``shared_prefix=``) and calls ``grpo_fast.kernels.prefix_train_attention``.
No model code is edited; the model's attention implementation is restored in a ``finally``.

A flat layout rather than a ``[B + N, max(P, L)]`` stack: with P ≫ L (the case that matters) padding the
completion rows to P would waste most of the compute, and per-token layers do not care about the packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface

from grpo_fast.kernels.prefix_train_attention import prefix_train_attention

if TYPE_CHECKING:  # grpo_fast.forward may import this module: no import cycle at run time
    from grpo_fast.forward import PolicyBatch

ATTN_NAME = "grpo_fast_shared_prefix_train"


@dataclass
class PackedBatch:
    """A policy batch laid out for the shared-prefix forward. T = B·P + N·L tokens."""

    input_ids: torch.Tensor  # [1, T]: B right-padded prompts, then N completions
    position_ids: torch.Tensor  # [1, T]
    prefix_valid: torch.Tensor | None  # [B, P] bool: real prompt tokens; None when every prompt has P tokens
    suffix_valid: torch.Tensor  # [N, L, L] bool: completion query i sees its own key j (causal, key kept)
    gather_index: torch.Tensor  # [N, L] token index (into T) of the hidden state predicting each completion token
    num_prompts: int  # B
    prompt_len: int  # P
    group_size: int  # G
    completion_len: int  # L
    recompute_scores: bool = False  # recompute the completion score blocks in the backward instead of keeping them

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def pack(batch: PolicyBatch, pad_id: int) -> PackedBatch:
    """Lay out ``batch`` as one sequence of ``B·P + N·L`` tokens: each prompt appears once, whatever G is.

    Positions match ``grpo_fast.forward.padded_inputs``: prompt token t at t, completion token t at
    ``P_b + cumsum(mask)[t] − 1`` (so tokens after a completion's end repeat its last position, as there).
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
    comp_pos = plen.repeat_interleave(G)[:, None] + keep.long().cumsum(1) - 1  # [N, L]
    prompt_pos = torch.arange(P, device=device).expand(B, P)  # [B, P]
    input_ids = torch.cat([prompts.reshape(-1), comp.to(torch.long).reshape(-1)])[None]  # [1, T]
    position_ids = torch.cat([prompt_pos.reshape(-1), comp_pos.reshape(-1)])[None]  # [1, T]

    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()  # [L, L]
    suffix_valid = causal[None] & keep[:, None, :]  # [N, L, L]

    # Token t of completion n is predicted by the hidden state of the token before it: the prompt's last real token
    # for t = 0, else completion token t − 1.
    first = (torch.arange(B, device=device) * P + plen - 1).repeat_interleave(G)[:, None]  # [N, 1]
    rest = B * P + torch.arange(N, device=device)[:, None] * L + torch.arange(L - 1, device=device)[None]  # [N, L-1]
    gather_index = torch.cat([first, rest], 1)  # [N, L]
    if min(lens) == P:
        prefix_valid = None  # nothing to mask: spares the attention a pass over its [.., P] scores
    return PackedBatch(input_ids, position_ids, prefix_valid, suffix_valid, gather_index, B, P, G, L)


def _shared_prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             shared_prefix: PackedBatch | None = None, **kwargs):
    """Attention function registered as ``ATTN_NAME``: q ``[1, H, T, Dh]``, k/v ``[1, Hkv, T, Dh]`` (RoPE applied)
    → ``([1, T, H, Dh], None)``."""
    if shared_prefix is None:
        raise RuntimeError(f"attention {ATTN_NAME!r} needs the shared_prefix= keyword; use shared_prefix_hidden_states")
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
    if query.shape[0] != 1 or T != B * P + N * L:
        raise ValueError(f"query {tuple(query.shape)} is not the packed batch of {B * P + N * L} tokens")

    def split(x):  # [1, h, T, Dh] -> [B, h, P, Dh], [N, h, L, Dh] (views)
        return (x[0, :, : B * P].unflatten(1, (B, P)).transpose(0, 1),
                x[0, :, B * P :].unflatten(1, (N, L)).transpose(0, 1))

    (pq, cq), (pk, ck), (pv, cv) = split(query), split(key), split(value)
    scale = scaling if scaling is not None else Dh**-0.5
    p_out, c_out = prefix_train_attention(pq, pk, pv, meta.prefix_valid, cq, ck, cv, meta.suffix_valid,
                                          meta.group_size, scale, dropout, meta.recompute_scores)
    out = torch.cat([p_out.transpose(1, 2).reshape(B * P, H, Dh), c_out.transpose(1, 2).reshape(N * L, H, Dh)])
    return out[None], None  # [1, T, H, Dh]


AttentionInterface.register(ATTN_NAME, _shared_prefix_attention)


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


def shared_prefix_hidden_states(model, batch: PolicyBatch, pad_id: int, recompute_scores: bool | None = None
                                ) -> torch.Tensor:
    """Final (normed) hidden states predicting each completion token, ``[N, L, D]``: the same contract and values as
    ``grpo_fast.forward.completion_hidden_states``, computed from ``B·P + N·L`` tokens instead of ``N·(P + L)``.

    Gradients reach every parameter exactly as in the padded path; a prompt's activations receive the sum of its
    G completions' gradients. Raises ``ValueError`` for models ``can_share_prefix`` refuses.

    ``recompute_scores`` (default: on for CUDA tensors, off on the CPU) keeps only q/k/v of each layer's completion
    attention for the backward and recomputes its ``[N·H·L, P]`` fp32 scores there, instead of holding them; it
    applies to the matmul form of the attention (the CPU default; CUDA uses fused SDPA, which keeps no scores).

    The model's attention implementation is switched for this forward and restored in a ``finally``; under
    gradient checkpointing it is switched again for the backward's recomputation and restored when the backward
    reaches the input embeddings.
    """
    packed = pack(batch, pad_id)
    packed.recompute_scores = batch.completion_ids.is_cuda if recompute_scores is None else recompute_scores
    ok, reason = can_share_prefix(model, packed.prompt_len + packed.completion_len)
    if not ok:
        raise ValueError(f"shared-prefix forward unavailable: {reason}")
    decoder = model.get_decoder()
    previous = model.config._attn_implementation
    checkpointed = torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False)
                                                   for m in decoder.modules())
    model.set_attn_implementation(ATTN_NAME)
    try:
        embeds = model.get_input_embeddings()(packed.input_ids)  # [1, T, D]
        if checkpointed:
            embeds = _SwitchAttention.apply(embeds, model, previous)
        hidden = decoder(inputs_embeds=embeds, position_ids=packed.position_ids, use_cache=False,
                         shared_prefix=packed).last_hidden_state
    finally:
        model.set_attn_implementation(previous)
    if checkpointed:
        hidden = _SwitchAttention.apply(hidden, model, ATTN_NAME)
    return hidden[0][packed.gather_index]  # [N, L, D]
