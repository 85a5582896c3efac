"""The compiled Triton kernels on a CUDA device (skipped without one): every op against the fp64 CPU reference,
forward and every gradient, at the real block sizes and vocabulary, plus the sampler and the shared-prefix update
on the GPU. ``test_grpo_loss.py`` and ``test_linear_grpo_loss.py`` already run on CUDA when it is present; the CPU
suite exercises the same kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpo_fast.kernels.advantages import group_advantages, group_advantages_ref
from grpo_fast.kernels.logprob import linear_logprobs, linear_logprobs_ref
from grpo_fast.kernels.prefix_attention import prefix_decode_attention, prefix_decode_attention_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = "cuda"
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def _cpu(x):
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


# ---------------------------------------------------------------------------------------------- linear_logprobs


def _lp_case(T, D, V, bias, ignore=(), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (scale / math.sqrt(D))
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, V, (T,), generator=g)
    t[list(ignore)] = -100
    g_logp, g_ent = (torch.randn(T, generator=g, dtype=torch.float64) for _ in range(2))
    return h, w, b, t, g_logp, g_ent


def _lp_run(fn, dtype, device, h, w, b, t, g_logp, g_ent, **kw):
    hh = h.detach().to(device, dtype).requires_grad_()
    ww = w.detach().to(device, dtype).requires_grad_()
    bb = b.detach().to(device, dtype).requires_grad_() if b is not None else None
    logp, ent = fn(hh, ww, t.to(device), bias=bb, return_entropy=True, **kw)
    ((logp.double() * g_logp.to(device)).sum() + (ent.double() * g_ent.to(device)).sum()).backward()
    out = {"logp": logp, "entropy": ent, "d_hidden": hh.grad, "d_weight": ww.grad}
    if bb is not None:
        out["d_bias"] = bb.grad
    return {k: _cpu(v) for k, v in out.items()}


@pytest.mark.parametrize(
    ("T", "D", "V", "dtype", "bias", "temperature"),
    [
        (37, 48, 4231, torch.float32, True, 0.7),
        (1, 64, 300, torch.float32, False, 1.3),
        (200, 576, 49152, torch.bfloat16, False, 0.7),  # SmolLM2's LM head
        (129, 576, 49152, torch.float16, True, 1.0),
        (77, 896, 151936, torch.bfloat16, False, 0.9),  # Qwen2.5-0.5B's vocabulary
    ],
    ids=["fp32-V4231", "fp32-T1", "bf16-smollm2", "fp16-bias", "bf16-qwen"],
)
def test_linear_logprobs_compiled(T, D, V, dtype, bias, temperature, assert_close_2x):
    case = _lp_case(T, D, V, bias, ignore=(0, T - 1) if T > 2 else ())
    ours = _lp_run(linear_logprobs, dtype, CUDA, *case, temperature=temperature)
    ref64 = _lp_run(linear_logprobs_ref, torch.float64, "cpu", *case, temperature=temperature)
    plain = _lp_run(linear_logprobs_ref, dtype, CUDA, *case, temperature=temperature)
    for name in ref64:
        assert_close_2x(ours[name], ref64[name], plain[name], atol=ATOL[dtype], name=name)


def test_linear_logprobs_degenerate_compiled():
    h, w, b, t, *_ = _lp_case(9, 48, 300, True, ignore=range(9))
    h, w, b = (x.float().to(CUDA).requires_grad_() for x in (h, w, b))
    logp, ent = linear_logprobs(h, w, t.to(CUDA), bias=b, return_entropy=True)
    assert not logp.any() and not ent.any()
    (logp.sum() + ent.sum()).backward()
    assert not h.grad.any() and not w.grad.any() and not b.grad.any()
    # Zero logits: logp = -log V exactly up to rounding (a padded tail column counted as exp(0) would show).
    V = 4231
    logp, ent = linear_logprobs(torch.randn(5, 48, device=CUDA), torch.zeros(V, 48, device=CUDA),
                                torch.tensor([0, 1, V - 1, V // 2, 7], device=CUDA), temperature=1.3,
                                return_entropy=True)
    torch.testing.assert_close(logp.cpu(), torch.full((5,), -math.log(V)), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.cpu(), torch.full((5,), math.log(V)), atol=1e-5, rtol=0)
    # Huge logits stay finite.
    case = _lp_case(11, 48, 300, False, scale=3e3)
    ours = _lp_run(linear_logprobs, torch.float32, CUDA, *case, temperature=0.7)
    assert all(torch.isfinite(v).all() for v in ours.values())


# ---------------------------------------------------------------------------------------------- group_advantages


@pytest.mark.parametrize("agg", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize(("N", "R", "G"), [(21, 2, 7), (192, 2, 64), (4096, 3, 16)])
def test_group_advantages_compiled(agg, scale, N, R, G, assert_close_2x):
    g = torch.Generator().manual_seed(N)
    x = torch.rand(N, R, generator=g, dtype=torch.float64)
    x[:, -1] = (x[:, -1] > 0.5).double()
    x[1, 0], x[3] = float("nan"), float("nan")
    x[G: 2 * G] = 0.25  # one all-equal group: exact zeros
    adv, stats = group_advantages(x.float().to(CUDA), G, None, scale, agg)
    ref, ref_stats = group_advantages_ref(x.float(), G, None, scale, agg)
    plain, _ = group_advantages_ref(x.float(), G, None, scale, agg, dtype=torch.float32)
    assert adv.is_cuda
    assert_close_2x(adv.cpu(), ref, plain, atol=1e-5, name=f"{agg}/{scale}")
    if agg == "sum_then_normalize":  # normalize_then_sum re-centres on the batch afterwards
        assert not adv[G: 2 * G].any()
    for key, value in ref_stats.items():
        torch.testing.assert_close(getattr(stats, key).cpu().double(), value.double(), atol=1e-5, rtol=1e-5,
                                   equal_nan=True, msg=key)


# ---------------------------------------------------------------------------------------------- decode attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape",  # (B, G, H, Hkv, S, P, Ls, Dh)
    [(2, 3, 4, 2, 1, 37, 9, 16), (2, 4, 4, 1, 1, 17, 0, 16), (2, 2, 4, 2, 3, 11, 6, 16), (4, 8, 9, 3, 1, 300, 64, 64),
     (1, 5, 3, 1, 1, 40, 33, 24)],
    ids=["gqa", "suffix0", "s3", "smollm2-like", "dh24"],
)
def test_prefix_decode_attention_compiled(shape, dtype, assert_close_2x):
    b, g, h, hkv, s, p, ls, dh = shape
    gen = torch.Generator().manual_seed(sum(shape))
    n = b * g
    q = torch.randn(n, h, s, dh, generator=gen)
    pk, pv = torch.randn(b, hkv, p, dh, generator=gen), torch.randn(b, hkv, p, dh, generator=gen)
    cap = max(ls, 1)
    sk, sv = torch.randn(n, hkv, cap, dh, generator=gen), torch.randn(n, hkv, cap, dh, generator=gen)
    plens = torch.randint(1, p + 1, (b,), generator=gen)
    slens = torch.randint(max(s - 1, 0), ls + 1, (n,), generator=gen) if ls else torch.zeros(n, dtype=torch.long)
    args = [t.to(dtype) for t in (q, pk, pv)], [t.to(dtype) for t in (sk, sv)]
    (qd, pkd, pvd), (skd, svd) = args
    out, lse = prefix_decode_attention(*(t.to(CUDA) for t in (qd, pkd, pvd, plens, skd, svd, slens)), g,
                                       return_lse=True)
    ref, ref_lse = prefix_decode_attention_ref(qd, pkd, pvd, plens, skd, svd, slens, g, return_lse=True)
    plain, plain_lse = prefix_decode_attention_ref(qd, pkd, pvd, plens, skd, svd, slens, g, return_lse=True,
                                                   dtype=torch.float32 if dtype == torch.float32 else dtype)
    assert out.dtype == dtype and out.is_cuda
    assert_close_2x(out.cpu(), ref, plain, atol=ATOL[dtype], name="out")
    assert_close_2x(lse.cpu(), ref_lse, plain_lse, atol=ATOL[dtype], name="lse")


# ---------------------------------------------------------------------------------------------- model-level paths


def test_sampler_greedy_matches_hf_generate_on_cuda():
    from grpo_fast.sampler import SharedPrefixSampler
    from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm("qwen2").to(CUDA).eval()
    prompts = ["1+2=", "a", "(3*4)-5 = ?"]
    g, new = 3, 12
    out = SharedPrefixSampler(model, tok).generate(prompts, group_size=g, max_new_tokens=new, temperature=0)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    rows = [p for p in ids for _ in range(g)]
    x = torch.zeros(len(rows), width, dtype=torch.long)
    m = torch.zeros_like(x)
    for i, p in enumerate(rows):
        x[i, width - len(p):], m[i, width - len(p):] = torch.tensor(p), 1
    ref = model.generate(input_ids=x.to(CUDA), attention_mask=m.to(CUDA), do_sample=False, max_new_tokens=new,
                         pad_token_id=0, eos_token_id=None)[:, width:]
    assert torch.equal(out.completion_ids.cpu()[:, : ref.shape[1]], ref.cpu())


def test_shared_prefix_update_matches_padded_on_cuda():
    from grpo_fast.forward import completion_hidden_states
    from grpo_fast.shared_prefix import PolicyBatch, shared_prefix_hidden_states
    from grpo_fast.testing import tiny_causal_lm

    g = torch.Generator().manual_seed(0)
    G, L = 4, 9
    prompts = [torch.randint(3, 40, (n,), generator=g).tolist() for n in (5, 2, 11)]
    ids = torch.randint(3, 40, (len(prompts) * G, L), generator=g)
    lens = torch.randint(1, L + 1, (ids.shape[0],), generator=g)
    mask = (torch.arange(L)[None] < lens[:, None]).long()
    batch = PolicyBatch(prompts, ids.masked_fill(mask == 0, 0).to(CUDA), mask.to(CUDA), G)
    weights = torch.randn(*ids.shape, 64, generator=g).to(CUDA)

    def run(fn):
        model = tiny_causal_lm("llama", seed=1).to(CUDA)
        hidden = fn(model, batch, 0)
        (hidden * weights * batch.completion_mask[..., None]).sum().backward()
        return hidden * batch.completion_mask[..., None], {n: p.grad for n, p in model.named_parameters()}

    ours_h, ours_g = run(shared_prefix_hidden_states)
    ref_h, ref_g = run(completion_hidden_states)
    torch.testing.assert_close(ours_h, ref_h, atol=1e-4, rtol=1e-4)
    for name, grad in ref_g.items():
        if grad is not None:
            torch.testing.assert_close(ours_g[name], grad, atol=1e-4 * max(1.0, grad.abs().max().item()), rtol=1e-4,
                                       msg=name)
