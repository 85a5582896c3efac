"""The decode loop the CUDA graphs capture, checked on the CPU: a decode step reads nothing on the host, the bucketed
masked schedule is token-identical to the plain one for every sampling option, EOS, stop strings and bucket
switches, and the counter-based draw and the sort-free top-p keep their semantics."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import grpo_fast.decode as decode_mod
from grpo_fast.decode import bucket_sizes, param_fingerprint
from grpo_fast.sampler import SharedPrefixSampler
from grpo_fast.sampling import CounterUniform, top_p_keep
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer

PROMPTS = ["1+2=", "a", "(3*4)-5 = ?", "xyz"]

# Ops that read a tensor value on the host, whose output shape depends on tensor values, or that build a tensor
# from host data (``torch.tensor`` inside a step: a host-to-device copy, illegal while a CUDA graph captures).
HOST_READS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique", "_unique2",
              "unique_consecutive", "unique_dim", "bincount", "histc", "masked_scatter", "argwhere", "lift_fresh",
              "lift_fresh_copy"}


class _SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.hits.append(str(func))
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # boolean-mask indexing = nonzero
            for idx in (args[1] if len(args) > 1 else []) or []:
                if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
                    self.hits.append(f"{func} with a boolean mask")
        if name in ("repeat_interleave",) and kwargs.get("output_size") is None and len(args) < 3:
            self.hits.append(f"{func} without output_size")
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and any(
                    isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
                self.hits.append(f"{func}: device -> host copy")
        return out


class _HostConversions(TorchFunctionMode):
    """Python-level reads of tensor values (``tolist`` of a CPU tensor never reaches the dispatcher)."""

    NAMES = {"tolist", "__bool__", "__int__", "__float__", "__index__", "item", "numpy", "__array__"}

    def __init__(self, hits):
        super().__init__()
        self.hits = hits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.hits.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _Counted:
    """Both modes at once; ``hits`` lists every host read seen inside."""

    def __enter__(self):
        self.dispatch = _SyncCounter()
        self.hits = self.dispatch.hits
        self.function = _HostConversions(self.hits)
        self.function.__enter__()
        self.dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self.dispatch.__exit__(*exc)
        self.function.__exit__(*exc)


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("qwen2").eval()


ALL_OPTIONS = {"temperature": 1.3, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3,
               "return_truncated_logprobs": True}
SYNC_CASES = [({"temperature": 0.0}, "torch"), ({"temperature": 0.7, "top_p": 0.8, "min_p": 0.02}, "torch"),
              (ALL_OPTIONS, "torch"), pytest.param(ALL_OPTIONS, "triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("kw,backend", SYNC_CASES, ids=["greedy", "top_p_min_p", "all", "all_triton"])
def test_decode_step_is_sync_free(model, monkeypatch, kw, backend, force_backend):
    """Every decode step runs under a dispatch mode counting host reads; the host checks run outside it. With the
    Triton backend (interpreted here) the attention's launcher is covered too."""
    force_backend(backend)
    counts = []
    real_step, real_sample = decode_mod.decode_step, decode_mod.sample_step

    def counted(fn):
        def run(*args):
            with _Counted() as mode:
                fn(*args)
            counts.append(mode.hits)
        return run

    monkeypatch.setattr(decode_mod, "decode_step", counted(real_step))
    monkeypatch.setattr(decode_mod, "sample_step", counted(real_sample))
    s = SharedPrefixSampler(model, tiny_tokenizer(), check_every=4)
    out = s.generate(PROMPTS, group_size=3, max_new_tokens=12, seed=[1, 2, 3, 4], eos_token_id=[5, 9, 17], **kw)
    assert len(counts) >= 4
    assert all(hits == [] for hits in counts), counts
    assert out.completion_ids.shape[0] == 12


def test_sync_counter_catches_host_reads():
    """The counter is not blind: each kind of host read it must catch is caught."""
    x = torch.tensor([0.0, 1.0, 2.0])
    for fn in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x.nonzero(), lambda: x[x > 0],
               lambda: x.masked_select(x > 0), lambda: torch.unique(x), lambda: x.tolist(),
               lambda: torch.repeat_interleave(x, torch.tensor([1, 2, 0])), lambda: x + torch.tensor([1.0])):
        with _Counted() as mode:
            fn()
        assert mode.hits, fn


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(12) == [12, 8, 6, 4, 3, 2, 1]
    sizes = bucket_sizes(256)
    assert sizes[0] == 256 and sizes[-1] == 1 and sizes == sorted(set(sizes), reverse=True)
    assert all(a <= 1.5 * b for a, b in zip(sizes, sizes[1:]) if b >= 2)  # padding wastes at most a third


OPTIONS = {
    "greedy": dict(temperature=0.0),
    "sample": dict(temperature=1.0),
    "temp_top_k": dict(temperature=0.7, top_k=7),
    "top_p": dict(temperature=1.2, top_p=0.7),
    "min_p": dict(temperature=0.9, min_p=0.05),
    "penalty_all": dict(temperature=1.1, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.4),
}


