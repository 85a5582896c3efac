"""GRPO policy loss (every TRL 1.16 loss type, token- and sequence-level importance sampling, k3 KL) in one Triton
pass per direction (the fused LM-head variant is ``linear_grpo_loss.py``).

One program per sequence row: sequence-level importance weights (GSPO) and VESPO's Gamma weight are row
reductions, done inside the kernel in a first loop over L. The forward writes per-row partial sums (loss
numerator, token count, metric sums); the loss-type normalizer is a tiny torch reduction over rows on the device
(no host sync), so it is differentiated by autograd and the backward kernel only needs d loss / d row sum.
Layout: kernels → launchers → autograd.Function → public functions → ``grpo_loss_ref``.
"""

from __future__ import annotations

import math

import torch

from ._backend import use_triton
from ._triton import HAS_TRITON, tl, triton
from .loss_options import IS_LEVELS, LOSS_TYPES, LossOptions, resolve_options

__all__ = ["IS_LEVELS", "LOSS_TYPES", "LossOptions", "grpo_loss", "grpo_loss_ref", "high_entropy_mask",
           "resolve_options"]
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_BWD_HP = ("eps_low", "eps_high", "delta", "beta", "tau_pos", "tau_neg")  # not VESPO's constants: φ is in stats
_LOSS_CODE = {"cispo": 1, "sapo": 2, "vespo": 3} | dict.fromkeys(_CLIPPED, 0)
EXP_GUARD = 20.0  # exponent arguments are clamped here (exp(20) ≈ 4.9e8): no overflow, and equal to TRL below it
_VESPO_LOG_MIN = math.log(1e-8)  # TRL's lower clamp of VESPO's sequence log-weight
# The same constants for the kernels: a @triton.jit function may only read globals that are tl.constexpr.
_K_EXP_GUARD = tl.constexpr(EXP_GUARD) if HAS_TRITON else EXP_GUARD
_K_VESPO_LOG_MIN = tl.constexpr(_VESPO_LOG_MIN) if HAS_TRITON else _VESPO_LOG_MIN
_N_STATS = 11
# Columns of the per-row stats buffer [N, 11] written by the forward kernel:
# 0 Σm · 1 Σm·kl (as in the loss: ×ratio when bias-corrected) · 2/3/4 low/high/region clip (token: Σm·flag;
# sequence: the row's flag) · 5 cispo clip · 6 Σm·entropy · 7 VESPO φ · 8 mean log-ratio μ (sequence level)
# · 9 Σm·entropy_mask · 10 Σm·kl (raw, for the sequence-level backward)



@triton.jit
def _policy_term(c, a, lp, phi, eps_low, eps_high, delta, tau_pos, tau_neg,
                 LOSS: tl.constexpr, HAS_DELTA: tl.constexpr):
    """Per-token policy loss P and dP/dc (through the ratio c) and dP/dlogp (direct, detached-weight types)."""
    if LOSS == 0:
        c1 = c
        g1f = 1.0
        if HAS_DELTA:
            c1 = tl.minimum(c, delta)
            g1f = (c <= delta).to(tl.float32)
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        c2 = tl.minimum(tl.maximum(c, lo), hi)
        g2f = (c >= lo).to(tl.float32) * (c <= hi).to(tl.float32)
        x1 = c1 * a
        x2 = c2 * a
        p = -tl.minimum(x1, x2)
        dmin = tl.where(x1 < x2, g1f, tl.where(x1 > x2, g2f, 0.5 * (g1f + g2f)))  # torch.minimum's tie rule
        dpdc = -a * dmin
        dpdl = dpdc * 0.0
    elif LOSS == 1:
        r = tl.minimum(c, eps_high)
        p = -r * a * lp
        dpdc = c * 0.0
        dpdl = -r * a
    elif LOSS == 2:
        tau = tl.where(a > 0, tau_pos, tau_neg)
        s = tl.sigmoid(tau * (c - 1.0))
        p = -s * 4.0 / tau * a
        dpdc = -a * 4.0 * s * (1.0 - s)
        dpdl = dpdc * 0.0
    else:
        p = -phi * a * lp
        dpdc = c * 0.0
        dpdl = -phi * a + c * 0.0
    return p, dpdc, dpdl


