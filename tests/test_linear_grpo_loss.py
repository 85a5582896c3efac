"""linear_grpo_loss (linear_logprobs → grpo_loss) against an unfused fp64 reference (materialized logits →
grpo_loss_ref) over every loss type × IS level × β × on/off-policy, both backends, no [T, V] tensor, return_logp,
poison, half precision, validation, and the bound's power to catch injected bugs."""

from __future__ import annotations

import itertools

import pytest
import torch
from grpo_fast.kernels.grpo_loss import LOSS_TYPES, grpo_loss, grpo_loss_ref
from grpo_fast.kernels.linear_grpo_loss import linear_grpo_loss, linear_grpo_loss_ref
from grpo_fast.kernels.logprob import linear_logprobs
from torch.utils._python_dispatch import TorchDispatchMode

DEV = "cuda" if torch.cuda.is_available() else "cpu"
N, L, D, V = 4, 7, 48, 4231
CHUNK = 5  # does not divide T = 28


def _problem(seed=0, N=N, L=L):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N * L, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (N * L,), generator=g)
    lengths = torch.tensor([0, 1, L] + [4] * (N - 3))  # a row of length 0 and one of length 1
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    targets.view(N, L)[3, 5] = -100  # an ignored position (masked out too, as padding is)
    targets.view(N, L)[0, 2] = -100  # one inside a fully masked row
    # Old and ref log-probs near the current ones (computed once in fp64), so ratios straddle the clip range.
    logp = linear_logprobs(hidden.float(), weight.float(), targets, 0.7, bias.float()).double().view(N, L)
    old = logp + torch.randn(N, L, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(N, L, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    return hidden, weight, bias, targets, old, ref, adv, mask


def _run(fn, prob, dtype, dev="cpu", use_bias=True, on_policy=False, **kw):
    """forward + backward → (loss, d hidden, d weight, d bias or None, metrics, logp, entropy) on the CPU."""
    hidden, weight, bias, targets, old, ref, adv, mask = prob
    N, L = mask.shape
    h = hidden.to(dev, dtype).detach().requires_grad_()
    w = weight.to(dev, dtype).detach().requires_grad_()
    b = bias.to(dev, dtype).detach().requires_grad_() if use_bias else None
    loss, metrics, logp, ent = fn(h, w, targets.to(dev), None if on_policy else old.to(dev, dtype), ref.to(dev, dtype),
                                  adv.to(dev, dtype), mask.to(dev), completion_shape=(N, L), bias=b, return_logp=True,
                                  **kw)
    loss.backward()
    return (loss.detach().cpu(), h.grad.cpu(), w.grad.cpu(), None if b is None else b.grad.cpu(),
            {k: v.cpu() for k, v in metrics.items()}, logp.cpu(), ent.cpu())


def _check(ours, ref64, plain, numerics, prob, what=""):
    """The 2x bound on the loss, every gradient, logp, entropy and every metric. The loss is a normalized sum that
    may cancel: its floor scales with its condition Σ|∂loss/∂x|·|x| over hidden, weight and bias. The metrics are
    token means of functions of log-probs and entropies: their rounding acts on those magnitudes."""
    hidden, weight, bias = prob[:3]
    scale = numerics.condition_scale((ref64[1], hidden), (ref64[2], weight), (ref64[3], bias))
    for i, name in enumerate(("loss", "d hidden", "d weight", "d bias")):
        if ref64[i] is not None:
            numerics.check_2x(ours[i], ref64[i], plain[i], name=f"{what} {name}", scale=scale if i == 0 else None)
    numerics.check_2x(ours[5], ref64[5], plain[5], name=f"{what} logp", dtype=ours[1].dtype)
    numerics.check_2x(ours[6], ref64[6], plain[6], name=f"{what} entropy", dtype=ours[1].dtype)
    assert set(ours[4]) == set(ref64[4]) == set(plain[4])
    magnitude = max(ref64[5].abs().max().item(), ref64[6].abs().max().item())
    for k in ref64[4]:
        numerics.check_2x(ours[4][k], ref64[4][k], plain[4][k], name=f"{what} {k}", scale=magnitude,
                          dtype=ours[1].dtype)


CASES = list(itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [False, True]))


@pytest.mark.parametrize("loss_type,level,beta,on_policy", CASES,
                         ids=[f"{lt}-{lv}-b{b}-{'on' if o else 'off'}" for lt, lv, b, o in CASES])  # fmt: skip
def test_matches_unfused_fp64(loss_type, level, beta, on_policy, numerics):
    i = CASES.index((loss_type, level, beta, on_policy))
    prob = _problem(seed=i % 3)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, max_completion_length=9,
              temperature=(0.7, 1.3)[i % 2], epsilon_high=1.1 if loss_type == "cispo" else 0.28,
              num_items_in_batch=30 if i % 4 == 0 else None)
    use_bias = i % 3 != 1
    ref64 = _run(linear_grpo_loss_ref, prob, torch.float64, use_bias=use_bias, on_policy=on_policy, **kw)
    plain = _run(linear_grpo_loss_ref, prob, torch.float32, use_bias=use_bias, on_policy=on_policy, **kw)
    ours = _run(linear_grpo_loss, prob, torch.float32, DEV, use_bias=use_bias, on_policy=on_policy,
                chunk_size=CHUNK, **kw)
    _check(ours, ref64, plain, numerics, prob, f"{loss_type}/{level}")
    assert ours[4]["entropy"] > 0