def _same(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert a.finish_reasons == b.finish_reasons and a.texts == b.texts
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.truncated_logprobs, b.truncated_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(OPTIONS), ids=list(OPTIONS))
def test_bucketed_schedule_matches_plain(model, name):
    """The graph path's schedule (masked rows, compaction to buckets only, K = 3), run eagerly, equals the plain CPU
    schedule (compaction to the live count every step) token for token, with EOS ids that end rows at many steps."""
    tok = tiny_tokenizer()
    kw = dict(group_size=5, max_new_tokens=20, seed=[11, 12, 13, 14], eos_token_id=[4, 7, 12, 20, 33],
              return_truncated_logprobs=True) | OPTIONS[name]
    plain = SharedPrefixSampler(model, tok, check_every=1).generate(PROMPTS, **kw)
    lengths = plain.completion_mask.sum(1)
    assert len(set(lengths.tolist())) >= 3  # rows finish at different steps
    widths = []
    real = decode_mod.DecodeState.compact

    def spy(self, keep, *a):
        real(self, keep, *a)
        widths.append(self.n)

    decode_mod.DecodeState.compact = spy
    try:
        bucketed = SharedPrefixSampler(model, tok, check_every=3, bucketed=True).generate(PROMPTS, **kw)
    finally:
        decode_mod.DecodeState.compact = real
    _same(plain, bucketed)
    assert set(widths) <= set(bucket_sizes(20))
    if name != "greedy":
        assert len(widths) >= 2  # at least two bucket switches


def test_stop_strings_and_eos_under_every_schedule(model):
    """Stop strings found at host checks K steps late: tokens after the stop are cut, survivors unchanged."""
    tok = tiny_tokenizer()
    base = dict(group_size=3, max_new_tokens=16, temperature=0.8, seed=[5, 6, 7, 8], eos_token_id=[1, 9])
    full = SharedPrefixSampler(model, tok).generate(PROMPTS, **base, ignore_eos=True)
    stop = [full.texts[0][2:4], full.texts[5][6:7]]
    outs = [SharedPrefixSampler(model, tok, check_every=k, bucketed=bk).generate(PROMPTS, **base, stop=stop)
            for k, bk in ((1, False), (4, False), (5, True), (16, True))]
    for out in outs[1:]:
        _same(outs[0], out)
    out = outs[0]
    assert "stop" in out.finish_reasons
    for n, reason in enumerate(out.finish_reasons):
        m = int(out.completion_mask[n].sum())
        assert torch.equal(out.completion_ids[n, :m], full.completion_ids[n, :m])
        assert (out.completion_ids[n, m:] == 0).all()
        if reason == "stop":
            assert any(s in tok.decode(full.completion_ids[n, :m]) for s in stop)
            assert not any(s in out.texts[n] for s in stop)


def test_counter_uniform_matches_splitmix64_and_batch_composition():
    mask = (1 << 64) - 1

    def splitmix(z):
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    gen = CounterUniform([3, 2**40 + 7], 2, "cpu")
    for step in (0, 1, 1000, 2**31 + 5):
        u = CounterUniform.uniform(gen.keys, torch.tensor(step))[:, 0]
        for row, (seed, g) in enumerate([(3, 0), (3, 1), (2**40 + 7, 0), (2**40 + 7, 1)]):
            key = splitmix((seed * 0x9E3779B97F4A7C15 + g) & mask)
            z = splitmix((key + step * 0x9E3779B97F4A7C15) & mask)
            assert u[row].item() == (z >> 11) * 2.0**-53


def test_completion_independent_of_batch_composition(model):
    tok = tiny_tokenizer()
    kw = dict(group_size=2, max_new_tokens=10, temperature=1.0, top_p=0.9, eos_token_id=[4, 7])
    both = SharedPrefixSampler(model, tok).generate(PROMPTS, seed=[1, 2, 3, 4], **kw)
    alone = SharedPrefixSampler(model, tok).generate(PROMPTS[2:3], seed=[3], **kw)
    m = alone.completion_ids.shape[1]
    assert torch.equal(both.completion_ids[4:6, :m], alone.completion_ids)


def _top_p_sorted_ref(probs, top_p):
    """The by-value rule with a full sort in float64: keep i when the mass strictly above p_i is below top_p."""
    p = probs.double()
    vals = p.sort(-1, descending=True).values
    above = torch.stack([(p[r][None, :] > p[r][:, None]).double() @ p[r] for r in range(p.shape[0])])  # [n, V]
    keep = above < top_p
    assert (keep.sum(-1) >= 1).all() and vals.shape == p.shape
    return keep


@pytest.mark.parametrize("shape,top_p,flat", [((4, 300), 0.9, False), ((3, 5000), 0.95, True),
                                              ((2, 4099), 0.3, True), ((5, 64), 0.999, False)],
                         ids=["peaked", "flat_5000", "flat_odd_v", "almost_all"])
def test_top_p_radix_select_matches_sort(shape, top_p, flat):
    """Also where the nucleus holds thousands of tokens (a top-1024 shortcut would have to fall back)."""
    gen = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(shape, generator=gen) * (0.05 if flat else 3.0)
    logits[0, :7] = logits[0, 7]  # ties
    probs = logits.softmax(-1)
    keep = top_p_keep(probs, top_p)
    ref = _top_p_sorted_ref(probs, top_p)
    assert torch.equal(keep, ref)
    if flat:
        assert (keep.sum(-1) > 1024).any()


def test_param_fingerprint_sees_moved_parameters(model):
    m = tiny_causal_lm("llama")
    fp = param_fingerprint(m)
    assert param_fingerprint(m) == fp
    with torch.no_grad():
        m.lm_head.weight.mul_(2)  # an optimizer step: in place, same addresses
    assert param_fingerprint(m) == fp
    m.lm_head.weight.data = m.lm_head.weight.data.clone()  # re-allocated
    assert param_fingerprint(m) != fp
    fp = param_fingerprint(m)
    assert param_fingerprint(m.double()) != fp


def test_rejects_bad_constructor_options(model):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="check_every"):
            SharedPrefixSampler(model, None, check_every=bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graphs"):
            SharedPrefixSampler(model, None, cuda_graphs=True)
