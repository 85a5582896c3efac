"""The shared-prefix training forward (grpo_fast/shared_prefix.py): its attention op against a float64 reference,
forward and every gradient, and the whole forward against the padded forward of grpo_fast/forward.py (hidden states
and the gradient of every parameter).

Note on fp64: transformers' RMSNorm computes in fp32 even for fp64 models, so an fp64 model is only an fp32-accurate
reference; the precision-aware bound (ours − ref64 ≤ 2 · (padded path, same dtype − ref64) + atol) still bites.
"""

from __future__ import annotations

import functools

import pytest
import torch

from grpo_fast.forward import completion_hidden_states, padded_inputs
from grpo_fast.shared_prefix import (
    PolicyBatch,
    SharedPrefixBatch,
    can_share_prefix,
    shared_prefix_attention,
    shared_prefix_attention_ref,
    shared_prefix_hidden_states,
)
from grpo_fast.testing import tiny_causal_lm

PAD = 0


def _batch(group_size: int, seed: int = 0, L: int = 6) -> PolicyBatch:
    """Three prompts of lengths 5, 2, 7; completions of random lengths, one of length 1 and one full."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 40, (n,), generator=g).tolist() for n in (5, 2, 7)]
    N = len(prompts) * group_size
    ids = torch.randint(3, 40, (N, L), generator=g)
    lens = torch.randint(1, L + 1, (N,), generator=g)
    lens[0], lens[-1] = 1, L
    mask = (torch.arange(L)[None] < lens[:, None]).long()  # [N, L]
    ids = ids.masked_fill(mask == 0, PAD)
    return PolicyBatch(prompts, ids, mask, group_size)


def _hidden_and_grads(model, batch: PolicyBatch, fn, weights: torch.Tensor):
    model.zero_grad(set_to_none=True)
    hidden = fn(model, batch, PAD)  # [N, L, D]
    mask = batch.completion_mask[..., None].to(hidden.dtype)
    (hidden * weights.to(hidden.dtype) * mask).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return (hidden * mask).detach(), grads


def _compare(kind: str, group_size: int, numerics, tie: bool = False, checkpointing: bool = False,
             recompute: bool = False, dtype: torch.dtype = torch.float32, impl: str = "auto"):
    batch = _batch(group_size)
    model = tiny_causal_lm(kind, seed=1, tie=tie).to(dtype)
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(batch.completion_ids.shape + (model.config.hidden_size,), generator=gen)
    if checkpointing:
        model.activation_checkpointing_enable()
        model.train()
    ref_model = tiny_causal_lm(kind, seed=1, tie=tie).double()
    ref_h, ref_g = _hidden_and_grads(ref_model, batch, completion_hidden_states, weights)
    scales = numerics.ulp_response_scales(
        ref_model, lambda: _hidden_and_grads(ref_model, batch, completion_hidden_states, weights)[1], ref_g, dtype)
    plain_h, plain_g = _hidden_and_grads(model, batch, completion_hidden_states, weights)
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: shapes.append(out.shape))
    ours_h, ours_g = _hidden_and_grads(model, batch, functools.partial(shared_prefix_hidden_states, impl=impl,
                                                                       recompute_scores=recompute), weights)
    hook.remove()
    B, P = len(batch.prompt_ids), max(len(p) for p in batch.prompt_ids)
    real = int(batch.completion_mask.sum())  # trailing padding never enters the forward
    assert shapes == [(1, B * P + real, model.config.hidden_size)]  # each prompt once, one forward
    assert model.config._attn_implementation == "sdpa"
    numerics.check_2x(ours_h, ref_h, plain_h, name="hidden")
    assert set(ours_g) == set(plain_g) == set(ref_g) and len(ours_g) == len(list(model.get_decoder().parameters()))
    for name in ref_g:
        numerics.check_2x(ours_g[name], ref_g[name], plain_g[name], name=name, scale=scales[name])


@pytest.mark.parametrize("group_size", [1, 3], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_matches_padded_forward(kind, group_size, numerics):
    _compare(kind, group_size, numerics)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep_scores", "recompute_scores"])
def test_tied_embeddings_and_gradient_checkpointing(numerics, recompute):
    _compare("llama", 3, numerics, tie=True, checkpointing=True, recompute=recompute)


def test_recompute_scores(numerics):
    _compare("qwen2", 3, numerics, recompute=True)


@pytest.mark.parametrize("impl", ["matmul", "sdpa"])
def test_bfloat16_model(impl, numerics):
    _compare("qwen2", 3, numerics, dtype=torch.bfloat16, impl=impl)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sdpa_impl_matches_padded_forward(kind, numerics):
    """The CUDA default (concatenated keys through fused SDPA), forced on the CPU."""
    _compare(kind, 3, numerics, impl="sdpa")


def test_impl_validation():
    tensors, prefix_valid, suffix_valid = _op_args(1, 2, 2, False, torch.float32)
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'sdpa', 'matmul'\), got 'flash'"):
        shared_prefix_attention(*tensors[:3], prefix_valid, *tensors[3:], suffix_valid, 1, 0.3, impl="flash")
    with pytest.raises(ValueError, match="impl must be one of"):
        shared_prefix_hidden_states(tiny_causal_lm("llama"), _batch(2), PAD, impl="flash")


def test_layout_holds_each_prompt_once():
    batch = _batch(3)
    layout = SharedPrefixBatch.from_policy_batch(batch, PAD)
    N, L = batch.completion_ids.shape
    B, P = len(batch.prompt_ids), max(len(p) for p in batch.prompt_ids)
    keep = batch.completion_mask.bool()
    S = int(keep.sum())
    assert S < N * L  # the batch has trailing padding, which the layout drops
    assert layout.input_ids.shape == layout.position_ids.shape == (1, B * P + S)
    assert layout.num_tokens == B * P + S < N * (P + L)
    # The prompt tokens appear once per group, the completions' real tokens once each, in order.
    prompts = layout.input_ids[0, : B * P].view(B, P)
    for b, ids in enumerate(batch.prompt_ids):
        assert prompts[b, : len(ids)].tolist() == ids and (prompts[b, len(ids) :] == PAD).all()
    assert torch.equal(layout.input_ids[0, B * P :], batch.completion_ids[keep])
    # Completion positions are exactly the padded path's.
    _, _, pos, _ = padded_inputs(batch, PAD)
    assert torch.equal(layout.position_ids[0, B * P :], pos[:, P:][keep])
    # Each real completion token t is predicted from token t − 1's slot (t = 0: the prompt's last token).
    assert layout.gather_index.shape == (N, L)
    for n in range(N):
        b, length = n // 3, int(keep[n].sum())
        assert layout.gather_index[n, 0] == b * P + len(batch.prompt_ids[b]) - 1
        for t in range(1, length):
            assert layout.input_ids[0, layout.gather_index[n, t]] == batch.completion_ids[n, t - 1]


def test_layout_keeps_padding_that_does_not_trail(numerics):
    """A completion mask with a hole (not 1…1 0…0) keeps all N·L completion tokens, and the forward still matches
    the padded path."""
    batch = _batch(3)
    mask = batch.completion_mask.clone()
    mask[-1, 2] = 0  # the full-length row loses a middle token
    batch = PolicyBatch(batch.prompt_ids, batch.completion_ids, mask, 3)
    layout = SharedPrefixBatch.from_policy_batch(batch, PAD)
    N, L = batch.completion_ids.shape
    assert layout.suffix_index is None and layout.num_tokens == 3 * 7 + N * L
    model = tiny_causal_lm("llama", seed=1)
    weights = torch.randn(N, L, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    ours_h, ours_g = _hidden_and_grads(model, batch, shared_prefix_hidden_states, weights)
    plain_h, plain_g = _hidden_and_grads(model, batch, completion_hidden_states, weights)
    ref_model = tiny_causal_lm("llama", seed=1).double()
    ref_h, ref_g = _hidden_and_grads(ref_model, batch, completion_hidden_states, weights)
    numerics.check_2x(ours_h, ref_h, plain_h, name="hidden")
    for name in ref_g:
        numerics.check_2x(ours_g[name], ref_g[name], plain_g[name], name=name)


def _op_args(group_size, H, Hkv, full_prompts, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P, L, Dh = 2, 7, 5, 8
    N = B * group_size
    plen = torch.tensor([7, 7] if full_prompts else [7, 3])
    prefix_valid = torch.arange(P)[None] < plen[:, None]  # [B, P]
    keep = torch.rand(N, L, generator=g) > 0.3
    keep[:, 0] = True
    suffix_valid = torch.ones(L, L, dtype=torch.bool).tril()[None] & keep[:, None, :]  # [N, L, L]

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    tensors = [rnd(B, H, P, Dh), rnd(B, Hkv, P, Dh), rnd(B, Hkv, P, Dh), rnd(N, H, L, Dh), rnd(N, Hkv, L, Dh),
               rnd(N, Hkv, L, Dh)]
    return tensors, prefix_valid, suffix_valid


def _op_outputs_and_grads(fn, tensors, prefix_valid, suffix_valid, group_size, weights, **kw):
    pq, pk, pv, cq, ck, cv = tensors
    out = fn(pq, pk, pv, prefix_valid, cq, ck, cv, suffix_valid, group_size, 0.3, **kw)
    valid = (prefix_valid if prefix_valid is not None else torch.ones_like(weights[0][:, 0, :, 0], dtype=torch.bool))
    out = (out[0] * valid[:, None, :, None], out[1])  # prompt padding rows are unspecified
    loss = sum((o.double() * w).sum() for o, w in zip(out, weights))
    return [o.detach() for o in out] + list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("full_prompts", [False, True], ids=["padded_prompts", "full_prompts"])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("group_size", [1, 3], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("impl", ["matmul", "sdpa"])
def test_op_matches_reference(impl, group_size, heads, full_prompts):
    tensors, prefix_valid, suffix_valid = _op_args(group_size, *heads, full_prompts, torch.float64)
    weights = [torch.randn(t.shape, dtype=torch.float64) for t in (tensors[0], tensors[3])]
    ours = _op_outputs_and_grads(shared_prefix_attention, tensors, None if full_prompts else prefix_valid,
                                 suffix_valid, group_size, weights, impl=impl)
    ref = _op_outputs_and_grads(shared_prefix_attention_ref, tensors, prefix_valid, suffix_valid, group_size, weights)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["matmul", "sdpa"])
def test_op_bfloat16(impl, assert_close_2x):
    tensors, prefix_valid, suffix_valid = _op_args(3, 4, 2, False, torch.bfloat16, seed=1)
    ref_tensors = [t.detach().double().requires_grad_() for t in tensors]
    weights = [torch.randn(t.shape, dtype=torch.float64) for t in (tensors[0], tensors[3])]
    args = (prefix_valid, suffix_valid, 3, weights)
    ours = _op_outputs_and_grads(shared_prefix_attention, tensors, *args, impl=impl)
    ref = _op_outputs_and_grads(shared_prefix_attention_ref, ref_tensors, *args)
    plain = _op_outputs_and_grads(shared_prefix_attention_ref, tensors, *args)
    names = ["prompt_out", "comp_out", "d_prompt_q", "d_prompt_k", "d_prompt_v", "d_comp_q", "d_comp_k", "d_comp_v"]
    for name, o, r, p in zip(names, ours, ref, plain):
        assert_close_2x(o, r, p, name=name)


def test_restores_attention_on_error():
    model = tiny_causal_lm("llama", seed=0)
    bad = PolicyBatch([[5, 6]], torch.full((1, 3), 10_000), torch.ones(1, 3), 1)  # token id out of range
    with pytest.raises(IndexError):
        shared_prefix_hidden_states(model, bad, PAD)
    assert model.config._attn_implementation == "sdpa"


def test_refuses_unsupported_models():
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    ok, reason = can_share_prefix(gpt2)
    assert not ok and reason
    sliding = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=4, max_window_layers=0))
    ok, reason = can_share_prefix(sliding)
    assert not ok and "slid" in reason
    with pytest.raises(ValueError, match="unavailable"):
        shared_prefix_hidden_states(sliding, _batch(1), PAD)  # sequences of 13 tokens, window 4
    assert can_share_prefix(sliding, max_len=4)[0]  # a window no shorter than the sequences changes nothing
    assert can_share_prefix(tiny_causal_lm("qwen2"))[0]


def test_sliding_window_wider_than_sequences():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=64,
                         max_window_layers=0, initializer_range=0.3, pad_token_id=PAD)
    assert "sliding_attention" in config.layer_types
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    batch = _batch(3)
    with torch.no_grad():
        ours = shared_prefix_hidden_states(model, batch, PAD)
        ref = completion_hidden_states(model, batch, PAD)
    mask = batch.completion_mask[..., None]
    torch.testing.assert_close(ours * mask, ref * mask, rtol=1e-4, atol=1e-4)


def test_register_attention_makes_a_function_selectable():
    from transformers import AttentionInterface

    from grpo_fast.shared_prefix import TRAIN_ATTN_NAME, register_attention

    assert TRAIN_ATTN_NAME in AttentionInterface()  # registered at import, where the function is defined
    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return AttentionInterface()["sdpa"](module, query, key, value, attention_mask, **kwargs)

    assert register_attention("grpo_fast_test_spy", spy) == "grpo_fast_test_spy"
    model = tiny_causal_lm("llama", seed=0)
    model.set_attn_implementation("grpo_fast_test_spy")
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    assert len(calls) == model.config.num_hidden_layers
    model.set_attn_implementation(TRAIN_ATTN_NAME)
    with pytest.raises(RuntimeError, match="needs the shared_prefix= keyword"), torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