class _CountGemms(TorchDispatchMode):
    """Counts matrix products (mm, addmm) and records the largest tensor any op produced."""

    def __init__(self):
        super().__init__()
        self.gemms, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_,
                                   torch.ops.aten.matmul):  # fmt: skip
            self.gemms += 1
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_no_full_logits_and_frozen_head(level, force_backend):
    """Forward and backward hold no [T, V] tensor; a frozen LM head skips its d_weight GEMMs."""
    force_backend("torch")
    N, L = 8, 16  # T = 128 > D: the [V, D] gradient is smaller than [T, V] / 2
    prob = _problem(N=N, L=L)
    with _CountGemms() as mode:
        _run(linear_grpo_loss, prob, torch.float32, beta=0.04, importance_sampling_level=level, chunk_size=19)
    assert mode.largest < N * L * V / 2, f"a tensor of {mode.largest} elements (≥ [T, V] / 2)"
    with _CountGemms() as frozen:
        hidden, weight, _, targets, old, ref, adv, mask = prob
        h = hidden.float().requires_grad_()
        loss, _ = linear_grpo_loss(h, weight.float(), targets, old.float(), ref.float(), adv.float(), mask,
                                   completion_shape=(N, L), chunk_size=19, importance_sampling_level=level)
        loss.backward()
    assert frozen.largest < N * L * V / 2 and frozen.gemms < mode.gemms, (frozen.gemms, mode.gemms)