@triton.jit
def _grpo_loss_fwd_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, emask_ptr, ent_ptr, row_loss_ptr, stats_ptr,
    L,
    stride_lpn, stride_lpl, stride_oldn, stride_oldl, stride_refn, stride_refl, stride_adv,
    stride_mn, stride_ml, stride_emn, stride_eml, stride_en, stride_el, stride_stn,
    eps_low, eps_high, delta, beta, tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg,
    LOSS: tl.constexpr, SEQ: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_ENT: tl.constexpr, HAS_EMASK: tl.constexpr, BLOCK_L: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_L)
    a = tl.load(adv_ptr + row * stride_adv).to(tl.float32)

    # Pass 1 (sequence level or VESPO): the row's masked sum of log-ratios.
    mu = 0.0
    c_row = 1.0
    phi = 1.0
    if SEQ or LOSS == 3:
        acc_lr = tl.zeros([BLOCK_L], tl.float32)
        acc_lrc = tl.zeros([BLOCK_L], tl.float32)
        acc_m = tl.zeros([BLOCK_L], tl.float32)
        for start in range(0, L, BLOCK_L):
            idx = start + offs
            inb = idx < L
            m = tl.load(mask_ptr + row * stride_mn + idx * stride_ml, mask=inb, other=0).to(tl.float32)
            lr = tl.zeros([BLOCK_L], tl.float32)
            if HAS_OLD:
                lp = tl.load(logp_ptr + row * stride_lpn + idx * stride_lpl, mask=inb, other=0.0).to(tl.float32)
                old = tl.load(old_ptr + row * stride_oldn + idx * stride_oldl, mask=inb, other=0.0).to(tl.float32)
                lr = lp - old
            acc_lr += lr * m
            acc_lrc += tl.minimum(tl.maximum(lr, -_K_EXP_GUARD), _K_EXP_GUARD) * m
            acc_m += m
        cnt = tl.sum(acc_m, 0)
        mu = tl.sum(acc_lr, 0) / tl.maximum(cnt, 1.0)
        c_row = tl.exp(tl.minimum(tl.maximum(mu, -_K_EXP_GUARD), _K_EXP_GUARD))
        if LOSS == 3:
            lws = tl.minimum(tl.maximum(tl.sum(acc_lrc, 0), _K_VESPO_LOG_MIN), _K_EXP_GUARD)
            k = tl.where(a >= 0, k_pos, k_neg)
            lam = tl.maximum(tl.where(a >= 0, lam_pos, lam_neg), 1e-4)
            phi = tl.exp(lam + k * lws - lam * tl.exp(lws))
            phi = tl.where(phi == phi, phi, 0.0)

    # Pass 2: per-token loss and metric sums.
    acc_loss = tl.zeros([BLOCK_L], tl.float32)
    acc_m = tl.zeros([BLOCK_L], tl.float32)
    acc_kl = tl.zeros([BLOCK_L], tl.float32)
    acc_klraw = tl.zeros([BLOCK_L], tl.float32)
    acc_low = tl.zeros([BLOCK_L], tl.float32)
    acc_high = tl.zeros([BLOCK_L], tl.float32)
    acc_cispo = tl.zeros([BLOCK_L], tl.float32)
    acc_ent = tl.zeros([BLOCK_L], tl.float32)
    acc_em = tl.zeros([BLOCK_L], tl.float32)
    for start in range(0, L, BLOCK_L):
        idx = start + offs
        inb = idx < L
        m = tl.load(mask_ptr + row * stride_mn + idx * stride_ml, mask=inb, other=0).to(tl.float32)
        lp = tl.load(logp_ptr + row * stride_lpn + idx * stride_lpl, mask=inb, other=0.0).to(tl.float32)
        if SEQ:
            c = tl.zeros([BLOCK_L], tl.float32) + c_row
        else:
            lr = tl.zeros([BLOCK_L], tl.float32)
            if HAS_OLD:
                old = tl.load(old_ptr + row * stride_oldn + idx * stride_oldl, mask=inb, other=0.0).to(tl.float32)
                lr = lp - old
            c = tl.exp(tl.minimum(tl.maximum(lr, -_K_EXP_GUARD), _K_EXP_GUARD))
        p, dpdc, dpdl = _policy_term(c, a, lp, phi, eps_low, eps_high, delta, tau_pos, tau_neg, LOSS, HAS_DELTA)
        if HAS_EMASK:
            em = tl.load(emask_ptr + row * stride_emn + idx * stride_eml, mask=inb, other=0).to(tl.float32)
            p = p * em
            acc_em += m * em
        else:
            acc_em += m
        if HAS_KL:
            ref = tl.load(ref_ptr + row * stride_refn + idx * stride_refl, mask=inb, other=0.0).to(tl.float32)
            d = tl.minimum(ref - lp, _K_EXP_GUARD)
            kl = tl.exp(d) - d - 1.0
            acc_klraw += m * kl
            if BIAS_KL:
                kl = kl * c
            acc_kl += m * kl
            p = p + beta * kl
        acc_loss += m * p
        acc_m += m
        if LOSS == 0:
            c1 = c
            if HAS_DELTA:
                c1 = tl.minimum(c, delta)
            acc_low += m * (c1 < 1.0 - eps_low).to(tl.float32) * (a < 0).to(tl.float32)
            acc_high += m * (c1 > 1.0 + eps_high).to(tl.float32) * (a > 0).to(tl.float32)
        if LOSS == 1:
            acc_cispo += m * (c > eps_high).to(tl.float32) * (a > 0).to(tl.float32)
        if HAS_ENT:
            h = tl.load(ent_ptr + row * stride_en + idx * stride_el, mask=inb, other=0.0).to(tl.float32)
            acc_ent += m * h

    low = tl.sum(acc_low, 0)
    high = tl.sum(acc_high, 0)
    cispo = tl.sum(acc_cispo, 0)
    if SEQ:  # sequence level: the flags are one value per row (TRL's metrics average them over rows)
        c1r = c_row
        if HAS_DELTA:
            c1r = tl.minimum(c_row, delta)
        low = (c1r < 1.0 - eps_low).to(tl.float32) * (a < 0).to(tl.float32)
        high = (c1r > 1.0 + eps_high).to(tl.float32) * (a > 0).to(tl.float32)
        cispo = (c_row > eps_high).to(tl.float32) * (a > 0).to(tl.float32)
    region = low + high  # low and high clipping exclude each other (they need opposite signs of a)
    st = stats_ptr + row * stride_stn
    tl.store(row_loss_ptr + row, tl.sum(acc_loss, 0))
    tl.store(st + 0, tl.sum(acc_m, 0))
    tl.store(st + 1, tl.sum(acc_kl, 0))
    tl.store(st + 2, low)
    tl.store(st + 3, high)
    tl.store(st + 4, region)
    tl.store(st + 5, cispo)
    tl.store(st + 6, tl.sum(acc_ent, 0))
    tl.store(st + 7, phi)
    tl.store(st + 8, mu)
    tl.store(st + 9, tl.sum(acc_em, 0))
    tl.store(st + 10, tl.sum(acc_klraw, 0))


