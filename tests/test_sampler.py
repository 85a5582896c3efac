"""SharedPrefixSampler on tiny random GQA models: greedy parity with HF generate, log-probs vs teacher forcing,
option validation, stop strings, EOS, cache shapes, state restoration; a slow parity test on SmolLM2-135M."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import grpo_fast.decode as decode_mod
import grpo_fast.sampler as sampler_mod
from grpo_fast.sampler import SharedPrefixSampler
from grpo_fast.sampling import SamplingOptions, draw, sample_tokens

PROMPTS = ["hello there", "a", "the quick brown fox jumps"]
KW = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
          vocab_size=300, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)


@functools.cache
def _tokenizer():
    chars = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(161, 161 + 202)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(chars)}  # 300 tokens
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _model(kind="llama", **extra):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**KW, **extra))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**KW, **extra))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)  # sharp logits: greedy comparisons must not flip on near-ties
    return model.eval()


@functools.cache
def _cached_model(kind):
    return _model(kind)


def _ids(prompts):
    return [_tokenizer()(p, add_special_tokens=False)["input_ids"] for p in prompts]


def _hf_greedy(model, prompt_ids, g, new):
    width = max(map(len, prompt_ids))
    rows = [p for p in prompt_ids for _ in range(g)]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=0)
    return out[:, width:]


@pytest.mark.parametrize("g", [1, 2, 5])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_matches_hf_generate(kind, g):
    model = _cached_model(kind)
    out = SharedPrefixSampler(model, _tokenizer()).generate(PROMPTS, group_size=g, max_new_tokens=10, temperature=0)
    ref = _hf_greedy(model, _ids(PROMPTS), g, 10)
    assert out.completion_ids.shape == ref.shape
    assert torch.equal(out.completion_ids, ref)
    assert out.prompt_ids == _ids(PROMPTS)
    assert len(out.texts) == len(PROMPTS) * g


def _teacher_forced(model, prompt_ids, out, g, temperature):
    logps = torch.zeros_like(out.logprobs)
    for n in range(out.completion_ids.shape[0]):
        length = int(out.completion_mask[n].sum())
        prompt = prompt_ids[n // g]
        seq = torch.tensor(prompt + out.completion_ids[n, :length].tolist())[None]
        logits = model(seq).logits[0, len(prompt) - 1: len(prompt) - 1 + length].float() / temperature
        logps[n, :length] = logits.log_softmax(-1).gather(1, seq[0, len(prompt):, None])[:, 0]
    return logps


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sampling_logprobs_match_teacher_forcing(kind):
    """Several EOS ids end rows at different steps, so compaction and ragged groups are exercised too."""
    model = _cached_model(kind)
    prompt_ids = _ids(PROMPTS)
    eos = list(range(40, 52))
    out = SharedPrefixSampler(model, _tokenizer()).generate(prompt_ids, group_size=4, max_new_tokens=16,
                                                            temperature=0.7, seed=1, eos_token_id=eos,
                                                            return_truncated_logprobs=True)
    assert {"eos", "length"} <= set(out.finish_reasons)
    lengths = out.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 2
    with torch.no_grad():
        ref = _teacher_forced(model, prompt_ids, out, 4, 0.7)
    torch.testing.assert_close(out.logprobs, ref, atol=2e-4, rtol=1e-4)
    # No truncation requested: the distribution sampled from is the temperature-scaled one.
    torch.testing.assert_close(out.truncated_logprobs, out.logprobs, atol=1e-5, rtol=0)
    for n, reason in enumerate(out.finish_reasons):
        last = out.completion_ids[n, lengths[n] - 1].item()
        assert (reason == "eos") == (last in eos)
        assert (out.completion_ids[n, lengths[n]:] == 0).all() and (out.logprobs[n, lengths[n]:] == 0).all()


def test_seeded_sampling_is_reproducible():
    s = SharedPrefixSampler(_cached_model("llama"), _tokenizer())
    kw = dict(group_size=3, max_new_tokens=8, temperature=1.0, top_p=0.9, min_p=0.01, seed=123)
    a, b = s.generate(PROMPTS, **kw), s.generate(PROMPTS, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    c = s.generate(PROMPTS, **(kw | {"seed": 7}))
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_top_k_1_equals_greedy():
    s = SharedPrefixSampler(_cached_model("qwen2"), _tokenizer())
    greedy = s.generate(PROMPTS, group_size=2, max_new_tokens=8, temperature=0)
    top1 = s.generate(PROMPTS, group_size=2, max_new_tokens=8, temperature=1.3, top_k=1, seed=0,
                      return_truncated_logprobs=True)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    assert torch.allclose(top1.truncated_logprobs, torch.zeros(()), atol=1e-6)  # one candidate: probability 1


def test_truncation_narrows_the_sampled_distribution():
    s = SharedPrefixSampler(_cached_model("llama"), _tokenizer())
    out = s.generate(PROMPTS, group_size=4, max_new_tokens=8, temperature=1.5, top_k=20, top_p=0.8, min_p=0.05,
                     seed=3, return_truncated_logprobs=True, ignore_eos=True)
    assert (out.truncated_logprobs >= out.logprobs - 1e-6).all()
    assert (out.truncated_logprobs <= 0).all()


BAD = [("group_size", 0), ("max_new_tokens", 0), ("temperature", -0.1), ("temperature", float("nan")),
       ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("min_p", 1.5), ("min_p", -0.1),
       ("repetition_penalty", 0.0), ("stop", "x"), ("stop", [""]), ("seed", 1.5)]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_rejects_out_of_range_options(name, value):
    s = SharedPrefixSampler(_cached_model("llama"), _tokenizer())
    with pytest.raises(ValueError, match=name):
        s.generate(PROMPTS, **{"max_new_tokens": 2, name: value})


def test_rejects_bad_prompts():
    s = SharedPrefixSampler(_cached_model("llama"), None)
    with pytest.raises(ValueError, match="empty"):
        s.generate([[5, 6], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="tokenizer"):
        s.generate(["text"], max_new_tokens=2)


def test_stop_strings():
    s = SharedPrefixSampler(_cached_model("llama"), _tokenizer())
    full = s.generate(PROMPTS, group_size=1, max_new_tokens=12, temperature=0, ignore_eos=True)
    stop = full.texts[0][3:5]
    out = s.generate(PROMPTS, group_size=1, max_new_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    cut = full.texts[0].find(stop)
    assert out.finish_reasons[0] == "stop" and out.texts[0] == full.texts[0][:cut]
    n = int(out.completion_mask[0].sum())
    assert n == cut + len(stop)  # one token per character: the row ends at the token completing the string
    assert torch.equal(out.completion_ids[0, :n], full.completion_ids[0, :n])
    for i in range(1, len(PROMPTS)):
        m = int(out.completion_mask[i].sum())
        assert torch.equal(out.completion_ids[i, :m], full.completion_ids[i, :m])
        assert (out.finish_reasons[i] == "stop") == (stop in full.texts[i])


def test_eos_finishes_rows_and_survivors_are_unchanged():
    """Greedy rows that hit EOS leave the batch; the others must decode exactly as without EOS."""
    s = SharedPrefixSampler(_cached_model("qwen2"), _tokenizer())
    full = s.generate(PROMPTS, group_size=2, max_new_tokens=12, temperature=0, ignore_eos=True)
    eos = int(full.completion_ids[0, 3])
    out = s.generate(PROMPTS, group_size=2, max_new_tokens=12, temperature=0, eos_token_id=eos)
    for n in range(full.completion_ids.shape[0]):
        hits = (full.completion_ids[n] == eos).nonzero()
        length = int(hits[0]) + 1 if len(hits) else 12
        assert int(out.completion_mask[n].sum()) == length
        assert out.finish_reasons[n] == ("eos" if len(hits) else "length")
        assert torch.equal(out.completion_ids[n, :length], full.completion_ids[n, :length])
        torch.testing.assert_close(out.logprobs[n, :length], full.logprobs[n, :length], atol=1e-5, rtol=0)
    assert out.finish_reasons[0] == "eos" and int(out.completion_mask[0].sum()) <= 4


def test_autocast_casts_each_weight_once_per_call(monkeypatch):
    """The model's own forward (``lean=False``) inside the caller's bf16 autocast (TRL's bf16 generation): every weight
    is cast once per generate call, not once per decode step (inference mode would disable autocast's weight cache),
    and the tokens and log-probs equal those of the per-step casts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = _model("llama")
    weights = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    monkeypatch.setattr(sampler_mod, "_packed_cpu_linears", lambda model, rows: contextlib.nullcontext())

    class WeightCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # a cast dispatches as to.dtype in inference mode, as _to_copy elsewhere (never both)
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and args[0].data_ptr() in weights:
                WeightCasts.count += 1
            return func(*args, **(kwargs or {}))

    def run():
        WeightCasts.count = 0
        with torch.autocast("cpu", dtype=torch.bfloat16), WeightCasts():
            out = SharedPrefixSampler(model, lean=False).generate(_ids(PROMPTS), group_size=2, max_new_tokens=8, seed=3,
                                                      ignore_eos=True)
        return out, WeightCasts.count

    cached, casts = run()
    assert casts == len(weights)  # each linear's weight once (the tied-or-not LM head included)
    monkeypatch.setattr(SharedPrefixSampler, "_decode_mode", lambda self, model, lean=False: torch.inference_mode())
    per_step, casts_per_step = run()
    assert casts_per_step >= 8 * len(weights)  # the prefill and every decode step cast them again
    assert torch.equal(cached.completion_ids, per_step.completion_ids)
    assert torch.equal(cached.logprobs, per_step.logprobs)


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="oneDNN has no bf16 GEMM on this CPU")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v projections with a bias
def test_packed_cpu_linears_change_nothing(kind, monkeypatch, spy):
    """The model's own forward (``lean=False``) under CPU bf16 autocast: the linears decode through oneDNN on weights
    packed once per call: the same tokens and log-probs as autocast's F.linear, and the modules are left as they
    were."""
    model = _model(kind)
    hooked = model.model.layers[0].mlp.down_proj  # an instance-level forward (accelerate's hooks) is left alone
    hook = hooked.forward = functools.partial(torch.nn.Linear.forward, hooked)
    packed_calls = spy(sampler_mod, "packed_linear")

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return SharedPrefixSampler(model, lean=False).generate(_ids(PROMPTS), group_size=3, max_new_tokens=10,
                                                                   seed=5, top_p=0.9, ignore_eos=True)

    packed = run()
    n_linears = sum(type(m) is torch.nn.Linear for m in model.modules()) - 1
    assert len(packed_calls) >= 10 * n_linears  # the prefill and every decode step went through the packed GEMM
    assert hooked.__dict__["forward"] is hook
    assert all("forward" not in m.__dict__ for m in model.modules() if m is not hooked)
    monkeypatch.setattr(sampler_mod, "_packed_cpu_linears", lambda model, rows: contextlib.nullcontext())
    plain = run()
    assert torch.equal(packed.completion_ids, plain.completion_ids)
    assert torch.equal(packed.logprobs, plain.logprobs)
    calls = len(packed_calls)
    fp32 = SharedPrefixSampler(model, lean=False).generate(_ids(PROMPTS), group_size=3, max_new_tokens=10, seed=5,
                                                           top_p=0.9, ignore_eos=True)
    assert len(packed_calls) == calls  # no autocast: no packing
    assert not torch.equal(fp32.logprobs, plain.logprobs)  # bf16 did run


def test_kv_cache_is_prefix_once_plus_preallocated_suffix(monkeypatch):
    caches = []
    real_init = sampler_mod._SharedPrefixCache.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        caches.append(self)

    monkeypatch.setattr(sampler_mod._SharedPrefixCache, "__init__", spy)
    model = _cached_model("llama")
    prompt_ids = _ids(PROMPTS)
    SharedPrefixSampler(model, _tokenizer()).generate(PROMPTS, group_size=5, max_new_tokens=7, seed=0)
    b, n, p = len(PROMPTS), len(PROMPTS) * 5, max(map(len, prompt_ids))
    hkv, dh = 2, 16
    (cache,) = caches
    assert len(cache.layers) == 2
    for layer in cache.layers:
        assert layer.prefix_k.shape == layer.prefix_v.shape == (b, hkv, p, dh)
        assert layer.suffix_k.shape == layer.suffix_v.shape == (n, hkv, 7, dh)
    # The packed prefill put each prompt's K/V in its row: the same as a plain forward of that prompt alone.
    for i, ids in enumerate(prompt_ids):
        with torch.no_grad():
            ref = model(torch.tensor([ids]), use_cache=True).cache
        for layer, ref_layer in zip(cache.layers, ref.layers):
            torch.testing.assert_close(layer.prefix_k[i, :, : len(ids)], ref_layer.keys[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.prefix_v[i, :, : len(ids)], ref_layer.values[0], atol=1e-5, rtol=1e-5)
            assert (layer.prefix_k[i, :, len(ids):] == 0).all()


def test_state_restored_after_generate_and_after_error(monkeypatch):
    model = _model("llama")
    model.train()
    s = SharedPrefixSampler(model, _tokenizer())
    s.generate(PROMPTS, group_size=2, max_new_tokens=3, seed=0)
    assert model.training and model.config._attn_implementation == "sdpa"
    model.eval()
    monkeypatch.setattr(decode_mod, "sample_tokens", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        s.generate(PROMPTS, group_size=2, max_new_tokens=3, seed=0)
    assert not model.training and model.config._attn_implementation == "sdpa"


def test_refuses_unservable_models():
    model = _model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding window"):
        SharedPrefixSampler(model, _tokenizer()).generate(PROMPTS, max_new_tokens=4)
    assert model.config._attn_implementation == "sdpa"

    class NoInterface(LlamaForCausalLM):
        _can_set_attn_implementation_cached_value = False

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="AttentionInterface"):
        SharedPrefixSampler(NoInterface(LlamaConfig(**KW)), None).generate([[5, 6]], max_new_tokens=2)


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_generate():
    models = pytest.importorskip("grpo_fast.models")
    try:
        model, tokenizer = models.load_default_model(dtype=torch.float32)
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"default model unavailable: {err}")
    prompts = ["What is the capital of France?", "Write a haiku about the sea, please. Keep it short."]
    out = SharedPrefixSampler(model, tokenizer).generate(prompts, group_size=2, max_new_tokens=16, temperature=0)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inp = torch.full((4, width), pad, dtype=torch.long)
    mask = torch.zeros_like(inp)
    for i in range(4):
        p = ids[i // 2]
        inp[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    ref = model.generate(input_ids=inp, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=pad)
    assert torch.equal(out.completion_ids, ref[:, width:])


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (7, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.1),
                                              (12, 0.8, 0.05)])
def test_sampling_distribution_matches_hf_warpers(top_k, top_p, min_p):
    """Empirical frequencies of 40k draws vs the distribution HF's warpers define (temperature → k → p → min-p)."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(0)) * 2
    ref = TemperatureLogitsWarper(0.8)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    if min_p:
        ref = MinPLogitsWarper(min_p)(None, ref)
    ref = ref.softmax(-1)[0]
    rows = 40_000
    u = torch.rand((rows, 1), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opts = SamplingOptions(0.8, top_k, top_p, min_p, 1.0, want_truncated=True)
    tok, lp, tlp = sample_tokens(logits.repeat(rows, 1), opts, None, u)
    freq = torch.bincount(tok, minlength=40).double() / rows
    assert (freq[ref == 0] == 0).all()
    assert 0.5 * (freq - ref.double()).abs().sum() < 0.02
    torch.testing.assert_close(tlp, ref[tok].log(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp, (logits[0] / 0.8).log_softmax(-1)[tok], atol=1e-5, rtol=1e-5)


def test_two_level_draw_matches_probabilities():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(1, 3001, generator=gen) ** 4  # not a multiple of the block width
    p[0, 5:300] = 0
    rows = 100_000
    tok = draw(p.expand(rows, -1).contiguous(), torch.rand((rows, 1), generator=gen, dtype=torch.float64))
    freq = torch.bincount(tok, minlength=3001).double() / rows
    ref = (p[0] / p.sum()).double()
    assert freq[5:300].sum() == 0 and tok.max() < 3001
    assert 0.5 * (freq - ref).abs().sum() < 0.06  # sampling noise alone gives ~0.04 here
