"""Fused LM head → per-token log-probability (and entropy), forward and backward, never holding [T, V] logits.

Two backends with one semantics (see ``linear_logprobs``): Triton kernels on CUDA (or on the CPU under
``TRITON_INTERPRET=1``), and a chunked PyTorch path on the CPU. Both save only per-row statistics in the forward
(log-sum-exp and entropy) and recompute logit tiles in the backward.
"""

from __future__ import annotations

import torch

from ._backend import use_triton
from ._triton import tl, triton

# Elements of one logit tile the PyTorch path holds at a time (fp32: 16 MiB; about 85 rows at V = 49152). Larger
# tiles mean fewer GEMM calls (faster on a busy CPU), but MKL's own buffers then grow far past the tile (measured at
# T = 4096, D = 576, V = 49152: 170-row tiles raise the forward's peak from 16 MiB to 159 MiB).
_TORCH_TILE_ELEMS = 4 * 1024 * 1024
# Elements of the d_logits chunk the Triton backward writes per vocabulary chunk.
_TRITON_TILE_ELEMS = 64 * 1024 * 1024
# Launch shapes on CUDA (module-level so benchmarks/tune_logprob.py can sweep them):
# fwd (BLOCK_T, BLOCK_V, BLOCK_D, SPLIT_V, num_warps, num_stages),
# bwd (BLOCK_T, BLOCK_V, BLOCK_D, num_warps, num_stages).
CUDA_BLOCKS = {"fwd": (64, 128, 64, 2048, 8, 3), "bwd": (64, 128, 64, 8, 3)}


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D,
    stride_ht, stride_hd, stride_wv, stride_wd, stride_b,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Raw logits h[rows] @ w[cols]ᵀ (+ bias) of one [BLOCK_T, BLOCK_V] tile in fp32, masked loads (0 outside)."""
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        d_ok = (d_start + offs_d) < D
        h = tl.load(
            h_ptr + rows[:, None] * stride_ht + (d_start + offs_d)[None, :] * stride_hd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_T, BLOCK_D]
        w = tl.load(
            w_ptr + cols[:, None] * stride_wv + (d_start + offs_d)[None, :] * stride_wd,
            mask=col_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_V, BLOCK_D]
        if UPCAST_DOT:  # exact: a product of two bf16 values fits in fp32's mantissa
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tanh_and_slope(x):
    """tanh(x) and 1 − tanh²(x) in fp32 without cancellation: with e = exp(−2|x|), tanh|x| = (1 − e)/(1 + e) and
    1 − tanh²x = 4e/(1 + e)²; below |x| = 0.1, where 1 − e loses digits, tanh|x| is its odd series to x⁷."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = x * x
    series = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
    t = tl.where(ax < 0.1, series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _linear_logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr,
    m_ptr, s_ptr, a_ptr, zt_ptr,
    T, V, D, inv_t, softcap, ignore_index,
    stride_ht, stride_hd, stride_wv, stride_wd, stride_b, stride_tgt, stride_pt,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SPLIT_V: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_T rows × one vocabulary split of SPLIT_V columns. Writes per-split partials
    m = max z, s = Σ exp(z - m), a = Σ exp(z - m)(z - m), zt = z[target] (0 when the target is elsewhere), where
    z = softcap·tanh(logits / softcap) / temperature (without the tanh when HAS_SOFTCAP is False)."""
    pid_t = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    row_ok = rows < T
    tgt = tl.load(tgt_ptr + rows * stride_tgt, mask=row_ok, other=ignore_index)
    m_run = tl.full([BLOCK_T], -1.0e30, dtype=tl.float32)
    s_run = tl.zeros([BLOCK_T], dtype=tl.float32)
    a_run = tl.zeros([BLOCK_T], dtype=tl.float32)
    zt_run = tl.zeros([BLOCK_T], dtype=tl.float32)
    for v_start in range(0, SPLIT_V, BLOCK_V):
        cols = pid_s * SPLIT_V + v_start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        acc = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D,
                           stride_ht, stride_hd, stride_wv, stride_wd, stride_b,
                           HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_T, BLOCK_V, BLOCK_D)  # fmt: skip
        if HAS_SOFTCAP:
            tanh, _ = _tanh_and_slope(acc / softcap)
            acc = softcap * tanh
        # Tail columns must not count: exp(0) of a padded column would inflate the partition function.
        z = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))  # [BLOCK_T, BLOCK_V]
        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        scale = tl.exp(m_run - m_new)
        zs = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(zs), 0.0)
        a_run = scale * (a_run + s_run * (m_run - m_new)) + tl.sum(e * zs, axis=1)
        s_run = scale * s_run + tl.sum(e, axis=1)
        m_run = m_new
        zt_run += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = rows * stride_pt + pid_s
    tl.store(m_ptr + out, m_run, mask=row_ok)
    tl.store(s_ptr + out, s_run, mask=row_ok)
    tl.store(a_ptr + out, a_run, mask=row_ok)
    tl.store(zt_ptr + out, zt_run, mask=row_ok)

@triton.jit
def _linear_logprobs_bwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, dz_ptr,
    T, V, D, v0, VC, inv_t, softcap,
    stride_ht, stride_hd, stride_wv, stride_wd, stride_b, stride_tgt, stride_dt, stride_dv,
    HAS_BIAS: tl.constexpr, HAS_GE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """d_logits for columns [v0, v0 + VC): gl·(onehot − p) − ge·p·(z − E_p z), in fp32, stored in the input
    dtype. gl and ge already carry 1/temperature and are zero on ignored rows. With a soft-cap, z is the capped
    logit and the result is multiplied by d capped / d logits = 1 − tanh²(logits / softcap)."""
    pid_t = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    row_ok = rows < T
    lcols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    cols = v0 + lcols
    col_ok = (lcols < VC) & (cols < V)
    acc = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D,
                       stride_ht, stride_hd, stride_wv, stride_wd, stride_b,
                       HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_T, BLOCK_V, BLOCK_D)  # fmt: skip
    if HAS_SOFTCAP:
        tanh, slope = _tanh_and_slope(acc / softcap)
        acc = softcap * tanh
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)
    logp = acc * inv_t - lse[:, None]  # [BLOCK_T, BLOCK_V]
    p = tl.exp(logp)
    tgt = tl.load(tgt_ptr + rows * stride_tgt, mask=row_ok, other=-1)
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    dz = gl[:, None] * (onehot - p)  # p_target − 1 is formed here, in fp32
    if HAS_GE:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
        dz -= ge[:, None] * p * (logp + ent[:, None])  # z − E_p z = log p + H
    if HAS_SOFTCAP:
        dz *= slope
    dz = tl.where(col_ok[None, :], dz, 0.0)
    tl.store(
        dz_ptr + rows[:, None] * stride_dt + lcols[None, :] * stride_dv,
        dz.to(dz_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (lcols < VC)[None, :],
    )


def _dot_precision(hidden: torch.Tensor) -> str:
    """fp32 inputs get TF32 dots only where PyTorch's own fp32 matmuls would use TF32 too."""
    if hidden.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast_dot(hidden: torch.Tensor) -> bool:
    """The interpreter (Triton on CPU tensors) multiplies the raw bit patterns of bf16 tl.dot operands (triton 3.9.0;
    triton-lang/triton#11584): there the tiles are upcast to fp32 first. Compiled kernels keep bf16 dots."""
    return hidden.dtype == torch.bfloat16 and not hidden.is_cuda


def _triton_forward(hidden, weight, bias, targets, inv_t, ignore_index, softcap=None):
    """Returns (logp, lse, entropy) in fp32, each [T]. Split-V partials merged here, without locks."""
    T, D = hidden.shape
    V = weight.shape[0]
    if hidden.is_cuda:
        block_t, block_v, block_d, split_v, warps, stages = CUDA_BLOCKS["fwd"]
    else:  # the interpreter: big blocks mean few (slow, Python-level) programs
        block_t, block_v, block_d, split_v, warps, stages = 32, 256, 32, 1024, 4, 1
    splits = triton.cdiv(V, split_v)
    part = torch.empty((4, T, splits), device=hidden.device, dtype=torch.float32)  # m, s, a, zt
    grid = (triton.cdiv(T, block_t), splits)
    b = bias if bias is not None else hidden  # never read when HAS_BIAS is False
    _linear_logprobs_fwd_kernel[grid](
        hidden, weight, b, targets, part[0], part[1], part[2], part[3],
        T, V, D, inv_t, softcap or 1.0, ignore_index,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0, targets.stride(0), part.stride(1),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, SPLIT_V=split_v,
        DOT_PRECISION=_dot_precision(hidden), UPCAST_DOT=_upcast_dot(hidden),
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    m, s, a, zt = part.unbind(0)  # [T, splits] each
    m_all = m.amax(dim=1, keepdim=True)  # [T, 1]
    w = torch.exp(m - m_all)
    s_all = (s * w).sum(1)  # [T]
    a_all = (w * (a + s * (m - m_all))).sum(1)  # [T]
    log_s = torch.log(s_all)
    lse = m_all.squeeze(1) + log_s
    entropy = log_s - a_all / s_all
    logp = zt.sum(1) - lse
    return logp, lse, entropy


def _triton_backward(hidden, weight, bias, targets, lse, entropy, gl, ge, inv_t, need, softcap=None):
    """Per vocabulary chunk: a kernel writes d_logits [T, Vc], then GEMMs give d_hidden and that chunk's d_weight."""
    T, D = hidden.shape
    V = weight.shape[0]
    if hidden.is_cuda:
        block_t, block_v, block_d, warps, stages = CUDA_BLOCKS["bwd"]
    else:
        block_t, block_v, block_d, warps, stages = 32, 256, 32, 4, 1
    vc = max(block_v, min(V, _TRITON_TILE_ELEMS // max(T, 1)) // block_v * block_v)
    d_hidden = torch.zeros((T, D), device=hidden.device, dtype=torch.float32) if need[0] else None
    d_weight = torch.empty_like(weight) if need[1] else None
    d_bias = torch.empty((V,), device=hidden.device, dtype=torch.float32) if need[2] else None
    dz = torch.empty((T, min(vc, V)), device=hidden.device, dtype=hidden.dtype)
    b = bias if bias is not None else hidden
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        d_chunk = dz[:, : v1 - v0]  # [T, Vc]
        grid = (triton.cdiv(T, block_t), triton.cdiv(v1 - v0, block_v))
        _linear_logprobs_bwd_kernel[grid](
            hidden, weight, b, targets, lse, entropy, gl, ge if ge is not None else gl, d_chunk,
            T, V, D, v0, v1 - v0, inv_t, softcap or 1.0,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0, targets.stride(0), d_chunk.stride(0), d_chunk.stride(1),
            HAS_BIAS=bias is not None, HAS_GE=ge is not None, HAS_SOFTCAP=softcap is not None,
            DOT_PRECISION=_dot_precision(hidden), UPCAST_DOT=_upcast_dot(hidden),
            BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        if d_hidden is not None:
            d_hidden += (d_chunk @ weight[v0:v1]).float()  # [T, D]
        if d_weight is not None:
            torch.mm(d_chunk.t(), hidden, out=d_weight[v0:v1])  # [Vc, D]
        if d_bias is not None:
            d_bias[v0:v1] = d_chunk.sum(0, dtype=torch.float32)
    return d_hidden, d_weight, d_bias


def _torch_logits(hidden, weight, bias, inv_t, softcap=None):
    """fp32 logit tile z = (h @ w.T + b) / temperature, the GEMM in the input dtype; with a soft-cap
    z = softcap·tanh((h @ w.T + b) / softcap) / temperature."""
    if softcap is not None:
        return _torch_logits(hidden, weight, bias, 1.0).div_(softcap).tanh_().mul_(softcap * inv_t)
    if hidden.dtype == torch.float32:
        if bias is not None:
            return torch.addmm(bias, hidden, weight.t(), beta=inv_t, alpha=inv_t)
        z = hidden @ weight.t()
    else:
        z = torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()
        z = z.float()
    return z.mul_(inv_t) if inv_t != 1.0 else z


def _torch_forward(hidden, weight, bias, targets, inv_t, want_entropy, chunk, softcap=None):
    """Row chunks of `chunk` rows: each [chunk, V] logit tile is reduced in place to per-row statistics."""
    T = hidden.shape[0]
    logp = torch.empty((T,), device=hidden.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if want_entropy else None
    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        z = _torch_logits(hidden[r0:r1], weight, bias, inv_t, softcap)  # [C, V]
        z_max, arg_max = z.max(dim=1, keepdim=True)  # [C, 1]
        # One fused, cache-friendly pass per row (several in-place passes over the tile are ~4x slower on CPU).
        torch.log_softmax(z, dim=1, out=z)  # z now holds log p
        logp[r0:r1] = z.gather(1, targets[r0:r1, None]).squeeze(1)
        # lse = max + log Σ exp(z − max), read at the arg-max column where log p = −log Σ exp(z − max) is exact
        # to its own ulp; lse = z_target − log p_target would lose ulp(z) whenever the target is unlikely.
        lse[r0:r1] = (z_max - z.gather(1, arg_max)).squeeze(1)
        if want_entropy:
            p = torch.exp(z)
            entropy[r0:r1] = p.mul_(z).sum(1).neg_()
            del p
        del z
    return logp, lse, entropy


def _torch_backward_logp_fp32(hidden, weight, bias, targets, lse, gl, inv_t, need, rb, vc):
    """fp32, gradient from logp only: d_logits = −gl·(p − onehot). The per-row factor −gl moves onto the [Rb, D]
    GEMM operands, the shift by −lse is folded into the recompute GEMM, so the passes over a tile are one exp and
    the one-hot update (p_target − 1, in fp32) of a single element per row."""
    T, D = hidden.shape
    V = weight.shape[0]
    alloc = torch.empty if T > 0 else torch.zeros  # the first row block writes every d_weight row
    d_hidden = torch.empty((T, D), device=hidden.device, dtype=torch.float32) if need[0] else None
    d_weight = alloc((V, D), device=hidden.device, dtype=torch.float32) if need[1] else None
    d_bias = alloc((V,), device=hidden.device, dtype=torch.float32) if need[2] else None
    for r0 in range(0, T, rb):
        r1 = min(T, r0 + rb)
        h, tgt_r = hidden[r0:r1], targets[r0:r1]  # [Rb, D], [Rb]
        neg_gl = -gl[r0:r1]  # [Rb]
        neg_lse = -lse[r0:r1, None]  # [Rb, 1]
        neg_gh = h * neg_gl[:, None]  # [Rb, D]
        qw = torch.zeros_like(neg_gh) if d_hidden is not None else None  # Σ_v (p − onehot)_v w_v
        for v0 in range(0, V, vc):
            v1 = min(V, v0 + vc)
            w = weight[v0:v1]  # [Vc, D]
            if bias is None:
                q = torch.addmm(neg_lse, h, w.t(), alpha=inv_t)  # [Rb, Vc] = z − lse
            else:
                q = torch.addmm(bias[v0:v1], h, w.t(), beta=inv_t, alpha=inv_t).add_(neg_lse)
            q.exp_()
            hit = ((tgt_r >= v0) & (tgt_r < v1)).nonzero().squeeze(1)
            if hit.numel():
                q[hit, tgt_r[hit] - v0] -= 1.0
            if qw is not None:
                qw.addmm_(q, w)
            if d_weight is not None:
                if r0 == 0:
                    torch.mm(q.t(), neg_gh, out=d_weight[v0:v1])
                else:
                    d_weight[v0:v1].addmm_(q.t(), neg_gh)
            if d_bias is not None:
                if r0 == 0:
                    torch.mv(q.t(), neg_gl, out=d_bias[v0:v1])
                else:
                    d_bias[v0:v1].addmv_(q.t(), neg_gl)
            del q
        if d_hidden is not None:
            torch.mul(qw, neg_gl[:, None], out=d_hidden[r0:r1])
    return d_hidden, d_weight, d_bias


def _torch_backward(hidden, weight, bias, targets, lse, entropy, gl, ge, inv_t, need, chunk, softcap=None):
    """Tiles of [Rb rows × Vc columns] (Rb·Vc ≈ chunk·V): every tile's d_logits goes straight into GEMMs, and a
    d_weight row block is written once per row block (usually once) rather than once per row chunk. A soft-cap
    multiplies each tile's d_logits by 1 − tanh²(logits / softcap) before the GEMMs."""
    T, D = hidden.shape
    V = weight.shape[0]
    budget = max(chunk * V, 1)
    rb = max(1, min(T, max(chunk, budget // min(V, 512))))
    vc = min(V, max(1, budget // rb))
    low = hidden.dtype != torch.float32
    if not low and ge is None and softcap is None:
        return _torch_backward_logp_fp32(hidden, weight, bias, targets, lse, gl, inv_t, need, rb, vc)
    n_row_blocks = -(-T // rb)
    d_hidden = torch.zeros((T, D), device=hidden.device, dtype=torch.float32) if need[0] else None
    d_weight = None
    if need[1]:
        acc_dtype = torch.float32 if (low and n_row_blocks > 1) else weight.dtype
        d_weight = torch.zeros((V, D), device=hidden.device, dtype=acc_dtype)
    d_bias = torch.zeros((V,), device=hidden.device, dtype=torch.float32) if need[2] else None
    for r0 in range(0, T, rb):
        r1 = min(T, r0 + rb)
        h = hidden[r0:r1]  # [Rb, D]
        lse_r, gl_r = lse[r0:r1, None], gl[r0:r1, None]
        tgt_r = targets[r0:r1]
        for v0 in range(0, V, vc):
            v1 = min(V, v0 + vc)
            w = weight[v0:v1]  # [Vc, D]
            b = bias[v0:v1] if bias is not None else None
            slope = None
            if softcap is None:
                y = _torch_logits(h, w, b, inv_t)  # [Rb, Vc]
            else:
                tanh = _torch_logits(h, w, b, 1.0).div_(softcap).tanh_()  # [Rb, Vc]
                y = tanh * (softcap * inv_t)
                slope = tanh.mul_(tanh).neg_().add_(1.0)  # d capped / d logits
            y.sub_(lse_r)  # log p
            if ge is None:
                d = y.exp_().mul_(-gl_r)
            else:
                p = torch.exp(y)
                d = y.add_(entropy[r0:r1, None]).mul_(-ge[r0:r1, None]).sub_(gl_r).mul_(p)  # −p(gl + ge(z − E z))
                del p
            hit = ((tgt_r >= v0) & (tgt_r < v1)).nonzero().squeeze(1)
            if hit.numel():  # the one-hot term, added in fp32 before any rounding (p_target − 1)
                d.index_put_((hit, tgt_r[hit] - v0), gl[r0:r1][hit], accumulate=True)
            if slope is not None:
                d.mul_(slope)
            if d_bias is not None:
                d_bias[v0:v1] += d.sum(0)
            if low:
                d = d.to(hidden.dtype)
            if d_hidden is not None:
                if low:
                    d_hidden[r0:r1] += d @ w
                else:
                    d_hidden[r0:r1].addmm_(d, w)
            if d_weight is not None:
                if d_weight.dtype == d.dtype and n_row_blocks == 1:
                    torch.mm(d.t(), h, out=d_weight[v0:v1])
                elif d_weight.dtype == d.dtype:
                    d_weight[v0:v1].addmm_(d.t(), h)
                else:
                    d_weight[v0:v1] += d.t() @ h
            del d, y, slope
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    return d_hidden, d_weight, d_bias


class _LinearLogprobs(torch.autograd.Function):
    # Both directions run with autocast off: the inputs already carry the dtype the op computes in (see
    # _autocast_inputs), and autocast would otherwise re-cast the fp32 statistics and refuse the out= ops.
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, want_entropy, chunk, triton_path,
                softcap):
        with torch.autocast(hidden.device.type, enabled=False):
            return _LinearLogprobs._forward(
                ctx, hidden, weight, bias, targets, temperature, ignore_index, want_entropy, chunk, triton_path, softcap
            )

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, want_entropy, chunk, triton_path,
                 softcap):
        inv_t = 1.0 / temperature
        valid = targets != ignore_index  # [T]
        targets = torch.where(valid, targets, 0)  # ignored rows read column 0; their results are zeroed below
        if triton_path:
            logp, lse, entropy = _triton_forward(hidden, weight, bias, targets, inv_t, ignore_index, softcap)
        else:
            logp, lse, entropy = _torch_forward(hidden, weight, bias, targets, inv_t, want_entropy, chunk, softcap)
        logp = logp.masked_fill_(~valid, 0.0)
        if want_entropy:
            entropy = entropy.masked_fill(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.cfg = (inv_t, valid, chunk, triton_path, softcap)
        ctx.set_materialize_grads(False)
        return logp, (entropy if want_entropy else None)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _LinearLogprobs._backward(ctx, g_logp, g_entropy)

    @staticmethod
    def _backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        inv_t, valid, chunk, triton_path, softcap = ctx.cfg
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if (g_logp is None and g_entropy is None) or not any(need):
            return (None,) * 10
        # [T] each, contiguous fp32: ignored rows give no gradient (even a NaN one); 1/temperature applied once.
        gl = torch.where(valid, g_logp.float() * inv_t, 0.0) if g_logp is not None else torch.zeros_like(lse)
        ge = torch.where(valid, g_entropy.float() * inv_t, 0.0) if g_entropy is not None else None
        if triton_path:
            ent = entropy if entropy is not None else lse
            d_h, d_w, d_b = _triton_backward(hidden, weight, bias, targets, lse, ent, gl, ge, inv_t, need, softcap)
        else:
            d_h, d_w, d_b = _torch_backward(hidden, weight, bias, targets, lse, entropy, gl, ge, inv_t, need, chunk,
                                            softcap)  # fmt: skip
        d_h = d_h.to(hidden.dtype) if d_h is not None else None
        d_b = d_b.to(bias.dtype) if d_b is not None else None
        return d_h, d_w, d_b, None, None, None, None, None, None, None


def _autocast_inputs(hidden, weight, bias):
    """Inside ``torch.autocast`` the head computes as ``nn.Linear`` would there: hidden, weight and bias cast to the
    autocast dtype (bf16 GEMMs, fp32 accumulation in the op). The casts are differentiable, so fp32 master weights
    receive fp32 gradients. fp64 tensors are left alone, as autocast leaves them."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)

    def cast(t):
        ok = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if ok else t

    return cast(hidden), cast(weight), cast(bias)


def _validate(hidden, weight, targets, temperature, bias, chunk_size, dtypes):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D tensor [T, D], got {_shape(hidden)}")
    T, D = hidden.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"weight must be a 2-D tensor [V, D] with D = {D}, got {_shape(weight)}")
    V = weight.shape[0]
    if hidden.dtype not in dtypes:
        raise ValueError(f"hidden dtype must be one of {[str(d) for d in dtypes]}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"weight must match hidden's dtype and device ({hidden.dtype}, {hidden.device}), "
            f"got ({weight.dtype}, {weight.device}); mixed dtypes are cast only under torch.autocast, as in nn.Linear"
        )
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or tuple(targets.shape) != (T,):
        got = f"{targets.dtype} {_shape(targets)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be int64 of shape [T] = [{T}], got {got}")
    if targets.device != hidden.device:
        raise ValueError(f"targets must be on hidden's device {hidden.device}, got {targets.device}")
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,) or bias.dtype != hidden.dtype
        or bias.device != hidden.device
    ):  # fmt: skip
        raise ValueError(f"bias must be a [V] = [{V}] tensor of dtype {hidden.dtype} on {hidden.device}, got "
                         f"{_shape(bias)}")  # fmt: skip
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _validate_softcap(softcap) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf"):
        raise ValueError(f"softcap must be None or a finite float > 0 (Gemma-2's final_logit_softcapping), "
                         f"got {softcap!r}")  # fmt: skip
    return float(softcap)


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token under the LM head, without materializing the [T, V] logits.

    With y = hidden @ weight.T + bias, soft-capped when ``softcap`` = c is set (Gemma-2/3, in transformers' order,
    then TRL's division by the temperature):
        z = y / temperature                           # [T, V] (never held whole)
        z = c·tanh(y / c) / temperature               # with softcap
        logp[t]    = z[t, targets[t]] - logsumexp_v z[t, v]
        entropy[t] = -Σ_v p[t, v] log p[t, v],  p = softmax(z[t])   (the same tempered distribution)
    Rows whose target equals ``ignore_index`` get logp = entropy = 0 and pass no gradient.
    Gradients flow to hidden, weight and bias from either output:
        d y = (g_logp·(onehot − p) − g_ent·p·(z − E_p z)) / temperature  · (1 − tanh²(y / c) with softcap)
    A tied embedding is the same Parameter and simply accumulates both gradients. Targets outside [0, V) other
    than ``ignore_index`` are not checked (that would cost a host sync on CUDA).

    Args:
        hidden: [T, D] float32 / bfloat16 / float16, any strides.
        weight: [V, D], same dtype and device as hidden. Under ``torch.autocast`` hidden, weight and bias are
            first cast to the autocast dtype, as ``nn.Linear`` does (so bf16 activations meet fp32 master weights).
        targets: [T] int64 token ids.
        temperature: > 0; logits are divided by it (as TRL does).
        bias: optional [V].
        return_entropy: also return the entropy [T].
        ignore_index: target value that marks a row to skip.
        chunk_size: rows of logits held at a time by the PyTorch path (the backward holds tiles of the same size);
            default keeps a tile at ~16 MiB of fp32.
        softcap: None, or c > 0: the final-logit soft-cap c·tanh(y / c) applied before the temperature.
    Returns:
        logp [T] float32, or (logp, entropy) both [T] float32.
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _validate(hidden, weight, targets, temperature, bias, chunk_size, (torch.float32, torch.bfloat16, torch.float16))
    softcap = _validate_softcap(softcap)
    V = weight.shape[0]
    chunk = chunk_size if chunk_size is not None else max(1, _TORCH_TILE_ELEMS // V)
    triton_path = use_triton(hidden) and hidden.shape[0] > 0
    logp, entropy = _LinearLogprobs.apply(
        hidden, weight, bias, targets, float(temperature), int(ignore_index), bool(return_entropy), chunk, triton_path,
        softcap,
    )
    return (logp, entropy) if return_entropy else logp


def linear_logprobs_ref(hidden, weight, targets, temperature=1.0, bias=None, return_entropy=False, ignore_index=-100,
                        chunk_size=None, softcap=None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``linear_logprobs``' arguments and returns, in plain PyTorch: materializes the [T, V] logits and computes in
    the inputs' dtype — pass float64 tensors for the oracle, or the kernel's own dtype for the plain baseline.
    Returns float64 for float64 inputs, else float32. Under ``torch.autocast`` the inputs are cast as in
    ``linear_logprobs``. ``chunk_size`` is accepted for signature parity and ignored."""
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _validate(hidden, weight, targets, temperature, bias, chunk_size,
              (torch.float32, torch.bfloat16, torch.float16, torch.float64))  # fmt: skip
    softcap = _validate_softcap(softcap)
    logits = hidden @ weight.t()  # [T, V]
    if bias is not None:
        logits = logits + bias
    if softcap is not None:  # transformers' Gemma2ForCausalLM order: divide, tanh, multiply
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)  # [T, V]
    valid = targets != ignore_index
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = logprobs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).masked_fill(~valid, 0.0)  # [T]
    if not return_entropy:
        return logp.to(out_dtype)
    entropy = -(logprobs.exp() * logprobs).sum(-1).masked_fill(~valid, 0.0)  # [T]
    return logp.to(out_dtype), entropy.to(out_dtype)
