"""prefix_decode_attention (torch path and Triton under the interpreter) against the fp64 concatenated-cache oracle."""

from __future__ import annotations

import pytest
import torch

from grpo_fast.kernels.prefix_attention import DecodePlan, prefix_decode_attention, prefix_decode_attention_ref

# (B, G, H, Hkv, S, P, Ls, Dh)
CASES = {
    "gqa": (2, 3, 4, 2, 1, 37, 9, 16),
    "mha_g1": (3, 1, 2, 2, 1, 20, 5, 8),
    "prefix1": (2, 2, 6, 2, 1, 1, 4, 16),
    "suffix0": (2, 4, 4, 1, 1, 17, 0, 16),
    "multi_query_s3": (2, 2, 4, 2, 3, 11, 6, 16),
    "dh_odd": (1, 5, 3, 1, 1, 40, 33, 24),
}


def _make(b, g, h, hkv, s, p, ls, dh, ragged, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = b * g
    q = torch.randn(n, h, s, dh, generator=gen)
    pk, pv = torch.randn(b, hkv, p, dh, generator=gen), torch.randn(b, hkv, p, dh, generator=gen)
    cap = max(ls, 1)
    sk, sv = torch.randn(n, hkv, cap, dh, generator=gen), torch.randn(n, hkv, cap, dh, generator=gen)
    if ragged:
        plens = torch.randint(1, p + 1, (b,), generator=gen)
        plens[0] = p
        slens = torch.randint(max(s - 1, 0), ls + 1, (n,), generator=gen) if ls else torch.zeros(n, dtype=torch.long)
        if ls:
            slens[-1] = ls
    else:
        plens, slens = torch.full((b,), p), ls
    return q, pk, pv, plens, sk, sv, slens


@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "ragged"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_fp64_reference(case, backend, ragged, force_backend, poison, assert_close_2x):
    force_backend(backend)
    q, pk, pv, plens, sk, sv, slens = _make(*CASES[case], ragged=ragged)
    g = CASES[case][1]
    out, lse = prefix_decode_attention(q, pk, pv, plens, sk, sv, slens, g, return_lse=True)
    ref, ref_lse = prefix_decode_attention_ref(q, pk, pv, plens, sk, sv, slens, g, return_lse=True)
    plain, plain_lse = prefix_decode_attention_ref(q, pk, pv, plens, sk, sv, slens, g, return_lse=True,
                                                   dtype=torch.float32)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_2x(out, ref, plain, name=f"{case} out")
    out_only = prefix_decode_attention(q, pk, pv, plens, sk, sv, slens, g)  # the decode fast path where eligible
    assert_close_2x(out_only, ref, plain, name=f"{case} out without lse")
    assert_close_2x(lse, ref_lse, plain_lse, name=f"{case} lse")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_group_offsets_with_dropped_rows(backend, force_backend, poison, assert_close_2x):
    """A sampler that drops finished rows passes row offsets: groups of 3, 0 (all finished) and 1 rows."""
    force_backend(backend)
    q, pk, pv, plens, sk, sv, _ = _make(3, 3, 4, 2, 1, 19, 7, 16, ragged=True, seed=3)
    keep = torch.tensor([0, 1, 2, 7])
    offsets = torch.tensor([0, 3, 3, 4])
    q, sk, sv = q[keep], sk[keep], sv[keep]
    out = prefix_decode_attention(q, pk, pv, plens, sk, sv, 5, offsets)
    ref = prefix_decode_attention_ref(q, pk, pv, plens, sk, sv, 5, offsets)
    plain = prefix_decode_attention_ref(q, pk, pv, plens, sk, sv, 5, offsets, dtype=torch.float32)
    assert_close_2x(out, ref, plain, name="offsets")


def test_bf16_torch_path(assert_close_2x, force_backend):
    force_backend("torch")
    q, pk, pv, plens, sk, sv, slens = _make(2, 4, 4, 2, 1, 64, 12, 32, ragged=True, seed=5)
    q, pk, pv, sk, sv = (t.bfloat16() for t in (q, pk, pv, sk, sv))
    out = prefix_decode_attention(q, pk, pv, plens, sk, sv, slens, 4)
    ref = prefix_decode_attention_ref(q, pk, pv, plens, sk, sv, slens, 4)
    plain = prefix_decode_attention_ref(q, pk, pv, plens, sk, sv, slens, 4, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_close_2x(out, ref, plain, name="bf16")


@pytest.mark.parametrize("decode_path", [True, False], ids=["decode", "lse"])
def test_cpu_path_ignores_autocast(decode_path, force_backend):
    """Under the caller's bf16 autocast (a bf16 sampler or trainer) the CPU path keeps its fp32 scores: the result is
    bit-identical to the one without autocast, for bf16 and fp32 inputs alike."""
    force_backend("torch")
    q, pk, pv, plens, sk, sv, slens = _make(2, 3, 4, 2, 1, 23, 7, 16, ragged=True, seed=7)
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.to(dtype) for t in (q, pk, pv)] + [plens] + [t.to(dtype) for t in (sk, sv)] + [slens, 3]
        plain = prefix_decode_attention(*args, return_lse=not decode_path)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = prefix_decode_attention(*args, return_lse=not decode_path)
        for a, b in zip(*((plain, under) if not decode_path else ((plain,), (under,))), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), dtype


def test_rejects_bad_shapes():
    q = torch.randn(6, 4, 1, 8)
    pk = torch.randn(2, 3, 5, 8)
    sk = torch.randn(6, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        prefix_decode_attention(q, pk, pk, torch.full((2,), 5), sk, sk, 1, 3)
    pk = torch.randn(2, 2, 5, 8)
    sk = torch.randn(6, 2, 2, 8)
    with pytest.raises(ValueError, match="group_size"):
        prefix_decode_attention(q, pk, pk, torch.full((2,), 5), sk, sk, 1, 2)


SPLIT_CASES = {  # (B, G, H, Hkv, S, P, Ls, Dh)
    "gqa": (2, 3, 4, 2, 1, 150, 9, 16),
    "g1_mha": (3, 1, 2, 2, 1, 97, 5, 8),
    "dh_odd": (1, 5, 3, 1, 1, 200, 7, 24),
    "s2": (2, 2, 4, 2, 2, 70, 6, 16),
}


@pytest.mark.triton
@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("case", list(SPLIT_CASES), ids=list(SPLIT_CASES))
def test_prefix_split_matches_fp64_reference(case, splits, force_backend, poison, assert_close_2x):
    """Flash-decoding: the prefix split across programs (ragged prompts, some splits past a short prompt's end),
    partials merged by log-sum-exp; 3 rounds up to 4 splits."""
    force_backend("triton")
    q, pk, pv, plens, sk, sv, slens = _make(*SPLIT_CASES[case], ragged=True, seed=splits)
    g = SPLIT_CASES[case][1]
    out, lse = prefix_decode_attention(q, pk, pv, plens, sk, sv, slens, g, return_lse=True, num_splits=splits)
    ref, ref_lse = prefix_decode_attention_ref(q, pk, pv, plens, sk, sv, slens, g, return_lse=True)
    plain, plain_lse = prefix_decode_attention_ref(q, pk, pv, plens, sk, sv, slens, g, return_lse=True,
                                                   dtype=torch.float32)
    assert_close_2x(out, ref, plain, atol=1e-5, name=f"{case} out")
    assert_close_2x(lse, ref_lse, plain_lse, atol=1e-5, name=f"{case} lse")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("groups", ["uniform", "offsets"])
def test_suffix_length_as_device_scalar(backend, groups, force_backend, poison, assert_close_2x):
    """What a captured decode step passes: one suffix length for all rows as a 0-dim tensor, the suffix buffer
    longer than it (its tail must not count), and group offsets with an upper bound on the group size."""
    force_backend(backend)
    q, pk, pv, plens, sk, sv, _ = _make(3, 3, 6, 2, 1, 23, 11, 24, ragged=True, seed=7)
    sk[:, :, 6:], sv[:, :, 6:] = 1e4, -1e4  # entries past the length: finite garbage the mask must drop
    slen = torch.tensor(6)
    if groups == "offsets":
        keep = torch.tensor([0, 2, 6, 7, 8])
        q, sk, sv = q[keep], sk[keep], sv[keep]
        g, kw = torch.tensor([0, 2, 2, 5]), dict(max_group_size=3)
    else:
        g, kw = 3, {}
    out = prefix_decode_attention(q, pk, pv, plens, sk, sv, slen, g, **kw)
    ref = prefix_decode_attention_ref(q, pk, pv, plens, sk, sv, 6, g)
    plain = prefix_decode_attention_ref(q, pk, pv, plens, sk, sv, 6, g, dtype=torch.float32)
    assert_close_2x(out, ref, plain, atol=1e-5, name=f"{backend} {groups}")


@pytest.mark.parametrize("lengths", ["int", "scalar_tensor", "per_row"])
@pytest.mark.parametrize("groups", ["uniform", "offsets"])
def test_decode_plan_shared_by_the_layers_of_a_step(groups, lengths, force_backend):
    """One DecodePlan passed to every layer of a decode step: the first call builds the masks and slots, the others
    reuse them, and every layer's output is the one it gets without a plan."""
    force_backend("torch")
    plan = DecodePlan()
    *_, plens, _, _, slens = _make(3, 3, 6, 2, 1, 23, 11, 24, ragged=True)  # one step: the same lengths throughout
    for layer in range(3):
        q, pk, pv, _, sk, sv, _ = _make(3, 3, 6, 2, 1, 23, 11, 24, ragged=True, seed=layer)
        g, kw = 3, {}
        if groups == "offsets":
            keep = torch.tensor([0, 2, 6, 7, 8])
            q, sk, sv = q[keep], sk[keep], sv[keep]
            g, kw = torch.tensor([0, 2, 2, 5]), dict(max_group_size=3)
        rows = slens if groups == "uniform" else slens[keep]
        lens = {"int": 6, "scalar_tensor": torch.tensor(6), "per_row": rows}[lengths]
        planned = prefix_decode_attention(q, pk, pv, plens, sk, sv, lens, g, plan=plan, **kw)
        assert plan.parts is not None
        assert torch.equal(planned, prefix_decode_attention(q, pk, pv, plens, sk, sv, lens, g, **kw))


def test_rejects_bad_suffix_lengths_and_splits():
    q, pk, sk = torch.randn(4, 2, 1, 8), torch.randn(2, 1, 5, 8), torch.randn(4, 1, 3, 8)
    with pytest.raises(ValueError, match="suffix_lens"):
        prefix_decode_attention(q, pk, pk, torch.full((2,), 5), sk, sk, torch.ones(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="num_splits"):
        prefix_decode_attention(q, pk, pk, torch.full((2,), 5), sk, sk, 1, 2, num_splits=0)