@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.6])
def test_return_logp_and_entropy_mask(top_entropy_quantile, numerics):
    """return_logp's logp and entropy (checked in _check), and the entropy-masked variant's gradients."""
    prob = _problem(seed=4)
    hidden, weight, bias, targets, old, ref, adv, mask = prob
    _, _, logp, ent = linear_grpo_loss(hidden.float(), weight.float(), targets, old.float(), ref.float(), adv.float(),
                                       mask, completion_shape=(N, L), chunk_size=CHUNK, return_logp=True)
    assert logp.shape == ent.shape == (N, L) and not logp.requires_grad and not ent.requires_grad
    kw = dict(temperature=0.7, loss_type="grpo", beta=0.04, top_entropy_quantile=top_entropy_quantile)
    ref64 = _run(linear_grpo_loss_ref, prob, torch.float64, use_bias=False, **kw)
    plain = _run(linear_grpo_loss_ref, prob, torch.float32, use_bias=False, **kw)
    ours = _run(linear_grpo_loss, prob, torch.float32, DEV, use_bias=False, chunk_size=CHUNK, **kw)
    _check(ours, ref64, plain, numerics, prob, f"q={top_entropy_quantile}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_and_default_chunk(backend, force_backend, numerics):
    """linear_logprobs / grpo_loss on either backend, with linear_logprobs' default chunk."""
    prob = _problem(seed=5)
    force_backend(backend)
    for level in ("token", "sequence"):
        kw = dict(loss_type="dapo", importance_sampling_level=level, beta=0.04, temperature=1.3)
        ref64 = _run(linear_grpo_loss_ref, prob, torch.float64, **kw)
        plain = _run(linear_grpo_loss_ref, prob, torch.float32, **kw)
        ours = _run(linear_grpo_loss, prob, torch.float32, DEV, **kw)
        _check(ours, ref64, plain, numerics, prob, f"{backend}/{level}")


def test_softcap_passes_through():
    """softcap reaches the head: the op equals the chain linear_logprobs(softcap) → grpo_loss exactly, and differs
    from the uncapped loss (the cap's own numerics are tested in test_logprob.py)."""
    hidden, weight, bias, targets, old, ref, adv, mask = (t.float() if t.is_floating_point() else t for t in _problem())
    kw = dict(loss_type="grpo", beta=0.04)
    loss, _ = linear_grpo_loss(hidden, weight, targets, old, ref, adv, mask, completion_shape=mask.shape, bias=bias,
                               temperature=0.7, softcap=2.5, **kw)
    logp, ent = linear_logprobs(hidden, weight, targets, 0.7, bias, return_entropy=True, softcap=2.5)
    chained, _ = grpo_loss(logp.view(mask.shape), old, ref, adv, mask, entropy=ent.view(mask.shape), **kw)
    uncapped, _ = linear_grpo_loss(hidden, weight, targets, old, ref, adv, mask, completion_shape=mask.shape,
                                   bias=bias, temperature=0.7, **kw)
    assert torch.equal(loss, chained) and not torch.allclose(loss, uncapped)


def test_autocast_fp32_master_weights(numerics):
    """Under bf16 autocast with fp32 hidden and weights the op casts as nn.Linear does (it used to refuse the
    mixed dtypes): fp32 loss, fp32 gradients, within 2x of the unfused reference under the same autocast."""
    prob = _problem(seed=4)
    kw = dict(loss_type="dapo", beta=0.04, temperature=0.7, softcap=2.5)
    ref64 = _run(linear_grpo_loss_ref, prob, torch.float64, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _run(linear_grpo_loss_ref, prob, torch.float32, **kw)
        ours = _run(linear_grpo_loss, prob, torch.float32, **kw)
    assert ours[0].dtype == ours[1].dtype == ours[2].dtype == torch.float32
    hidden, weight, bias = prob[:3]
    scale = numerics.condition_scale((ref64[1], hidden), (ref64[2], weight), (ref64[3], bias))
    numerics.check_2x(ours[0], ref64[0], plain[0], name="loss", scale=scale, dtype=torch.bfloat16)
    for i, name in ((1, "d hidden"), (2, "d weight"), (3, "d bias")):
        numerics.check_2x(ours[i], ref64[i], plain[i], name=name, dtype=torch.bfloat16)


def test_poisoned_outputs(poison):
    prob = _problem(seed=6)
    out = _run(linear_grpo_loss, prob, torch.float32, beta=0.04, chunk_size=CHUNK)
    assert torch.isfinite(out[0]) and all(torch.isfinite(t).all() for t in out[1:4])
    assert all(torch.isfinite(v) for v in out[4].values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, numerics):
    prob = _problem(seed=7)
    kw = dict(loss_type="dapo", beta=0.04, temperature=0.7)
    ref64 = _run(linear_grpo_loss_ref, prob, torch.float64, **kw)
    plain = _run(linear_grpo_loss_ref, prob, dtype, **kw)
    ours = _run(linear_grpo_loss, prob, dtype, DEV, chunk_size=CHUNK, **kw)
    assert ours[1].dtype == ours[2].dtype == ours[3].dtype == dtype
    _check(ours, ref64, plain, numerics, prob, str(dtype))


def test_no_grad_and_repeated_backward():
    hidden, weight, _, targets, old, ref, adv, mask = _problem()
    args = (targets, old.float(), ref.float(), adv.float(), mask)
    with torch.no_grad():
        loss, _ = linear_grpo_loss(hidden.float(), weight.float(), *args, completion_shape=(N, L))
    assert not loss.requires_grad
    w = weight.float().requires_grad_()
    loss, _ = linear_grpo_loss(hidden.float(), w, *args, completion_shape=(N, L))
    loss.backward(retain_graph=True)
    once = w.grad.clone()
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * once)


def test_validation():
    hidden, weight, _, targets, old, ref, adv, mask = _problem()
    args = (hidden.float(), weight.float(), targets, old.float(), ref.float(), adv.float(), mask)
    with pytest.raises(ValueError, match="completion_shape"):
        linear_grpo_loss(*args, completion_shape=(N, L + 1))
    with pytest.raises(ValueError, match="computes entropy"):
        linear_grpo_loss(*args, completion_shape=(N, L), entropy=old.float())
    with pytest.raises(TypeError, match="unexpected keyword"):
        linear_grpo_loss(*args, completion_shape=(N, L), epsilonn=0.1)
    with pytest.raises(ValueError, match="advantages must have shape"):
        linear_grpo_loss(*args[:5], adv[:2].float(), mask, completion_shape=(N, L))
    with pytest.raises(ValueError, match="loss_type must be one of"):
        linear_grpo_loss(*args, completion_shape=(N, L), loss_type="ppo")


def test_bound_catches_injected_bugs(numerics):
    """The bound still bites: a missing 1/temperature, a normalizer off by one token and log-probs rounded to bf16
    each fail it, while the correct op passes on the same problem."""
    prob = _problem(seed=2)
    kw = dict(loss_type="dapo", beta=0.04, temperature=0.7, num_items_in_batch=30)
    ref64 = _run(linear_grpo_loss_ref, prob, torch.float64, **kw)
    plain = _run(linear_grpo_loss_ref, prob, torch.float32, **kw)
    _check(_run(linear_grpo_loss, prob, torch.float32, chunk_size=CHUNK, **kw), ref64, plain, numerics, prob)
    for bug in (dict(temperature=1.0), dict(num_items_in_batch=31)):
        ours = _run(linear_grpo_loss, prob, torch.float32, chunk_size=CHUNK, **(kw | bug))
        with pytest.raises(AssertionError):
            _check(ours, ref64, plain, numerics, prob, str(bug))
    hidden, weight, bias, targets, old, ref, adv, mask = (t.float() if t.is_floating_point() else t for t in prob)
    kw.pop("temperature")
    logp = linear_logprobs(hidden, weight, targets, 0.7, bias).view(N, L)
    loss_bf16, _ = grpo_loss_ref(logp.bfloat16().float(), old, ref, adv, mask, **kw)
    scale = numerics.condition_scale((ref64[1], prob[0]), (ref64[2], prob[1]), (ref64[3], prob[2]))
    with pytest.raises(AssertionError):
        numerics.check_2x(loss_bf16, ref64[0], plain[0], name="bf16 log-probs", scale=scale)
