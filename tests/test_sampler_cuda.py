"""The CUDA-graph decode path (skipped without a GPU): graph replay equals the eager run of the same schedule token
for token on every sampling option, EOS, stop strings and bucket switches; graphs are reused across calls, captured
again when the parameters move, and their memory is released with the sampler; the flash-decoding split compiled."""

from __future__ import annotations

import gc

import pytest
import torch

from grpo_fast.kernels.prefix_attention import prefix_decode_attention, prefix_decode_attention_ref
from grpo_fast.sampler import SharedPrefixSampler
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = ["1+2=", "a", "(3*4)-5 = ?", "xyz", "hello world, how are you"]
OPTIONS = {
    "greedy": dict(temperature=0.0),
    "sample": dict(temperature=1.0),
    "top_k_top_p": dict(temperature=0.7, top_k=7, top_p=0.8),
    "top_p": dict(temperature=1.2, top_p=0.7),
    "min_p_penalty": dict(temperature=0.9, min_p=0.05, repetition_penalty=1.3),
}


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("qwen2").cuda().eval()


def _same(a, b, atol=1e-5):
    assert torch.equal(a.completion_ids.cpu(), b.completion_ids.cpu())
    assert torch.equal(a.completion_mask.cpu(), b.completion_mask.cpu())
    assert a.finish_reasons == b.finish_reasons and a.texts == b.texts
    torch.testing.assert_close(a.logprobs.cpu(), b.logprobs.cpu(), atol=atol, rtol=0)
    if a.truncated_logprobs is not None:
        torch.testing.assert_close(a.truncated_logprobs.cpu(), b.truncated_logprobs.cpu(), atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(OPTIONS), ids=list(OPTIONS))
def test_graph_replay_matches_eager(model, name):
    tok = tiny_tokenizer()
    kw = dict(group_size=6, max_new_tokens=24, seed=[1, 2, 3, 4, 5], eos_token_id=[4, 7, 12, 20],
              return_truncated_logprobs=True) | OPTIONS[name]
    eager = SharedPrefixSampler(model, tok, cuda_graphs=False, bucketed=True, check_every=4).generate(PROMPTS, **kw)
    graphed = SharedPrefixSampler(model, tok, cuda_graphs=True, check_every=4)
    out = graphed.generate(PROMPTS, **kw)
    _same(eager, out)
    assert len(graphed._workspace[4].graphs) >= 2 or name == "greedy"  # bucket switches were captured
    assert len(set(out.completion_mask.sum(1).tolist())) >= 2


def test_graph_stop_strings_match_eager(model):
    tok = tiny_tokenizer()
    kw = dict(group_size=3, max_new_tokens=20, temperature=0.8, seed=[5, 6, 7, 8, 9], eos_token_id=[1])
    full = SharedPrefixSampler(model, tok, cuda_graphs=False).generate(PROMPTS, **kw, ignore_eos=True)
    long = [t for t in full.texts if len(t) >= 8]
    stop = [long[0][2:4], long[-1][5:6]]
    eager = SharedPrefixSampler(model, tok, cuda_graphs=False, bucketed=True).generate(PROMPTS, **kw, stop=stop)
    out = SharedPrefixSampler(model, tok, cuda_graphs=True).generate(PROMPTS, **kw, stop=stop)
    _same(eager, out)
    assert "stop" in out.finish_reasons


def test_graphs_reused_then_recaptured_when_parameters_move(model):
    tok = tiny_tokenizer()
    m = tiny_causal_lm("llama", seed=3).cuda().eval()
    kw = dict(group_size=4, max_new_tokens=16, temperature=1.0, seed=[1, 2, 3, 4, 5], ignore_eos=True)
    s = SharedPrefixSampler(m, tok, cuda_graphs=True)
    first = s.generate(PROMPTS, **kw)
    runner = s._workspace[4]
    s.generate(PROMPTS[::-1], **(kw | {"seed": [9, 8, 7, 6, 5]}))  # other prompts, same shapes: graphs reused
    assert s._workspace[4] is runner
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)  # an optimizer step: in place, graphs stay valid and see the new values
    stepped = s.generate(PROMPTS, **kw)
    assert s._workspace[4] is runner
    _same(stepped, SharedPrefixSampler(m, tok, cuda_graphs=False, bucketed=True).generate(PROMPTS, **kw))
    assert not torch.equal(stepped.logprobs, first.logprobs)
    for p in m.parameters():
        p.data = p.data.clone()  # re-allocated (as .to(), FSDP or a PEFT merge would)
    moved = s.generate(PROMPTS, **kw)
    assert s._workspace[4] is not runner
    _same(moved, stepped)


