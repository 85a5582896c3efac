"""grpo_loss: known answers (ratios e and 1/e), fp64 gradcheck of the reference, Triton (interpreter) and torch paths
against the fp64 reference over every loss type × IS level × β × δ, degenerate inputs, poison, validation."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from grpo_fast.kernels.grpo_loss import LOSS_TYPES, LossOptions, grpo_loss, grpo_loss_ref, high_entropy_mask

E = math.e
# grpo_loss runs on DEV: compiled kernels on a CUDA machine, the interpreter (TRITON_INTERPRET=1) on the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(t):
    return t.to(DEV) if isinstance(t, torch.Tensor) else t


def _run(backend, force_backend, logp, *args, **kw):
    """grpo_loss forward + backward on DEV → (loss, d logp, metrics) on the CPU."""
    force_backend(backend)
    x = _dev(logp.detach().clone()).requires_grad_()
    loss, metrics = grpo_loss(x, *map(_dev, args), **{k: _dev(v) for k, v in kw.items()})
    loss.backward()
    return loss.detach().cpu(), x.grad.cpu(), {k: v.cpu() for k, v in metrics.items()}


def _ratio_batch(dtype=torch.float32):
    """Two rows (A = +1, -1), tokens with log-ratio +1, -1 and a masked third token."""
    old = torch.full((2, 3), -2.0, dtype=dtype)
    logp = old + torch.tensor([[1.0, -1.0, 5.0], [1.0, -1.0, 5.0]], dtype=dtype)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([1.0, -1.0], dtype=dtype)
    return logp, old, adv, mask


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_known_answer_clipping(backend, force_backend):
    logp, old, adv, mask = _ratio_batch()
    # ε = 0.2: e is high-clipped for A > 0 (zero gradient), 1/e low-clipped for A < 0 (zero gradient).
    loss, grad, m = _run(backend, force_backend, logp, old, None, adv, mask, loss_type="dapo", epsilon=0.2)
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 1 / E + E + 0.8) / 4))
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1 / E, 0.0], [E, 0.0, 0.0]]) / 4)
    torch.testing.assert_close(m["clip_ratio/low_mean"], torch.tensor(0.25))
    torch.testing.assert_close(m["clip_ratio/high_mean"], torch.tensor(0.25))
    torch.testing.assert_close(m["clip_ratio/region_mean"], torch.tensor(0.5))
    # ε = 2: nothing clips; loss −A·r per token, gradient −A·r.
    loss, grad, m = _run(backend, force_backend, logp, old, None, adv, mask, loss_type="dapo", epsilon=2.0)
    torch.testing.assert_close(loss, torch.tensor(0.0))
    torch.testing.assert_close(grad, torch.tensor([[-E, -1 / E, 0.0], [E, 1 / E, 0.0]]) / 4)
    assert m["clip_ratio/region_mean"] == 0
    # δ = 2 < e caps the unclipped A < 0 branch: loss 2 instead of e, gradient 0.
    loss, grad, _ = _run(backend, force_backend, logp, old, None, adv, mask, loss_type="bnpo", delta=2.0)
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 1 / E + 2.0 + 0.8) / 4))
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1 / E, 0.0], [0.0, 0.0, 0.0]]) / 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_known_answer_other_policies(backend, force_backend):
    logp, old, adv, mask = _ratio_batch()
    # cispo, ε_high = 2: weight min(r, 2) detached; loss −w·A·logp, gradient −w·A.
    w = torch.tensor([[2.0, 1 / E, 0.0], [2.0, 1 / E, 0.0]])
    a = adv[:, None]
    loss, grad, m = _run(backend, force_backend, logp, old, None, adv, mask, loss_type="cispo", epsilon_high=2.0)
    torch.testing.assert_close(loss, (-w * a * logp).sum() / 4)
    torch.testing.assert_close(grad, -w * a / 4)
    torch.testing.assert_close(m["cispo_clip_ratio"], torch.tensor(0.25))
    # sapo on-policy: σ(0)·4/τ = 2/τ; gradient −A·4·σ(1−σ)·r = −A.
    loss, grad, _ = _run(backend, force_backend, logp, None, None, adv, mask, loss_type="sapo",
                         sapo_temperature_neg=2.0)
    torch.testing.assert_close(loss, torch.tensor((-2.0 + 1.0) / 2))  # row means −2 and +2/2, then batch mean
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]]) / 4)
    # vespo on-policy: φ = e^λ·1·e^−λ = 1, loss −A·logp.
    loss, grad, m = _run(backend, force_backend, logp, None, None, adv, mask, loss_type="vespo")
    torch.testing.assert_close(loss, (-a * logp * mask).sum() / 4)
    torch.testing.assert_close(grad, -a * mask / 4)
    torch.testing.assert_close(m["vespo/phi_seq_mean"], torch.tensor(1.0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_known_answer_sequence_level_and_kl(backend, force_backend):
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.5, 1.5, 9.0], [0.5, 1.5, 9.0]])  # masked mean log-ratio 1 → row ratio e
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss, grad, m = _run(backend, force_backend, logp, old, None, adv, mask, loss_type="grpo",
                         importance_sampling_level="sequence")
    torch.testing.assert_close(loss, torch.tensor((-1.2 + E) / 2))
    # Row 2: S = 2e, dS/dlogp_t = 2 · (−A·e) · 1/2 = e; GRPO divides by 2 tokens and 2 rows.
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0], [E / 4, E / 4, 0.0]]))
    assert m["clip_ratio/high_mean"] == 0.5 and m["clip_ratio/low_mean"] == 0  # one row of two
    # k3 KL with ref − logp = 1 on-policy: KL = e − 2; gradient 1 − e, or −(ref − logp)·r = −1 bias-corrected.
    ref = logp + 1.0
    zero = torch.zeros(2)
    for bias, g in ((False, 1 - E), (True, -1.0)):
        loss, grad, m = _run(backend, force_backend, logp, None, ref, zero, mask, loss_type="bnpo", beta=0.5,
                             use_bias_correction_kl=bias)
        torch.testing.assert_close(loss, torch.tensor(0.5 * (E - 2)))
        torch.testing.assert_close(grad, 0.5 * g * mask / 4.0)
        torch.testing.assert_close(m["kl"], torch.tensor(E - 2))


def test_known_answer_aggregation():
    """On-policy clipped loss is −A per token; rows of lengths 3, 1, 0 with A = 1, 2, 3 → S = (−3, −2, 0)."""
    logp = torch.randn(3, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    adv = torch.tensor([1.0, 2.0, 3.0])
    expected = {
        ("grpo", ()): -1.0, ("bnpo", ()): -5 / 4, ("dr_grpo", ()): -5 / 15, ("dapo", ()): -5 / 4, ("luspo", ()): -5 / 3,
        ("grpo", ("ga",)): -0.5, ("dapo", ("ga",)): -5 / (10 / 2 * 2 / 4),
    }
    for (loss_type, opts), want in expected.items():
        kw = dict(num_items_in_batch=10, num_processes=2, gradient_accumulation_steps=2, steps_per_generation=4)
        loss, _ = grpo_loss_ref(logp, None, None, adv, mask, loss_type=loss_type, max_completion_length=5,
                                **(kw if opts else {}))
        torch.testing.assert_close(loss, torch.tensor(want), msg=f"{loss_type} {opts}")


def test_gradcheck_reference():
    torch.manual_seed(0)
    N, L = 3, 4
    old = torch.randn(N, L, dtype=torch.float64) * 0.2 - 1
    ref = old + torch.randn(N, L, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.0, -0.5, 0.7], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    logp = (old + torch.randn(N, L, dtype=torch.float64) * 0.3).requires_grad_()
    # cispo and vespo multiply logp by a stop-gradient weight, so their gradient is by design not the derivative of
    # their value: they are checked against hand-computed gradients above and against TRL in test_trl_parity_loss.
    for loss_type, level in [("dapo", "token"), ("grpo", "sequence"), ("sapo", "token"), ("sapo", "sequence"),
                             ("luspo", "sequence"), ("dr_grpo", "token")]:
        def f(x):
            return grpo_loss_ref(x, old, ref, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                                 beta=0.04, max_completion_length=L)[0]
        assert torch.autograd.gradcheck(f, (logp,)), (loss_type, level)


def _inputs(N, L, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(N, L, generator=g, dtype=torch.float64) * 2
    old = lp + torch.randn(N, L, generator=g, dtype=torch.float64) * 0.3
    ref = lp + torch.randn(N, L, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, L + 1, (N,), generator=g)
    lengths[0], lengths[-1] = 0, min(1, L)  # a row of length 0 and one of length 1
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ent = torch.rand(N, L, generator=g, dtype=torch.float64) * 3
    return lp, old, ref, adv, mask, ent


CASES = list(itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [None, 1.5]))


@pytest.mark.parametrize("loss_type,level,beta,delta", CASES,
                         ids=[f"{lt}-{lv}-b{b}-d{d}" for lt, lv, b, d in CASES])
def test_paths_match_fp64_reference(loss_type, level, beta, delta, force_backend, numerics):
    N, L = 5, 7
    lp, old, ref, adv, mask, ent = _inputs(N, L, seed=len(loss_type) + 3 * (beta > 0))
    emask = high_entropy_mask(ent, mask, 0.5) if delta is None else None
    on_policy = beta > 0 and delta is None
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, delta=delta, max_completion_length=9,
              entropy=ent, entropy_mask=emask, epsilon_high=1.1 if loss_type == "cispo" else 0.28)

    def call(fn, dtype, dev="cpu"):
        x = lp.to(dev, dtype).detach().clone().requires_grad_()
        on_dev = dict(entropy=ent.to(dev, dtype), entropy_mask=None if emask is None else emask.to(dev))
        loss, metrics = fn(x, None if on_policy else old.to(dev, dtype), ref.to(dev, dtype), adv.to(dev, dtype),
                           mask.to(dev), **(kw | on_dev))
        loss.backward()
        return loss.detach().cpu(), x.grad.cpu(), {k: v.cpu() for k, v in metrics.items()}

    loss64, grad64, m64 = call(grpo_loss_ref, torch.float64)
    loss32, grad32, m32 = call(grpo_loss_ref, torch.float32)
    # The loss may cancel: its floor scales with Σ|∂loss/∂logp|·|logp|. The metrics are token means of functions
    # of logp, old, ref and entropy: their rounding acts on those magnitudes.
    scale = numerics.condition_scale((grad64, lp))
    magnitude = max(t.abs().max().item() for t in (lp, old, ref, ent))
    for backend in ("triton", "torch"):
        force_backend(backend)
        loss, grad, metrics = call(grpo_loss, torch.float32, DEV)
        numerics.check_2x(loss, loss64, loss32, name=f"{backend} loss", scale=scale)
        numerics.check_2x(grad, grad64, grad32, name=f"{backend} d logp")
        assert set(metrics) == set(m64) == set(m32)
        for k in m64:
            numerics.check_2x(metrics[k], m64[k], m32[k], name=f"{backend} {k}", scale=magnitude,
                              dtype=torch.float32)


@pytest.mark.parametrize("L", [1, 63, 1100])
def test_shapes_and_noncontiguous(L, force_backend, numerics):
    N = 3
    lp, old, ref, adv, mask, _ = _inputs(N, L, seed=L)
    for loss_type, level in (("dapo", "token"), ("grpo", "sequence"), ("vespo", "token")):
        kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04)
        x64 = lp.clone().requires_grad_()
        loss64, _ = grpo_loss_ref(x64, old, ref, adv, mask, **kw)
        loss64.backward()
        force_backend("triton")
        x = _dev(lp.float()).t().contiguous().t().requires_grad_()  # column-major: non-unit stride along L
        assert L == 1 or not x.is_contiguous()
        adv_strided = _dev(torch.stack([adv, adv], 1).float())[:, 0]
        loss, _ = grpo_loss(x, _dev(old.float()).t().contiguous().t(), _dev(ref.float()), adv_strided,
                            _dev(mask.bool()), **kw)
        loss.backward()
        x32 = lp.float().requires_grad_()
        loss32, _ = grpo_loss_ref(x32, old.float(), ref.float(), adv.float(), mask, **kw)
        loss32.backward()
        scale = numerics.condition_scale((x64.grad, lp))
        numerics.check_2x(loss, loss64, loss32, name=f"L={L} {loss_type} loss", scale=scale)
        numerics.check_2x(x.grad, x64.grad, x32.grad, name=f"L={L} {loss_type} grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_degenerate_inputs(backend, force_backend):
    N, L = 3, 5
    lp, old, ref, adv, mask, _ = _inputs(N, L, seed=7)
    for loss_type in LOSS_TYPES:
        for level in ("token", "sequence"):
            kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, max_completion_length=L)
            loss, grad, _ = _run(backend, force_backend, lp.float(), old.float(), ref.float(), adv.float(),
                                 torch.zeros(N, L, dtype=torch.bool), **kw)
            assert loss == 0 and torch.isfinite(loss), (loss_type, level)
            assert (grad == 0).all(), (loss_type, level)
            # log-ratios and ref − logp of ±100: finite loss and gradient (exponents clamped at 20); the row of
            # length 0 (row 0 of _inputs) gets no gradient.
            alternating = 100 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
            for shift in (alternating, torch.full((L,), 100.0), torch.full((L,), -100.0)):
                loss, grad, metrics = _run(backend, force_backend, lp.float() + shift, old.float(), ref.float(),
                                           adv.float(), mask, **kw)
                assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss_type, level, shift)
                assert (grad[0] == 0).all()
                assert all(torch.isfinite(v) for v in metrics.values())


def test_poisoned_outputs(force_backend, poison):
    lp, old, ref, adv, mask, ent = _inputs(4, 9, seed=3)
    for level in ("token", "sequence"):
        loss, grad, metrics = _run("triton", force_backend, lp.float(), old.float(), ref.float(), adv.float(), mask,
                                   beta=0.04, entropy=ent.float(), importance_sampling_level=level)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v) for v in metrics.values())


def test_high_entropy_mask_matches_quantile():
    ent = torch.rand(6, 11, dtype=torch.float64)
    mask = (torch.rand(6, 11) > 0.3).long()
    for rho in (0.0, 0.2, 0.5, 0.77, 1.0):
        thr = torch.quantile(ent[mask.bool()].float(), 1 - rho)
        want = (ent * mask.float() >= thr) & mask.bool()
        assert torch.equal(high_entropy_mask(ent, mask, rho), want), rho
    assert not high_entropy_mask(ent, torch.zeros_like(mask), 0.5).any()


def test_validation_messages():
    lp, old, ref, adv, mask, _ = _inputs(2, 3)
    cases = [
        (dict(loss_type="ppo"), "loss_type must be one of"),
        (dict(importance_sampling_level="batch"), "importance_sampling_level must be one of"),
        (dict(loss_type="dr_grpo"), "max_completion_length"),
        (dict(beta=0.1, ref=None), "ref_logp is required"),
        (dict(adv=adv[:1]), "advantages must have shape"),
        (dict(mask=mask[:, :2]), "mask must have shape"),
        (dict(mask=mask.to(torch.complex64)), "mask must be bool, integer or floating"),
        (dict(old=old.long()), "old_logp must be a floating-point"),
        (dict(delta=-1.0), "delta must be None or > 0"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be an integer >= 1"),
        (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg must be > 0"),
    ]
    for change, msg in cases:
        args = dict(old=old, ref=ref, adv=adv, mask=mask)
        kw = {k: v for k, v in change.items() if k not in args}
        args |= {k: v for k, v in change.items() if k in args}
        for fn in (grpo_loss, grpo_loss_ref):
            with pytest.raises(ValueError, match=msg):
                fn(lp, args["old"], args["ref"], args["adv"], args["mask"], **kw)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        high_entropy_mask(lp, mask, 1.5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_options_object_and_keywords(backend, force_backend):
    """A LossOptions, the same options as keywords, and an options object with keyword overrides give the same
    result; bad options name the field and the valid values."""
    lp, old, ref, adv, mask, _ = (t.float() if t.is_floating_point() else t for t in _inputs(4, 6, seed=5))
    opts = LossOptions(loss_type="grpo", epsilon=0.1, epsilon_high=0.3, beta=0.04, importance_sampling_level="sequence")
    batch = dict(num_items_in_batch=17, gradient_accumulation_steps=2)
    by_object = _run(backend, force_backend, lp, old, ref, adv, mask, **batch, options=opts)
    by_keywords = _run(backend, force_backend, lp, old, ref, adv, mask, **batch, loss_type="grpo", epsilon=0.1,
                       epsilon_high=0.3, beta=0.04, importance_sampling_level="sequence")
    overridden = _run(backend, force_backend, lp, old, ref, adv, mask, **batch,
                      options=LossOptions(loss_type="dapo", beta=0.5), loss_type="grpo", epsilon=0.1,
                      epsilon_high=0.3, beta=0.04, importance_sampling_level="sequence")
    for other in (by_keywords, overridden):
        assert torch.equal(other[0], by_object[0]) and torch.equal(other[1], by_object[1])
        assert other[2].keys() == by_object[2].keys()
    assert opts.eps_high == 0.3 and LossOptions(epsilon=0.1).eps_high == 0.1
    with pytest.raises(ValueError, match=r"loss_type must be one of \('grpo', 'bnpo'"):
        LossOptions(loss_type="ppo")
    with pytest.raises(ValueError, match="epsilon_high must be >= 0"):
        LossOptions(epsilon_high=-0.1)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['epsilonn'\]; loss options are"):
        grpo_loss(lp, old, ref, adv, mask, epsilonn=0.1)
    with pytest.raises(TypeError, match="options must be a LossOptions"):
        grpo_loss(lp, old, ref, adv, mask, {"loss_type": "grpo"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.beta = 0.0


def test_options_from_config():
    """grpo_fast's config and TRL's GRPOConfig carry the options under the same names."""
    from grpo_fast.config import GRPOConfig

    ours = GRPOConfig(loss_type="sapo", epsilon=0.1, beta=0.02, sapo_temperature_neg=2.0, max_completion_length=64)
    opts = LossOptions.from_config(ours)
    assert (opts.loss_type, opts.epsilon, opts.eps_high, opts.beta, opts.sapo_temperature_neg,
            opts.max_completion_length) == ("sapo", 0.1, 0.1, 0.02, 2.0, 64)
    trl = pytest.importorskip("trl")
    theirs = trl.GRPOConfig(output_dir="/tmp/unused", loss_type="cispo", epsilon_high=4.0, vespo_k_neg=1.5,
                            importance_sampling_level="sequence", use_cpu=True, report_to="none")
    opts = LossOptions.from_config(theirs)
    assert (opts.loss_type, opts.eps_high, opts.vespo_k_neg, opts.importance_sampling_level) == (
        "cispo", 4.0, 1.5, "sequence")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, force_backend, numerics):
    lp, old, ref, adv, mask, _ = _inputs(4, 33, seed=2)
    kw = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04)
    x64 = lp.clone().requires_grad_()
    loss64, _ = grpo_loss_ref(x64, old, ref, adv, mask, **kw)
    loss64.backward()
    results = {}
    for name, fn in (("plain", grpo_loss_ref), ("ours", grpo_loss)):
        force_backend("triton")
        dev = DEV if fn is grpo_loss else "cpu"
        x = lp.to(dev, dtype).requires_grad_()
        loss, _ = fn(x, old.to(dev, dtype), ref.to(dev, dtype), adv.to(dev, dtype), mask.to(dev), **kw)
        loss.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        results[name] = (loss.detach().cpu(), x.grad.cpu())
    scale = numerics.condition_scale((x64.grad, lp))
    numerics.check_2x(results["ours"][0], loss64, results["plain"][0], name="loss", scale=scale, dtype=dtype)
    numerics.check_2x(results["ours"][1], x64.grad, results["plain"][1], name="d logp")
