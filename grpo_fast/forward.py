"""Completion log-probs of a ``PolicyBatch`` (prompts × groups of completions) from the model's final hidden states
and the fused LM-head op, with or without the shared-prefix forward: a functional entry point for stacks that embed
grpo_fast, and the padded reference the shared-prefix forward is tested against. No ``[T, V]`` logits tensor exists:
the decoder's hidden states go straight into ``linear_logprobs``. (``GRPOTrainer`` computes the same thing from
TRL's padded tensors in ``grpo_fast.integrations.trl``.)
"""

from __future__ import annotations

import torch

from grpo_fast.kernels.logprob import linear_logprobs
from grpo_fast.models import lm_head_of
from grpo_fast.shared_prefix import PolicyBatch, can_share_prefix, shared_prefix_hidden_states


def padded_inputs(batch: PolicyBatch, pad_id: int):
    """``input_ids, attention_mask, position_ids [N, P + L]`` with each prompt left-padded to P and repeated G times,
    positions as ``generate`` assigns them (a prompt's first real token is position 0)."""
    n, L = batch.completion_ids.shape
    device = batch.completion_ids.device
    P = max(len(p) for p in batch.prompt_ids)
    prompt = torch.full((len(batch.prompt_ids), P), pad_id, dtype=torch.long, device=device)  # [B, P]
    prompt_mask = torch.zeros_like(prompt)
    for b, ids in enumerate(batch.prompt_ids):
        prompt[b, P - len(ids) :] = torch.tensor(ids, dtype=torch.long, device=device)
        prompt_mask[b, P - len(ids) :] = 1
    prompt = prompt.repeat_interleave(batch.group_size, 0)  # [N, P]
    prompt_mask = prompt_mask.repeat_interleave(batch.group_size, 0)
    input_ids = torch.cat([prompt, batch.completion_ids], 1)  # [N, P + L]
    attention_mask = torch.cat([prompt_mask, batch.completion_mask.to(prompt_mask.dtype)], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids, P


def completion_hidden_states(model, batch: PolicyBatch, pad_id: int) -> torch.Tensor:
    """Final (normed) hidden states at the positions that predict each completion token: ``[N, L, D]``.

    The standard path: every completion carries its own copy of its prompt.
    """
    input_ids, attention_mask, position_ids, P = padded_inputs(batch, pad_id)
    L = batch.completion_ids.shape[1]
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return out.last_hidden_state[:, P - 1 : P - 1 + L]  # [N, L, D]


def completion_logprobs(
    model,
    batch: PolicyBatch,
    pad_id: int,
    temperature: float,
    with_entropy: bool = True,
    shared_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the completions under ``softmax(logits / temperature)``: ``[N, L]``.

    With ``shared_prefix`` (and a model it is exact for) each prompt is forwarded once per group (B·P + N·L tokens
    instead of N·(P + L)); otherwise every completion carries its own prompt copy. Masked positions (padding after
    EOS) get log-prob 0; they never enter a loss.
    """
    head = lm_head_of(model)
    P, L = max(len(p) for p in batch.prompt_ids), batch.completion_ids.shape[1]
    if shared_prefix and batch.group_size > 1 and can_share_prefix(model, P + L)[0]:
        hidden = shared_prefix_hidden_states(model, batch, pad_id)  # [N, L, D]
    else:
        hidden = completion_hidden_states(model, batch, pad_id)  # [N, L, D]
    n, L, d = hidden.shape
    targets = batch.completion_ids.masked_fill(batch.completion_mask == 0, -100).reshape(-1)  # [T]
    out = linear_logprobs(
        hidden.reshape(n * L, d),
        head.weight,
        targets,
        temperature=temperature / head.scale,
        bias=head.bias,
        return_entropy=with_entropy,
        softcap=head.softcap,
    )
    if with_entropy:
        logp, entropy = out
        return logp.view(n, L), entropy.view(n, L)
    return out.view(n, L), None