@triton.jit
def _grpo_loss_bwd_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, emask_ptr, grad_ptr, stats_ptr, dlogp_ptr,
    L,
    stride_lpn, stride_lpl, stride_oldn, stride_oldl, stride_refn, stride_refl, stride_adv,
    stride_mn, stride_ml, stride_emn, stride_eml, stride_g, stride_stn, stride_dn, stride_dl,
    eps_low, eps_high, delta, beta, tau_pos, tau_neg,
    LOSS: tl.constexpr, SEQ: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_EMASK: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """d row_loss / d logp, recomputed elementwise; sequence level adds the row term through the mean log-ratio."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_L)
    g = tl.load(grad_ptr + row * stride_g).to(tl.float32)
    a = tl.load(adv_ptr + row * stride_adv).to(tl.float32)
    st = stats_ptr + row * stride_stn
    phi = tl.load(st + 7)
    seq_coef = 0.0
    c_row = 1.0
    if SEQ:
        cnt = tl.load(st + 0)
        mu = tl.load(st + 8)
        c_row = tl.exp(tl.minimum(tl.maximum(mu, -_K_EXP_GUARD), _K_EXP_GUARD))
        gcl = (mu >= -_K_EXP_GUARD).to(tl.float32) * (mu <= _K_EXP_GUARD).to(tl.float32)
        _p_row, dpdc_row, _dl_row = _policy_term(c_row, a, 0.0, phi, eps_low, eps_high, delta, tau_pos, tau_neg,
                                                 LOSS, HAS_DELTA)
        r = dpdc_row * tl.load(st + 9)
        if HAS_KL:
            if BIAS_KL:
                r += beta * tl.load(st + 10)
        seq_coef = g * r * c_row * gcl / tl.maximum(cnt, 1.0)
    for start in range(0, L, BLOCK_L):
        idx = start + offs
        inb = idx < L
        m = tl.load(mask_ptr + row * stride_mn + idx * stride_ml, mask=inb, other=0).to(tl.float32)
        lp = tl.load(logp_ptr + row * stride_lpn + idx * stride_lpl, mask=inb, other=0.0).to(tl.float32)
        if SEQ:
            c = tl.zeros([BLOCK_L], tl.float32) + c_row
            gct = tl.zeros([BLOCK_L], tl.float32)
        else:
            lr = tl.zeros([BLOCK_L], tl.float32)
            if HAS_OLD:
                old = tl.load(old_ptr + row * stride_oldn + idx * stride_oldl, mask=inb, other=0.0).to(tl.float32)
                lr = lp - old
            c = tl.exp(tl.minimum(tl.maximum(lr, -_K_EXP_GUARD), _K_EXP_GUARD))
            gct = (lr >= -_K_EXP_GUARD).to(tl.float32) * (lr <= _K_EXP_GUARD).to(tl.float32)
        _, dpdc, dpdl = _policy_term(c, a, lp, phi, eps_low, eps_high, delta, tau_pos, tau_neg, LOSS, HAS_DELTA)
        dl = dpdl + dpdc * c * gct  # gct is 0 at sequence level: the ratio's path goes through seq_coef
        if HAS_EMASK:
            dl = dl * tl.load(emask_ptr + row * stride_emn + idx * stride_eml, mask=inb, other=0).to(tl.float32)
        if HAS_KL:
            ref = tl.load(ref_ptr + row * stride_refn + idx * stride_refl, mask=inb, other=0.0).to(tl.float32)
            d = ref - lp
            dc = tl.minimum(d, _K_EXP_GUARD)
            ed = tl.exp(dc)
            dkl = tl.where(d <= _K_EXP_GUARD, 1.0 - ed, 0.0)
            if BIAS_KL:
                dl += beta * (dkl * c + (ed - dc - 1.0) * c * gct)
            else:
                dl += beta * dkl
        grad = g * m * dl + seq_coef * m
        tl.store(dlogp_ptr + row * stride_dn + idx * stride_dl, grad.to(dlogp_ptr.dtype.element_ty), mask=inb)


def _block_l(L: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(L, 1)), 1024)
    return block, 4 if block <= 512 else 8


def _row_inputs(logp, old, ref, adv, mask, emask):
    """Pointers and strides shared by both kernels (absent optional inputs alias logp; constexpr flags skip them)."""
    old = old if old is not None else logp
    ref = ref if ref is not None else logp
    emask = emask.view(torch.uint8) if emask is not None and emask.dtype == torch.bool else emask
    emask = emask if emask is not None else logp
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    ptrs = [logp, old, ref, adv, mask, emask]
    strides = [*logp.stride(), *old.stride(), *ref.stride(), adv.stride(0), *mask.stride(), *emask.stride()]
    return ptrs, strides


def _grpo_loss_fwd(logp, old, ref, adv, mask, ent, emask, hp: dict, flags: dict):
    """Launch the forward kernel → (row_loss [N] fp32, stats [N, 11] fp32)."""
    N, L = logp.shape
    row_loss = torch.empty(N, dtype=torch.float32, device=logp.device)
    stats = torch.empty(N, _N_STATS, dtype=torch.float32, device=logp.device)
    ptrs, strides = _row_inputs(logp, old, ref, adv, mask, emask)
    ent_ = ent if ent is not None else logp
    block, warps = _block_l(L)
    _grpo_loss_fwd_kernel[(N,)](
        *ptrs, ent_, row_loss, stats, L, *strides, *ent_.stride(), stats.stride(0), **hp, **flags,
        HAS_OLD=old is not None, HAS_ENT=ent is not None, HAS_EMASK=emask is not None, BLOCK_L=block,
        num_warps=warps,
    )
    return row_loss, stats


def _grpo_loss_bwd(grad_row, logp, old, ref, adv, mask, emask, stats, hp: dict, flags: dict):
    """Launch the backward kernel → d logp [N, L] in logp's dtype. Half-precision gradients are written in fp32 and
    rounded by torch (the Triton interpreter's bf16 store truncates instead of rounding to nearest)."""
    N, L = logp.shape
    dlogp = torch.empty(N, L, dtype=torch.float32 if logp.element_size() < 4 else logp.dtype, device=logp.device)
    ptrs, strides = _row_inputs(logp, old, ref, adv, mask, emask)
    block, warps = _block_l(L)
    _grpo_loss_bwd_kernel[(N,)](
        *ptrs, grad_row, stats, dlogp, L, *strides, grad_row.stride(0), stats.stride(0), *dlogp.stride(),
        **{k: hp[k] for k in _BWD_HP}, **flags,
        HAS_OLD=old is not None, HAS_EMASK=emask is not None, BLOCK_L=block, num_warps=warps,
    )
    return dlogp.to(logp.dtype)


class _GRPOLossRows(torch.autograd.Function):
    """logp [N, L] → (row loss sums [N], per-row stats [N, 11]); only the row sums carry a gradient."""

    @staticmethod
    def forward(ctx, logp, old, ref, adv, mask, ent, emask, hp, flags):
        row_loss, stats = _grpo_loss_fwd(logp, old, ref, adv, mask, ent, emask, hp, flags)
        ctx.save_for_backward(logp, old, ref, adv, mask, emask, stats)
        ctx.hp, ctx.flags = hp, flags
        ctx.mark_non_differentiable(stats)
        return row_loss, stats

    @staticmethod
    def backward(ctx, grad_row, _grad_stats):
        logp, old, ref, adv, mask, emask, stats = ctx.saved_tensors
        dlogp = _grpo_loss_bwd(grad_row.contiguous(), logp, old, ref, adv, mask, emask, stats, ctx.hp, ctx.flags)
        return dlogp, None, None, None, None, None, None, None, None


def _normalize(row_loss, count, loss_type, n_rows, num_items_in_batch, max_completion_length, ga, spg, nproc):
    """TRL 1.16's per-loss-type aggregation of the masked per-token loss, from row sums [N] and row counts [N]."""
    if loss_type in ("grpo", "sapo"):
        return (row_loss / count.clamp(min=1.0)).mean() / ga
    if loss_type == "bnpo":
        return row_loss.sum() / count.sum().clamp(min=1.0) / ga
    if loss_type == "dr_grpo":
        return row_loss.sum() / (n_rows * max_completion_length) / ga
    if loss_type == "luspo":
        return row_loss.mean() / ga
    if num_items_in_batch is None:
        items = count.sum()
    elif isinstance(num_items_in_batch, torch.Tensor):
        items = num_items_in_batch.to(device=row_loss.device, dtype=row_loss.dtype)
    else:  # torch.full, not torch.tensor: a host → device copy would synchronize
        items = torch.full((), float(num_items_in_batch), dtype=row_loss.dtype, device=row_loss.device)
    return row_loss.sum() / (items.clamp(min=1.0) / nproc * ga / spg)


def _seq_minmax(per_row, count, level, reduce):
    """TRL's clip_ratio/low_min and high_max: min/max over rows of the per-row mean, rows without tokens skipped."""
    valid = count > 0 if level == "token" else torch.ones_like(count, dtype=torch.bool)
    vals = per_row / count.clamp(min=1.0) if level == "token" else per_row
    fill = float("inf") if reduce == "min" else float("-inf")
    out = torch.where(valid, vals, fill)
    out = out.amin() if reduce == "min" else out.amax()
    return torch.where(valid.any(), out, float("nan"))


def _metrics_from_stats(stats, loss_type, level, beta, has_ent) -> dict[str, torch.Tensor]:
    count = stats[:, 0]
    total = stats.sum(0)  # [11]
    tokens = total[0].clamp(min=1.0)
    n_rows = float(stats.shape[0])
    per = tokens if level == "token" else n_rows
    out = {}
    if beta != 0.0:
        out["kl"] = total[1] / tokens
    if has_ent:
        out["entropy"] = total[6] / tokens
    if loss_type in _CLIPPED:
        out["clip_ratio/low_mean"] = total[2] / per
        out["clip_ratio/high_mean"] = total[3] / per
        out["clip_ratio/region_mean"] = total[4] / per
        out["clip_ratio/low_min"] = _seq_minmax(stats[:, 2], count, level, "min")
        out["clip_ratio/high_max"] = _seq_minmax(stats[:, 3], count, level, "max")
    elif loss_type == "cispo":
        out["cispo_clip_ratio"] = total[5] / per
    elif loss_type == "vespo":
        out["vespo/phi_seq_mean"] = total[7] / n_rows
    return {k: v.detach() for k, v in out.items()}


def _validate(logp, old_logp, ref_logp, advantages, mask, entropy, entropy_mask, opts: LossOptions,
              batch: dict) -> None:
    def check_tensor(name, t, shape, floating=True):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if floating and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != logp.device:
            raise ValueError(f"{name} is on {t.device} but logp is on {logp.device}")

    if not isinstance(logp, torch.Tensor) or logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError("logp must be a floating-point tensor of shape [N, L]")
    N, L = logp.shape
    if N == 0 or L == 0:
        raise ValueError(f"logp must have N >= 1 rows and L >= 1 columns, got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None:
            check_tensor(name, t, (N, L))
    check_tensor("advantages", advantages, (N,))
    for name, t in (("mask", mask), ("entropy_mask", entropy_mask)):
        if t is None and name == "entropy_mask":
            continue
        check_tensor(name, t, (N, L), floating=False)
        if t.is_complex():
            raise ValueError(f"{name} must be bool, integer or floating-point (0/1), got dtype {t.dtype}")
    if opts.beta != 0.0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta != 0")
    for name in ("gradient_accumulation_steps", "steps_per_generation", "num_processes"):
        if batch[name] is not None and not (int(batch[name]) == batch[name] and batch[name] >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {batch[name]}")


def _kernel_args(o: LossOptions) -> tuple[dict, dict]:
    """The kernels' float hyperparameters (by parameter name) and constexpr flags."""
    hp = dict(eps_low=float(o.epsilon), eps_high=float(o.eps_high), delta=float(o.delta or 0.0), beta=float(o.beta),
              tau_pos=float(o.sapo_temperature_pos), tau_neg=float(o.sapo_temperature_neg),
              k_pos=float(o.vespo_k_pos), lam_pos=float(o.vespo_lambda_pos), k_neg=float(o.vespo_k_neg),
              lam_neg=float(o.vespo_lambda_neg))
    flags = dict(LOSS=_LOSS_CODE[o.loss_type], SEQ=o.importance_sampling_level == "sequence", HAS_KL=o.beta != 0.0,
                 BIAS_KL=bool(o.use_bias_correction_kl), HAS_DELTA=o.delta is not None and o.loss_type in _CLIPPED)
    return hp, flags


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    options: LossOptions | None = None,
    *,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
    num_processes: int = 1,
    **option_keywords,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO policy loss with TRL 1.16's ``_compute_loss`` semantics (train mode) → ``(loss, metrics)``.

    The options (loss type, ε, δ, β, ...) come from ``options`` (a ``LossOptions``), from keywords with the same
    names (``grpo_loss(..., loss_type="grpo", beta=0.04)``), or both (keywords override).

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask``, ``entropy``, ``entropy_mask`` are ``[N, L]``,
    ``advantages`` is ``[N]``. Only ``logp`` receives a gradient. ``old_logp=None`` is on-policy (TRL's
    ``logp.detach()``: ratio exactly 1, gradient of the ratio still flows).

    Math, with ``r = logp − old_logp``, A the row's advantage, m the mask:
      - importance weight ``c = exp(r)`` (token) or ``exp(Σ m·r / max(Σ m, 1))`` per row (sequence, GSPO);
      - clipped types (grpo, bnpo, dr_grpo, dapo, luspo): ``−min(min(c, δ)·A, clamp(c, 1−ε, 1+ε_high)·A)``;
        cispo: ``−sg(min(c, ε_high))·A·logp``; sapo: ``−σ(τ(c−1))·4/τ·A`` (τ by the sign of A);
        vespo: ``−sg(φ)·A·logp`` with ``φ = exp(λ + k·log w − λ·w)``, w the row's exp(Σ m·clamp(r, ±20));
      - the policy term is multiplied by ``entropy_mask`` (see ``high_entropy_mask``), then ``+ β·KL`` with the k3
        ``KL = exp(ref − logp) − (ref − logp) − 1``, times c when ``use_bias_correction_kl``;
      - with per-row sums ``S_i = Σ_t m·loss``: grpo/sapo ``mean_i(S_i / max(Σ m_i, 1)) / GA``; bnpo
        ``Σ S / max(Σ m, 1) / GA``; dr_grpo ``Σ S / (N·max_completion_length) / GA``; luspo ``mean_i S_i / GA``;
        dapo/cispo/vespo ``Σ S / (max(num_items_in_batch, 1) / num_processes · GA / steps_per_generation)``.

    ``num_items_in_batch`` is TRL's: the GLOBAL mask token count of the whole generation batch (all ranks, all
    ``steps_per_generation`` micro-batches); ``None`` means this call's own ``mask.sum()`` (then the dapo family
    is a token mean when GA = steps_per_generation). ``steps_per_generation=None`` means = GA.

    Overflow guard (where TRL would produce inf/NaN): the log importance weight is clamped to [−20, 20] before the
    exponential, and ``ref − logp`` to at most 20 inside the KL; the gradient is zero beyond a clamp. Equal to TRL
    whenever |log-ratio| ≤ 20. Fully masked rows or batches give a finite loss 0 and zero gradient.

    Metrics (detached, local to this call): ``kl`` (β ≠ 0), ``entropy`` (masked mean, when ``entropy`` is given),
    ``clip_ratio/{low,high,region}_mean`` and ``clip_ratio/low_min``, ``clip_ratio/high_max`` (clipped types),
    ``cispo_clip_ratio``, ``vespo/phi_seq_mean``. Means are over masked tokens at token level and over rows at
    sequence level (as TRL); low_min/high_max are NaN when no row has a token (as TRL's nanmin/nanmax); a
    cross-rank reduction is the trainer's job. fp64 input runs the PyTorch path.
    """
    opts = resolve_options(options, option_keywords)
    batch = dict(num_items_in_batch=num_items_in_batch, entropy=entropy, entropy_mask=entropy_mask,
                 gradient_accumulation_steps=gradient_accumulation_steps, steps_per_generation=steps_per_generation,
                 num_processes=num_processes)
    _validate(logp, old_logp, ref_logp, advantages, mask, entropy, entropy_mask, opts, batch)
    if not use_triton(logp) or logp.dtype == torch.float64:
        return grpo_loss_ref(logp, old_logp, ref_logp, advantages, mask, opts, **batch)
    spg = gradient_accumulation_steps if steps_per_generation is None else steps_per_generation
    hp, flags = _kernel_args(opts)
    ref = ref_logp.detach() if opts.beta != 0.0 else None
    old = old_logp.detach() if old_logp is not None else None
    ent = entropy.detach() if entropy is not None else None
    row_loss, stats = _GRPOLossRows.apply(logp, old, ref, advantages.detach(), mask, ent, entropy_mask, hp, flags)
    loss = _normalize(row_loss, stats[:, 0], opts.loss_type, logp.shape[0], num_items_in_batch,
                      opts.max_completion_length, gradient_accumulation_steps, spg, num_processes)
    return loss, _metrics_from_stats(stats, opts.loss_type, opts.importance_sampling_level, opts.beta,
                                     entropy is not None)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask`` for one process → bool ``[N, L]``: keep masked-in tokens whose entropy is
    ``>=`` the ``(1 − top_entropy_quantile)`` quantile (linear interpolation, as ``torch.quantile``) of the
    entropies under ``mask``. Computed on the device without a host sync (no boolean indexing) and without
    ``torch.quantile``'s 16M-element limit. No valid token → all False."""
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} must have the same shape")
    valid = mask.bool()
    flat = torch.where(valid, entropy.float(), float("inf")).flatten()
    srt = flat.sort().values
    n = valid.sum()
    q = torch.full((), 1.0 - top_entropy_quantile, dtype=torch.float32, device=entropy.device)
    rank = q * (n - 1).clamp(min=0).float()
    below = rank.long()
    above = rank.ceil().long()
    thr = torch.lerp(srt[below], srt[above], rank - below)
    return ((entropy * mask.float()) >= thr) & valid


def grpo_loss_ref(
    logp, old_logp, ref_logp, advantages, mask, options=None, *, num_items_in_batch=None, entropy=None,
    entropy_mask=None, gradient_accumulation_steps=1, steps_per_generation=None, num_processes=1, **option_keywords,
):
    """Plain PyTorch oracle of ``grpo_loss`` (same signature and semantics), written after TRL's ``_compute_loss``;
    also the CPU path (autograd gives the gradient). Computes in fp32, or fp64 when ``logp`` is fp64."""
    o = resolve_options(options, option_keywords, "grpo_loss_ref")
    batch = dict(gradient_accumulation_steps=gradient_accumulation_steps, steps_per_generation=steps_per_generation,
                 num_processes=num_processes)
    _validate(logp, old_logp, ref_logp, advantages, mask, entropy, entropy_mask, o, batch)
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    epsilon, eps_high, delta, beta = o.epsilon, o.eps_high, o.delta, o.beta
    loss_type, level = o.loss_type, o.importance_sampling_level
    spg = gradient_accumulation_steps if steps_per_generation is None else steps_per_generation
    lp = logp.to(dt)  # [N, L]
    old = lp.detach() if old_logp is None else old_logp.detach().to(dt)
    m = mask.to(dt)  # [N, L]
    a = advantages.detach().to(dt).unsqueeze(1)  # [N, 1]
    count = m.sum(-1)  # [N]

    log_ratio = lp - old
    if level == "token":
        log_w = log_ratio  # [N, L]
    else:
        log_w = ((log_ratio * m).sum(-1) / count.clamp(min=1.0)).unsqueeze(-1)  # [N, 1]
    coef_1 = torch.exp(log_w.clamp(-EXP_GUARD, EXP_GUARD))

    if beta != 0.0:
        d = (ref_logp.detach().to(dt) - lp).clamp(max=EXP_GUARD)
        per_token_kl = torch.exp(d) - d - 1
        if o.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1  # [N, L]

    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * a * lp
    elif loss_type in _CLIPPED:
        coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    elif loss_type == "sapo":
        tau = torch.where(a > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * a
    else:  # vespo: a detached Gamma weight of the row's summed (clamped) log-ratio
        with torch.no_grad():
            log_w_seq = (log_ratio.clamp(-EXP_GUARD, EXP_GUARD) * m).sum(-1, keepdim=True)  # [N, 1]
            log_w_seq = log_w_seq.clamp(_VESPO_LOG_MIN, EXP_GUARD)
            k = torch.where(a >= 0, o.vespo_k_pos, o.vespo_k_neg)
            lam = torch.where(a >= 0, o.vespo_lambda_pos, o.vespo_lambda_neg).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w_seq - lam * torch.exp(log_w_seq)).nan_to_num(0.0, 0.0, 0.0)  # [N, 1]
        per_token_loss = -phi * a * lp

    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask.to(dt)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    row_loss = (per_token_loss * m).sum(-1)  # [N]
    loss = _normalize(row_loss, count, loss_type, lp.shape[0], num_items_in_batch, o.max_completion_length,
                      gradient_accumulation_steps, spg, num_processes)

    with torch.no_grad():
        tokens = count.sum().clamp(min=1.0)

        seq = level == "sequence"  # then the ratio flags are one value per row: [N, 1]

        def masked_mean(x):  # TRL's global_masked_mean on one process
            return x.sum() / x.shape[0] if seq else (x * m).sum() / tokens

        def per_row(x):  # per-row masked sum (token) or the row's value (sequence), for low_min / high_max
            return x.squeeze(1) if seq else (x * m).sum(-1)

        metrics = {}
        if beta != 0.0:
            metrics["kl"] = (per_token_kl.expand_as(m) * m).sum() / tokens
        if entropy is not None:
            metrics["entropy"] = (entropy.to(dt) * m).sum() / tokens
        if loss_type in _CLIPPED:
            low = ((coef_1 < 1 - epsilon) & (a < 0)).to(dt)
            high = ((coef_1 > 1 + eps_high) & (a > 0)).to(dt)
            metrics["clip_ratio/low_mean"] = masked_mean(low)
            metrics["clip_ratio/high_mean"] = masked_mean(high)
            metrics["clip_ratio/region_mean"] = masked_mean(((low + high) > 0).to(dt))
            metrics["clip_ratio/low_min"] = _seq_minmax(per_row(low), count, level, "min")
            metrics["clip_ratio/high_max"] = _seq_minmax(per_row(high), count, level, "max")
        elif loss_type == "cispo":
            metrics["cispo_clip_ratio"] = masked_mean(((coef_1 > eps_high) & (a > 0)).to(dt))
        elif loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = phi.mean()
    return loss, metrics
