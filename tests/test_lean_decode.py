"""LeanDecoder, the sampler's CPU forward for Llama and Qwen2: the same tokens and log-probs as the model's own
forward, bit for bit (fp32, bf16 weights, bf16 autocast with oneDNN's packed GEMM; tied and untied heads; q/k/v
biases; ragged groups after rows finish), and the model's own forward wherever the lean one would not compute the
same thing."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

from grpo_fast.lean_decode import LeanDecoder, unsupported_reason
from grpo_fast.sampler import SharedPrefixSampler
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer

PROMPTS = ["12+35=", "7*8=?", "what is (3+4)*2? answer:"]
BF16_GEMM = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _generate(model, lean, precision="fp32", **kw):
    sampler = SharedPrefixSampler(model, tiny_tokenizer(), lean=lean)
    args = dict(group_size=3, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=[1, 2, 3],
                eos_token_id=[5, 9, 17]) | kw  # frequent EOS: groups turn ragged as rows finish
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        return sampler.generate(PROMPTS, **args)


def _assert_same(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.logprobs, b.logprobs)
    assert a.finish_reasons == b.finish_reasons


@pytest.mark.parametrize("precision", ["fp32", "bf16_weights",
                                       pytest.param("autocast", marks=pytest.mark.skipif(
                                           not BF16_GEMM, reason="oneDNN has no bf16 GEMM on this CPU"))])
@pytest.mark.parametrize("kind,tie", [("llama", True), ("llama", False), ("qwen2", False)])  # qwen2: q/k/v biases
def test_same_tokens_and_logprobs_as_the_models_forward(kind, tie, precision, spy):
    model = tiny_causal_lm(kind, tie=tie, layers=3).eval()
    if precision == "bf16_weights":
        model = model.bfloat16()
    assert unsupported_reason(model) is None
    calls = spy(LeanDecoder, "__call__")
    lean = _generate(model, True, precision)
    assert len(calls) >= 6  # the prefill and the decode steps
    steps = len(calls)
    own = _generate(model, False, precision)
    assert len(calls) == steps
    _assert_same(lean, own)
    lengths = lean.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1 and "eos" in lean.finish_reasons  # the ragged path ran
    full = _generate(model, True, precision, eos_token_id=None, ignore_eos=True)  # even groups throughout
    _assert_same(full, _generate(model, False, precision, eos_token_id=None, ignore_eos=True))


def test_greedy_and_stop_strings_match(spy):
    model = tiny_causal_lm("qwen2").eval()
    for kw in ({"temperature": 0.0}, {"stop": ["1", "2"], "repetition_penalty": 1.3}):
        _assert_same(_generate(model, True, **kw), _generate(model, False, **kw))


class _Subclass(LlamaForCausalLM):
    pass


def _hooked(model):
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out)
    return model


def _replaced_submodule_forward(model):
    proj = model.model.layers[1].self_attn.o_proj
    proj.forward = types.MethodType(torch.nn.Linear.forward, proj)
    return model


def _replaced_forward(model, accelerate_marker=False):
    if accelerate_marker:
        model._original_forward = model.forward
    model.forward = types.MethodType(type(model).forward, model)
    return model


def _gelu(model):
    model.config.hidden_act = "gelu"
    return model


def _subclass(model):
    model.__class__ = _Subclass
    return model


def _mistral(_):
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=60, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                            eos_token_id=1, sliding_window=None))


CASES = {
    "forward hook": (_hooked, "forward hooks"),
    "replaced submodule forward": (_replaced_submodule_forward, "submodule's forward is replaced"),
    "replaced forward": (_replaced_forward, "model's forward is replaced"),
    "accelerate's forward without autocast": (lambda m: _replaced_forward(m, True), "model's forward is replaced"),
    "gelu": (_gelu, "hidden_act 'gelu'"),
    "subclass": (_subclass, "_Subclass is not LlamaForCausalLM"),
    "other architecture": (_mistral, "MistralForCausalLM is not"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_falls_back_to_the_models_forward(case, spy):
    change, reason = CASES[case]
    model = change(tiny_causal_lm("llama").eval())
    assert reason in unsupported_reason(model)
    calls = spy(LeanDecoder, "__call__")
    out = _generate(model, True)
    assert calls == []
    _assert_same(out, _generate(model, False))


@pytest.mark.skipif(not BF16_GEMM, reason="oneDNN has no bf16 GEMM on this CPU")
def test_accelerates_mixed_precision_forward_under_autocast_is_served(spy):
    """TRL's generation: accelerate replaced the forward by its autocast wrapper, and the caller's autocast is on."""
    model = _replaced_forward(tiny_causal_lm("llama").eval(), accelerate_marker=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unsupported_reason(model) is None
    calls = spy(LeanDecoder, "__call__")
    lean = _generate(model, True, "autocast")
    assert calls
    _assert_same(lean, _generate(model, False, "autocast"))


@pytest.mark.parametrize("precision", ["fp32", pytest.param("autocast", marks=pytest.mark.skipif(
    not BF16_GEMM, reason="oneDNN has no bf16 GEMM on this CPU"))])
def test_gradient_checkpointings_input_hook_is_served(precision, spy):
    """TRL's default (gradient checkpointing) hooks the input embedding, which the lean forward calls as a module."""
    model = tiny_causal_lm("llama")
    model.gradient_checkpointing_enable()
    assert model.model.embed_tokens._forward_hooks
    model.eval()
    assert unsupported_reason(model) is None
    calls = spy(LeanDecoder, "__call__")
    lean = _generate(model, True, precision)
    assert calls
    _assert_same(lean, _generate(model, False, precision))


def test_peft_adapters_fall_back(spy):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_causal_lm("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    base = model.get_base_model().eval()
    assert "not plain nn.Linear" in unsupported_reason(base)
    calls = spy(LeanDecoder, "__call__")
    _generate(base, None)
    assert calls == []
