"""Fused LM-head log-prob op: forward and every gradient against the fp64 reference, both backends."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_fast.kernels.logprob import linear_logprobs, linear_logprobs_ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(T, D, V, bias, ignore=(), seed=0, scale=1.0, noncontig=False):
    gen = torch.Generator().manual_seed(seed)
    if noncontig:  # [T, D] view with strides (2, 2T): a transposed, sliced buffer
        h = torch.randn(D, 2 * T, generator=gen, dtype=torch.float64).t()[::2]
    else:
        h = torch.randn(T, D, generator=gen, dtype=torch.float64)
    w = torch.randn(V, D, generator=gen, dtype=torch.float64) * (scale / math.sqrt(D))
    b = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, V, (T,), generator=gen)
    for i in ignore:
        t[i] = -100
    g_logp = torch.randn(T, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(T, generator=gen, dtype=torch.float64)
    return h, w, b, t, g_logp, g_ent


def _run(fn, dtype, h, w, b, t, g_logp, g_ent, grads="both", **kw):
    """Forward and backward in `dtype`; returns {name: tensor} for the outputs and every gradient."""
    hh = h.detach().to(dtype)
    if not h.is_contiguous():  # keep the caller's layout after the cast
        hh = torch.empty_strided(h.shape, h.stride(), dtype=dtype).copy_(h)
    hh.requires_grad_()
    ww = w.detach().to(dtype).requires_grad_()
    bb = b.detach().to(dtype).requires_grad_() if b is not None else None
    logp, ent = fn(hh, ww, t, bias=bb, return_entropy=True, **kw)
    loss = 0
    if grads in ("logp", "both"):
        loss = loss + (logp.double() * g_logp).sum()
    if grads in ("entropy", "both"):
        loss = loss + (ent.double() * g_ent).sum()
    loss.backward()
    out = {"logp": logp, "entropy": ent, "d_hidden": hh.grad, "d_weight": ww.grad}
    if bb is not None:
        out["d_bias"] = bb.grad
    return out


def _gemm_scales(h, w, b, t, g_logp, g_ent, grads="both", temperature=1.0, **_):
    """Each gradient is a K-term GEMM (or sum) over d_logits: its rounding acts on |d_logits| @ |operand|, not on
    the (cancelling) result, and grows like √K (Higham's probabilistic bound). Returns √K·max(|d_logits| @
    |operand|), from float64 d_logits."""
    z = ((h @ w.t() + (b if b is not None else 0)) / temperature).requires_grad_()  # [T, V]
    lp = torch.log_softmax(z, -1)
    valid = (t != -100).double()
    loss = 0
    if grads in ("logp", "both"):
        loss = loss + (lp.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * valid * g_logp).sum()
    if grads in ("entropy", "both"):
        loss = loss + (-(lp.exp() * lp).sum(-1) * valid * g_ent).sum()
    (dz,) = torch.autograd.grad(loss, z)
    dz = dz.abs() / temperature  # [T, V]
    T, V = dz.shape
    return {"d_hidden": (dz @ w.abs()).max().item() * V**0.5, "d_weight": (dz.t() @ h.abs()).max().item() * T**0.5,
            "d_bias": dz.sum(0).max().item() * T**0.5}


def _compare(check, dtype, case, grads="both", **kw):
    ref64 = _run(linear_logprobs_ref, torch.float64, *case, grads=grads, **kw)
    plain = _run(linear_logprobs_ref, dtype, *case, grads=grads, **kw)
    ours = _run(linear_logprobs, dtype, *case, grads=grads, **kw)
    scales = _gemm_scales(*case, grads=grads, **kw)
    for name in ref64:
        assert ours[name] is not None, f"{name} missing"
        assert ours[name].dtype == (torch.float32 if name in ("logp", "entropy") else dtype), name
        check(ours[name], ref64[name], plain[name], name=name, scale=scales.get(name), dtype=dtype)


@pytest.mark.parametrize("grads", ["logp", "entropy", "both"])
@pytest.mark.parametrize(("temperature", "bias"), [(0.7, True), (1.3, False)], ids=["T0.7-bias", "T1.3-nobias"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_torch_path_matches_fp64(dtype, temperature, bias, grads, assert_close_2x, poison, force_backend):
    """T=100 with chunk_size=7: row chunks and [Rb × Vc] backward tiles that divide neither T nor V=4231."""
    force_backend("torch")
    case = _inputs(100, 48, 4231, bias, ignore=(0, 13, 99))
    _compare(assert_close_2x, dtype, case, grads, temperature=temperature, chunk_size=7)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_single_token_and_noncontiguous(backend, assert_close_2x, poison, force_backend):
    force_backend(backend)
    _compare(assert_close_2x, torch.float32, _inputs(1, 48, 4231, True), temperature=0.7)
    case = _inputs(23, 48, 300, False, ignore=(5,), noncontig=True)
    assert not case[0].is_contiguous()
    _compare(assert_close_2x, torch.float32, case, temperature=1.3, chunk_size=4)


def test_real_vocab_torch(assert_close_2x, force_backend):
    force_backend("torch")
    _compare(assert_close_2x, torch.float32, _inputs(6, 32, 49152, True, ignore=(2,)), temperature=0.9)


@pytest.mark.triton
@pytest.mark.parametrize(
    ("dtype", "T", "V", "bias", "temperature", "grads"),
    [
        (torch.float32, 37, 4231, True, 0.7, "both"),
        (torch.float32, 19, 300, False, 1.3, "entropy"),
        (torch.float16, 37, 4231, True, 1.3, "logp"),
    ],
    ids=["fp32-V4231-bias-both", "fp32-V300-entropy", "fp16-V4231-bias-logp"],
)
def test_triton_interpreter_matches_fp64(dtype, T, V, bias, temperature, grads, assert_close_2x, poison, force_backend):
    force_backend("triton")
    case = _inputs(T, 48, V, bias, ignore=(0, T - 2))
    _compare(assert_close_2x, dtype, case, grads, temperature=temperature)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_all_ignored(backend, poison, force_backend):
    force_backend(backend)
    h, w, b, t, *_ = _inputs(9, 48, 300, True, ignore=range(9))
    h, w, b = (x.float().requires_grad_() for x in (h, w, b))
    logp, ent = linear_logprobs(h, w, t, bias=b, return_entropy=True)
    assert torch.equal(logp, torch.zeros(9)) and torch.equal(ent, torch.zeros(9))
    (logp.sum() + ent.sum()).backward()
    for g in (h.grad, w.grad, b.grad):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_no_tokens(backend, force_backend):
    force_backend(backend)
    h, w = torch.randn(0, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    logp, ent = linear_logprobs(h, w, torch.zeros(0, dtype=torch.int64), return_entropy=True)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_huge_logits_stay_finite(backend, assert_close_2x, force_backend):
    """Logits of order ±1e4: an unshifted exp would overflow; the entropy must not cancel to garbage."""
    force_backend(backend)
    case = _inputs(11, 48, 300, False, scale=3e3)
    _compare(assert_close_2x, torch.float32, case, temperature=0.7)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("V", [300, 4231])
def test_vocab_tail_is_masked(backend, V, poison, force_backend):
    """All-zero logits: logp = −log V. One padded tail column counted as exp(0) would shift it by ≥ log(1 + 1/V)
    (2.4e-4 at V = 4231); the tolerance is ~10 ulp (torch's vectorized log_softmax is not correctly rounded)."""
    force_backend(backend)
    h = torch.randn(5, 48)
    w = torch.zeros(V, 48)
    t = torch.tensor([0, 1, V - 1, V // 2, 7])
    logp, ent = linear_logprobs(h, w, t, temperature=1.3, return_entropy=True)
    torch.testing.assert_close(logp, torch.full((5,), -math.log(V)), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, torch.full((5,), math.log(V)), atol=1e-5, rtol=0)


def test_return_types_and_tied_embedding(force_backend):
    """Tied embeddings: the LM-head weight is the input embedding's Parameter; both gradients accumulate."""
    force_backend("torch")
    torch.manual_seed(0)
    emb = torch.nn.Embedding(257, 32)
    ids = torch.randint(0, 257, (2, 9))
    targets = ids[:, 1:].reshape(-1)

    def loss(fn):
        emb.zero_grad()
        h = torch.tanh(emb(ids[:, :-1])).reshape(-1, 32)  # [T, D]
        logp = fn(h, emb.weight, targets, temperature=0.8)
        assert isinstance(logp, torch.Tensor) and logp.shape == (16,) and logp.dtype == torch.float32
        logp.sum().backward()
        return emb.weight.grad.clone()

    torch.testing.assert_close(loss(linear_logprobs), loss(linear_logprobs_ref), atol=1e-5, rtol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns (forward and autograd backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("return_entropy", [False, True])
def test_torch_path_never_holds_T_by_V(return_entropy, force_backend):
    force_backend("torch")
    T, D, V, chunk = 512, 16, 1000, 8
    h = torch.randn(T, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    t = torch.randint(0, V, (T,))

    def largest(fn):
        with _LargestTensor() as mode:
            out = fn(h, w, t, return_entropy=return_entropy, chunk_size=chunk)
            (sum(out) if return_entropy else out).sum().backward()
        return mode.largest

    assert largest(linear_logprobs_ref) >= T * V  # the probe does see the naive path's logits, backward included
    assert largest(linear_logprobs) <= max(2 * chunk * V, V * D)  # tiles of ~chunk × V, and the [V, D] gradient


def test_validation_messages():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"targets must be int64 of shape \[T\] = \[4\], got .*\[3\]"):
        linear_logprobs(h, w, t[:3])
    with pytest.raises(ValueError, match=r"targets must be int64 of shape \[T\] = \[4\], got torch.int32"):
        linear_logprobs(h, w, t.int())
    with pytest.raises(ValueError, match=r"temperature must be a float > 0, got 0"):
        linear_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"weight must be a 2-D tensor \[V, D\] with D = 8, got \[10, 7\]"):
        linear_logprobs(h, w[:, :7], t)
    with pytest.raises(ValueError, match=r"weight must match hidden's dtype and device"):
        linear_logprobs(h, w.half(), t)
    with pytest.raises(ValueError, match=r"hidden dtype must be one of .*got torch.float64"):
        linear_logprobs(h.double(), w.double(), t)
    with pytest.raises(ValueError, match=r"hidden must be a 2-D tensor \[T, D\], got \[2, 2, 8\]"):
        linear_logprobs(h.view(2, 2, 8), w, t)
    with pytest.raises(ValueError, match=r"bias must be a \[V\] = \[10\] tensor"):
        linear_logprobs(h, w, t, bias=torch.zeros(9))
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        linear_logprobs(h, w, t, chunk_size=0)


def _run_autocast(fn, case, hidden_dtype, autocast, temperature=0.7):
    """Forward under CPU bf16 autocast (when ``autocast``) with fp32 master weights, backward outside it."""
    h, w, b, t, g_logp, g_ent = case
    param_dtype = torch.float32 if autocast else torch.float64
    hh = h.detach().to(hidden_dtype if autocast else torch.float64).requires_grad_()
    ww = w.detach().to(param_dtype).requires_grad_()
    bb = b.detach().to(param_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp, ent = fn(hh, ww, t, temperature=temperature, bias=bb, return_entropy=True)
    ((logp.double() * g_logp).sum() + (ent.double() * g_ent).sum()).backward()
    return {"logp": logp, "entropy": ent, "d_hidden": hh.grad, "d_weight": ww.grad, "d_bias": bb.grad}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("hidden_dtype", [torch.bfloat16, torch.float32], ids=["bf16-hidden", "fp32-hidden"])
def test_autocast_mixed_dtypes(backend, hidden_dtype, assert_close_2x, poison, force_backend):
    """What autocast hands the head: bf16 (or fp32) activations and fp32 master weights. The op casts them as
    nn.Linear does under autocast and accumulates in fp32; outputs are fp32 and each gradient has its leaf's dtype.
    The plain baseline is the reference under the same autocast (a bf16 [T, V] logits GEMM)."""
    force_backend(backend)
    T, V = (37, 4231) if backend == "torch" else (19, 300)
    case = _inputs(T, 48, V, True, ignore=(0, T - 2))
    ref64 = _run_autocast(linear_logprobs_ref, case, hidden_dtype, autocast=False)
    plain = _run_autocast(linear_logprobs_ref, case, hidden_dtype, autocast=True)
    ours = _run_autocast(linear_logprobs, case, hidden_dtype, autocast=True)
    expected = {"logp": torch.float32, "entropy": torch.float32, "d_hidden": hidden_dtype,
                "d_weight": torch.float32, "d_bias": torch.float32}
    scales = _gemm_scales(*case, temperature=0.7)
    for name, dtype in expected.items():
        assert ours[name].dtype == dtype, name
        assert_close_2x(ours[name], ref64[name], plain[name], name=name, scale=scales.get(name), dtype=torch.bfloat16)
    # fp32 inputs outside autocast stay fp32: autocast, not the op, decides the GEMM precision
    fp32 = _run(linear_logprobs, torch.float32, *case, temperature=0.7)
    assert (fp32["logp"] - ref64["logp"]).abs().max() < 1e-4 < (ours["logp"] - ref64["logp"]).abs().max()


SOFTCAP_CASES = [  # (backend, dtype, V, bias, temperature, grads); logits of order ±3 against a cap of 2: it bites
    ("torch", torch.float32, 4231, True, 0.7, "both"),
    ("torch", torch.bfloat16, 4231, False, 1.3, "logp"),
    ("torch", torch.float32, 300, False, 1.3, "entropy"),
    ("triton", torch.float32, 4231, True, 0.7, "both"),
    ("triton", torch.bfloat16, 300, True, 1.3, "logp"),
    ("triton", torch.float32, 300, False, 1.3, "entropy"),
]


@pytest.mark.parametrize(
    ("backend", "dtype", "V", "bias", "temperature", "grads"),
    [pytest.param(*c, marks=pytest.mark.triton) if c[0] == "triton" else c for c in SOFTCAP_CASES],
    ids=[f"{c[0]}-{str(c[1])[6:]}-V{c[2]}-{'bias' if c[3] else 'nobias'}-T{c[4]}-{c[5]}" for c in SOFTCAP_CASES],
)
def test_softcap_matches_fp64(backend, dtype, V, bias, temperature, grads, assert_close_2x, poison, force_backend):
    """Gemma-2's final-logit soft-cap c·tanh(y / c), then / temperature: forward and every gradient against fp64,
    masked targets included; the PyTorch path with row chunks and backward tiles that divide neither T nor V."""
    force_backend(backend)
    T = 37
    case = _inputs(T, 48, V, bias, ignore=(0, T - 2), scale=3.0)
    kw = {"chunk_size": 7} if backend == "torch" else {}
    _compare(assert_close_2x, dtype, case, grads, temperature=temperature, softcap=2.0, **kw)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_softcap_known_answers(backend, force_backend):
    """softcap=None is today's op bit for bit; a huge cap is the identity up to y³/(3c²); a cap that bites changes
    the result (so the tanh is not skipped); every logit near ±c·/T saturates toward a uniform top."""
    force_backend(backend)
    h, w, b, t, *_ = _inputs(19, 48, 300, True, ignore=(3,), scale=3.0)
    h, w, b = h.float(), w.float(), b.float()
    plain = linear_logprobs(h, w, t, temperature=0.7, bias=b, return_entropy=True)
    none = linear_logprobs(h, w, t, temperature=0.7, bias=b, return_entropy=True, softcap=None)
    huge = linear_logprobs(h, w, t, temperature=0.7, bias=b, return_entropy=True, softcap=1e6)
    capped = linear_logprobs(h, w, t, temperature=0.7, bias=b, return_entropy=True, softcap=2.0)
    for a, n, g, c in zip(plain, none, huge, capped):
        assert torch.equal(a, n)
        torch.testing.assert_close(g, a, atol=2e-5, rtol=0)
        assert (c - a).abs().max() > 0.1
    # a tiny cap squeezes every logit into [-c, c]: log-probs within 2c/T of uniform
    tiny = linear_logprobs(h, w, t, temperature=0.7, bias=b, softcap=1e-3)
    valid = t != -100
    assert ((tiny[valid] + math.log(300)).abs() <= 2e-3 / 0.7 + 1e-6).all()


def test_softcap_validation():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.int64)
    for bad in (0.0, -1.0, float("inf"), float("nan"), "30", True):
        with pytest.raises(ValueError, match=r"softcap must be None or a finite float > 0"):
            linear_logprobs(h, w, t, softcap=bad)