def test_graph_memory_released_with_the_sampler(model):
    """Dropping the sampler frees its decode buffers and graphs (library workspaces may stay: not counted)."""
    tok = tiny_tokenizer()
    kw = {"group_size": 4, "max_new_tokens": 16, "temperature": 1.0, "seed": 0, "ignore_eos": True}
    s = SharedPrefixSampler(model, tok, cuda_graphs=True)
    out = s.generate(PROMPTS, **kw)
    _, _, state, cache, runner = s._workspace
    assert runner.graphs
    held = sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.prefix_k, layer.prefix_v, layer.suffix_k, layer.suffix_v))
    held += state._logits.numel() * state._logits.element_size()
    torch.cuda.synchronize()
    during = torch.cuda.memory_allocated()
    del s, out, state, cache, runner
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= during - held


def test_greedy_graph_matches_hf_generate(model):
    tok = tiny_tokenizer()
    g, new = 3, 12
    out = SharedPrefixSampler(model, tok, cuda_graphs=True).generate(PROMPTS, group_size=g, max_new_tokens=new,
                                                                      temperature=0, ignore_eos=True)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    width = max(map(len, ids))
    rows = [p for p in ids for _ in range(g)]
    x = torch.zeros(len(rows), width, dtype=torch.long)
    m = torch.zeros_like(x)
    for i, p in enumerate(rows):
        x[i, width - len(p):], m[i, width - len(p):] = torch.tensor(p), 1
    ref = model.generate(input_ids=x.cuda(), attention_mask=m.cuda(), do_sample=False, max_new_tokens=new,
                         pad_token_id=0, eos_token_id=None)[:, width:]
    assert torch.equal(out.completion_ids.cpu(), ref.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_prefix_split_compiled(dtype, splits, assert_close_2x):
    """Long ragged prompts, few programs: the default split count fills the GPU; explicit counts agree."""
    gen = torch.Generator().manual_seed(0)
    b, g, h, hkv, p, ls, dh = 2, 4, 9, 3, 1500, 40, 64
    n = b * g
    q = torch.randn(n, h, 1, dh, generator=gen)
    pk, pv = torch.randn(b, hkv, p, dh, generator=gen), torch.randn(b, hkv, p, dh, generator=gen)
    sk, sv = torch.randn(n, hkv, ls, dh, generator=gen), torch.randn(n, hkv, ls, dh, generator=gen)
    plens, slen = torch.tensor([1500, 613]), torch.tensor(17)
    args = [t.to(dtype) for t in (q, pk, pv, sk, sv)]
    qd, pkd, pvd, skd, svd = args
    out, lse = prefix_decode_attention(qd.cuda(), pkd.cuda(), pvd.cuda(), plens.cuda(), skd.cuda(), svd.cuda(),
                                       slen.cuda(), g, return_lse=True, num_splits=splits)
    ref, ref_lse = prefix_decode_attention_ref(qd, pkd, pvd, plens, skd, svd, 17, g, return_lse=True)
    plain, plain_lse = prefix_decode_attention_ref(qd, pkd, pvd, plens, skd, svd, 17, g, return_lse=True,
                                                   dtype=dtype)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close_2x(out.cpu(), ref, plain, atol=atol, name="out")
    assert_close_2x(lse.cpu(), ref_lse, plain_lse, atol=atol, name="lse")


def test_uncapturable_step_falls_back_to_eager(model, monkeypatch):
    """A model whose forward reads a value on the host cannot be captured: one warning, then the eager path."""
    import grpo_fast.decode as decode_mod

    real = decode_mod.forward_step

    def syncing(forward, state):
        int(state.step)  # a host sync: illegal while a CUDA graph is being captured
        real(forward, state)

    monkeypatch.setattr(decode_mod, "forward_step", syncing)
    tok = tiny_tokenizer()
    kw = {"group_size": 3, "max_new_tokens": 10, "temperature": 1.0, "seed": [1, 2, 3, 4, 5]}
    s = SharedPrefixSampler(model, tok)
    with pytest.warns(UserWarning, match="without CUDA graphs"):
        out = s.generate(PROMPTS, **kw)
    assert s.cuda_graphs is False
    _same(out, SharedPrefixSampler(model, tok, cuda_graphs=False).generate(PROMPTS, **kw))
