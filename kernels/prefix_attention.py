"""Decode attention over a shared prompt prefix plus a per-sample suffix (cascade / Hydragen), merged by log-sum-exp.

The G completions of one prompt share its key/value cache. Instead of copying the prompt's K/V G times, the
queries of a whole group attend to the prefix as ONE matmul per (prompt, kv head) — ``[G·(H/Hkv)·S, Dh] × [Dh, P]``
— and each sample attends to its own suffix separately; the two partial softmaxes are merged exactly through
their log-sum-exps. On a GPU the Triton kernel also splits the prefix across programs (flash-decoding: B·Hkv
programs alone leave most SMs idle) and a second kernel merges the splits' partials by their log-sum-exps. Every
length is read from device memory, so a launch inside a captured CUDA graph stays valid as the suffix grows.
Layout: kernels → launchers → public function → ``prefix_decode_attention_ref``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from grpo_fast.kernels._backend import use_triton


@triton.jit
def _prefix_attention_fwd_kernel(
    q_ptr, pk_ptr, pv_ptr, sk_ptr, sv_ptr, plen_ptr, slen_ptr, cu_ptr, out_ptr, lse_ptr,
    stride_qn, stride_qh, stride_qs, stride_qd,
    stride_pkb, stride_pkh, stride_pkp, stride_pkd,
    stride_pvb, stride_pvh, stride_pvp, stride_pvd,
    stride_skn, stride_skh, stride_skl, stride_skd,
    stride_svn, stride_svh, stride_svl, stride_svd,
    stride_on, stride_oh, stride_os, stride_od,
    stride_ln, stride_lh, stride_ls,
    stride_sl, stride_split_o, stride_split_l,
    scale, HPK, S, DH, CHUNK,
    NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (prompt b, kv head, block of the group's query rows, prefix split). A query row m enumerates
    (sample g of the group, head within the kv group, query position s). Phase 1: the split's CHUNK prefix keys as
    tl.dot tiles shared by every row of the block (Hydragen: the group's queries are one matrix). Phase 2, in the
    last split only: each row's own suffix, one key at a time (decode suffixes are short). With NUM_SPLITS > 1
    (flash-decoding) out/lse are per-split partials that ``_prefix_attention_merge_kernel`` combines."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    mblk = tl.program_id(2).to(tl.int64) // NUM_SPLITS
    split = tl.program_id(2).to(tl.int64) % NUM_SPLITS
    row0 = tl.load(cu_ptr + b)
    count = tl.load(cu_ptr + b + 1) - row0
    plen = tl.load(plen_ptr + b)
    key_lo = split * CHUNK
    key_hi = tl.minimum(plen, key_lo + CHUNK)

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # [BLOCK_M]
    g = offs_m // (HPK * S)
    hh = (offs_m // S) % HPK
    s = offs_m % S
    valid_m = g < count
    n = row0 + g
    head = kvh * HPK + hh
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < DH

    q_ptrs = q_ptr + n[:, None] * stride_qn + head[:, None] * stride_qh + s[:, None] * stride_qs
    q = tl.load(q_ptrs + offs_d[None, :] * stride_qd, mask=valid_m[:, None] & mask_d[None, :], other=0.0)
    q = q.to(tl.float32)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    offs_n = tl.arange(0, BLOCK_N)
    for start in range(key_lo, key_hi, BLOCK_N):
        keys = start + offs_n
        mask_n = keys < key_hi
        kt = tl.load(pk_ptr + b * stride_pkb + kvh * stride_pkh + keys[None, :] * stride_pkp
                     + offs_d[:, None] * stride_pkd, mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        scores = tl.dot(q, kt.to(tl.float32), input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N]
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        v = tl.load(pv_ptr + b * stride_pvb + kvh * stride_pvh + keys[:, None] * stride_pvp
                    + offs_d[None, :] * stride_pvd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # Query s of row n sees suffix keys j <= slen[n] - S + s (its own key and the ones before it).
    slen = tl.load(slen_ptr + n * stride_sl, mask=valid_m, other=0)
    last = slen - S + s  # [BLOCK_M]
    n_keys = tl.max(tl.where(valid_m & (split == NUM_SPLITS - 1), last + 1, 0), 0)
    sk_row = sk_ptr + n * stride_skn + kvh * stride_skh
    sv_row = sv_ptr + n * stride_svn + kvh * stride_svh
    for j in range(0, n_keys):
        live = valid_m & (j <= last)
        k = tl.load(sk_row[:, None] + j * stride_skl + offs_d[None, :] * stride_skd,
                    mask=live[:, None] & mask_d[None, :], other=0.0)
        score = tl.sum(q * k.to(tl.float32), 1) * scale
        score = tl.where(live, score, float("-inf"))
        m_new = tl.maximum(m_i, score)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(score - m_safe)
        v = tl.load(sv_row[:, None] + j * stride_svl + offs_d[None, :] * stride_svd,
                    mask=live[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        l_i = l_i * alpha + p
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0.0, m_i + tl.log(l_safe), float("-inf"))
    o_ptrs = out_ptr + split * stride_split_o + n[:, None] * stride_on + head[:, None] * stride_oh
    tl.store(o_ptrs + s[:, None] * stride_os + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=valid_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + split * stride_split_l + n * stride_ln + head * stride_lh + s * stride_ls, lse, mask=valid_m)


@triton.jit
def _prefix_attention_merge_kernel(
    part_ptr, plse_ptr, out_ptr, lse_ptr, ROWS, DH,
    stride_split_o, stride_split_l, stride_or,
    NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (row n, head, query s), flattened: the NUM_SPLITS partial softmaxes merged exactly,
    out = Σ exp(lse_i − lse)·out_i with lse = log Σ exp(lse_i). Split 0 always holds keys (prompts are non-empty)."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < DH
    splits = tl.arange(0, NUM_SPLITS).to(tl.int64)
    lses = tl.load(plse_ptr + splits * stride_split_l + r)  # [NUM_SPLITS]
    m = tl.max(lses, 0)
    w = tl.where(lses == float("-inf"), 0.0, tl.exp(lses - m))
    parts = tl.load(part_ptr + splits[:, None] * stride_split_o + r * stride_or + offs_d[None, :],
                    mask=mask_d[None, :], other=0.0)  # [NUM_SPLITS, BLOCK_D]
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / total
    tl.store(out_ptr + r * stride_or + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(lse_ptr + r, m + tl.log(total))


def _num_splits(q, programs: int, p_max: int, block_n: int) -> int:
    """Prefix splits so that the grid covers the GPU about twice, each split at least 4 key tiles long; a function of
    shapes only, so a captured graph stays valid."""
    if not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(p_max, 4 * block_n), 16))


def _launch_triton(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, offsets, max_group, scale,
                   num_splits=None):
    n_rows, h, s, dh = q.shape
    b, hkv, p_max = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
    hpk = h // hkv
    lse = torch.empty((n_rows, h, s), device=q.device, dtype=torch.float32)  # [N, H, S]
    rows = max_group * hpk * s
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    block_n = 32
    block_d = max(16, triton.next_power_of_2(dh))
    m_blocks = triton.cdiv(rows, block_m)
    splits = num_splits or _num_splits(q, b * hkv * m_blocks, p_max, block_n)
    splits = triton.next_power_of_2(max(1, min(splits, triton.cdiv(p_max, block_n))))  # merge loads a power of 2
    chunk = triton.cdiv(triton.cdiv(p_max, splits), block_n) * block_n
    if splits == 1:
        out = torch.empty_like(q)  # [N, H, S, Dh], q's layout: the caller's transpose back is then free
        part, plse = out, lse
    else:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)  # contiguous: the merge writes rows of Dh
        part = torch.empty((splits, n_rows, h, s, dh), device=q.device, dtype=torch.float32)
        plse = torch.empty((splits, n_rows, h, s), device=q.device, dtype=torch.float32)
    sl_stride = 0 if suffix_lens.dim() == 0 else suffix_lens.stride(0)
    _prefix_attention_fwd_kernel[(b, hkv, m_blocks * splits)](
        q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens, offsets, part, plse,
        *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *suffix_k.stride(), *suffix_v.stride(),
        *part.stride()[-4:], *plse.stride()[-3:], sl_stride,
        part.stride(0) if splits > 1 else 0, plse.stride(0) if splits > 1 else 0,
        scale, hpk, s, dh, chunk,
        NUM_SPLITS=splits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    if splits > 1:
        _prefix_attention_merge_kernel[(n_rows * h * s,)](
            part, plse, out, lse, n_rows * h * s, dh, part.stride(0), plse.stride(0), dh,
            NUM_SPLITS=splits, BLOCK_D=block_d,
        )
    return out, lse


def _partial(q, k, v, valid, scale):
    """Softmax attention of q [X, Hkv, M, Dh] over k/v [X, Hkv, K, Dh] in fp32, keys limited by the boolean ``valid``
    (broadcastable to [X, Hkv, M, K], or None for all). Returns out [X, Hkv, M, Dh] fp32 and lse [X, Hkv, M] fp32,
    with out = 0 and lse = −inf for a row without any valid key."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)  # [X, Hkv, M, K]
    if valid is not None:
        scores.masked_fill_(~valid, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = scores.sub_(m).exp_()
    denom = p.sum(-1, keepdim=True)  # [X, Hkv, M, 1]
    out = torch.matmul(p, v.float()).div_(denom.clamp_min(1e-30))
    lse = (denom.log() + m).squeeze(-1)
    return out, lse


def _prefix_valid(prefix_lens, p_max):
    """bool [B, 1, 1, P]: the prefix keys inside each prompt (always built: testing whether any prompt is shorter
    would cost a host sync)."""
    return (torch.arange(p_max, device=prefix_lens.device) < prefix_lens[:, None])[:, None, None, :]


class DecodePlan:
    """What the CPU decode path (S = 1) derives from the lengths and groups alone — the prefix and suffix masks as
    additive biases, the ragged groups' slot map — computed by the first layer of a decode step and reused by the
    others: pass one new ``DecodePlan()`` to every layer's ``prefix_decode_attention`` call of a step (the lengths
    must not change in between). The Triton path ignores it."""

    __slots__ = ("parts",)

    def __init__(self):
        self.parts = None


def _decode_parts(prefix_lens, suffix_lens, offsets, n_rows, hkv, p_max, n_keys, max_group, device):
    """(prefix bias [B·Hkv, 1, P], suffix bias [1 or N·Hkv, 1, Ls] or None, slot [N] or None): 0 / −inf biases for
    the keys beyond each prefix / suffix length; slot b·Gmax + rank of row n of prompt b for ragged groups."""
    b = prefix_lens.shape[0]
    prefix_bias = torch.zeros((b, 1, p_max), device=device, dtype=torch.float32)
    prefix_bias.masked_fill_(~_prefix_valid(prefix_lens, p_max)[:, 0], float("-inf"))
    suffix_bias = None
    if not isinstance(suffix_lens, int):  # a tensor length masks the whole buffer
        valid = torch.arange(n_keys, device=device) < suffix_lens.reshape(-1, 1, 1)  # [N or 1, 1, Ls]
        suffix_bias = torch.zeros(valid.shape, device=device).masked_fill_(~valid, float("-inf"))
        if suffix_bias.shape[0] > 1:
            suffix_bias = suffix_bias.repeat_interleave(hkv, 0)
    slot = None
    if offsets is not None:
        grp = torch.repeat_interleave(torch.arange(b, device=device), offsets.diff(), output_size=n_rows)  # [N]
        slot = grp * max_group + torch.arange(n_rows, device=device) - offsets[grp]  # [N]
    return prefix_bias.repeat_interleave(hkv, 0), suffix_bias, slot


def _torch_decode(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, offsets, max_group, scale,
                  plan=None):
    """The decode step (S = 1) in few ops and without a host sync: prefix and suffix scores concatenated into one
    softmax instead of two partial softmaxes merged by their log-sum-exps. Ragged groups (``offsets``) place row n
    of prompt b at slot b·Gmax + rank, padding the (small) queries rather than the cache; a tensor ``suffix_lens``
    masks the whole preallocated suffix buffer instead of slicing it at a data-dependent length. The masks and
    slots come from ``plan`` when a previous layer of the step filled it."""
    n_rows, h, _, dh = q.shape
    b, hkv, p_max = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
    hpk, g = h // hkv, max_group
    n_keys = suffix_lens if isinstance(suffix_lens, int) else suffix_k.shape[2]
    parts = plan.parts if plan is not None else None
    if parts is None:
        parts = _decode_parts(prefix_lens, suffix_lens, offsets, n_rows, hkv, p_max, n_keys, g, q.device)
        if plan is not None:
            plan.parts = parts
    prefix_bias, suffix_bias, slot = parts
    q_slots = q if slot is None else q.new_zeros((b * g, h, 1, dh)).index_copy_(0, slot, q)
    qg = q_slots.reshape(b, g, hkv, hpk, dh).transpose(1, 2).reshape(b * hkv, g * hpk, dh).float()  # [B·Hkv, G·HPK, Dh]
    kp = prefix_k.reshape(b * hkv, p_max, dh).float().transpose(1, 2)
    scores_p = torch.baddbmm(prefix_bias, qg, kp, alpha=scale)  # [B·Hkv, G·HPK, P]
    sk, sv = suffix_k[:, :, :n_keys], suffix_v[:, :, :n_keys]
    qs = q.reshape(n_rows * hkv, hpk, dh).float()
    ks = sk.reshape(n_rows * hkv, n_keys, dh).float().transpose(1, 2)
    if suffix_bias is None:
        scores_s = torch.bmm(qs, ks).mul_(scale)
    else:
        scores_s = torch.baddbmm(suffix_bias, qs, ks, alpha=scale)
    scores_s = scores_s.view(n_rows, hkv, hpk, n_keys)  # [N, Hkv, HPK, Ls]
    if slot is not None:
        scores_s = scores_s.new_full((b * g, hkv, hpk, n_keys), float("-inf")).index_copy_(0, slot, scores_s)
    # One softmax over [prefix | suffix] in the prefix's (prompt, kv head) layout: only the short suffix part and
    # the outputs change layout, never the P-long prefix scores.
    scores_s = scores_s.reshape(b, g, hkv, hpk, n_keys).transpose(1, 2).reshape(b * hkv, g * hpk, n_keys)
    probs = torch.cat([scores_p, scores_s], -1).softmax(-1)  # [B·Hkv, G·HPK, P + Ls]
    out = torch.bmm(probs[..., :p_max], prefix_v.reshape(b * hkv, p_max, dh).float())  # [B·Hkv, G·HPK, Dh]
    out = out.reshape(b, hkv, g, hpk, dh).transpose(1, 2).reshape(b * g, h, 1, dh)
    probs_s = probs[..., p_max:].reshape(b, hkv, g, hpk, n_keys).transpose(1, 2).reshape(b * g, hkv, hpk, n_keys)
    if slot is not None:
        out, probs_s = out.index_select(0, slot), probs_s.index_select(0, slot)
    out_s = torch.bmm(probs_s.reshape(n_rows * hkv, hpk, n_keys),
                      sv.reshape(n_rows * hkv, n_keys, dh).float())  # [N·Hkv, HPK, Dh]
    return out.add_(out_s.reshape(n_rows, h, 1, dh)).to(q.dtype)


def _torch_path(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, offsets, max_group, scale, even):
    n_rows, h, s, dh = q.shape
    b, hkv, p_max = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
    hpk = h // hkv
    if even:
        q_pad = q
    else:
        # Rows of prompt b sit at slot b·Gmax + rank: pad the query (small) rather than the cache (large).
        grp = torch.repeat_interleave(torch.arange(b, device=q.device), offsets.diff(), output_size=n_rows)  # [N]
        slot = grp * max_group + torch.arange(n_rows, device=q.device) - offsets[grp]  # [N]
        q_pad = q.new_zeros((b * max_group, h, s, dh))
        q_pad[slot] = q
    qg = q_pad.reshape(b, max_group, hkv, hpk * s, dh).transpose(1, 2).reshape(b, hkv, max_group * hpk * s, dh)
    valid_p = _prefix_valid(prefix_lens, p_max)  # [B, 1, 1, P]
    out_p, lse_p = _partial(qg, prefix_k, prefix_v, valid_p, scale)  # [B, Hkv, Gmax·HPK·S, Dh]
    out_p = out_p.reshape(b, hkv, max_group, hpk * s, dh).transpose(1, 2).reshape(b * max_group, h, s, dh)
    lse_p = lse_p.reshape(b, hkv, max_group, hpk * s).transpose(1, 2).reshape(b * max_group, h, s)
    if not even:
        out_p, lse_p = out_p[slot], lse_p[slot]  # [N, H, S, Dh], [N, H, S]

    n_keys = suffix_lens if isinstance(suffix_lens, int) else suffix_k.shape[2]  # a tensor length masks all keys
    if n_keys == 0:
        return out_p.to(q.dtype), lse_p
    qs = q.reshape(n_rows, hkv, hpk * s, dh)
    sk, sv = suffix_k[:, :, :n_keys], suffix_v[:, :, :n_keys]
    valid_s = None
    if s > 1 or not isinstance(suffix_lens, int):
        lens = suffix_lens.reshape(-1) if not isinstance(suffix_lens, int) else torch.full((1,), suffix_lens,
                                                                                          device=q.device)
        last = lens[:, None] - s + torch.arange(s, device=q.device)  # [N, S]
        last = last[:, None, :].expand(-1, hpk, s).reshape(-1, 1, hpk * s, 1)  # [N or 1, 1, HPK·S, 1]
        valid_s = torch.arange(n_keys, device=q.device) <= last  # [N, 1, HPK·S, Ls]
    out_s, lse_s = _partial(qs, sk, sv, valid_s, scale)  # [N, Hkv, HPK·S, Dh]
    out_s, lse_s = out_s.reshape(n_rows, h, s, dh), lse_s.reshape(n_rows, h, s)

    lse = torch.logaddexp(lse_p, lse_s)  # [N, H, S]
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_p = (lse_p - lse_safe).exp_().unsqueeze(-1)
    w_s = (lse_s - lse_safe).exp_().unsqueeze(-1)
    out = out_p.mul_(w_p).add_(out_s.mul_(w_s))
    return out.to(q.dtype), lse


def prefix_decode_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_lens: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    suffix_lens: torch.Tensor | int,
    group_size: int | torch.Tensor,
    scale: float | None = None,
    max_group_size: int | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
    plan: DecodePlan | None = None,
):
    """Attention of N = B·G sampled sequences over their prompt's shared prefix cache plus their own suffix cache.

    Shapes: q ``[N, H, S, Dh]``; prefix_k/v ``[B, Hkv, P, Dh]`` with valid lengths ``prefix_lens [B]`` (each ≥ 1;
    keys at or beyond the length are ignored); suffix_k/v ``[N, Hkv, Ls, Dh]`` with valid lengths ``suffix_lens``
    (``[N]`` tensor, or one length for all rows: an int or a 0-dim device tensor — what a graph-captured decode step
    passes, so no Python int is baked in; 0 allowed; with a tensor length the CPU path masks the whole buffer, so
    entries past the length must be finite, e.g. zero-initialized). H must be a multiple of Hkv (GQA: head h reads
    kv head h // (H/Hkv)).

    ``group_size`` is either the int G (row n belongs to prompt n // G), or a long tensor of row offsets ``[B + 1]``
    (rows of prompt b are offsets[b]:offsets[b+1], empty groups allowed) — what a sampler that drops finished rows
    passes; then ``max_group_size`` (the largest group) may be given to avoid a host sync.

    Query s of row n (in prompt b) attends to prefix keys ``j < prefix_lens[b]`` and suffix keys
    ``j <= suffix_lens[n] - S + s`` (the S queries' own keys are the last S valid suffix entries: causal). With
    ``l_p``/``l_s`` the log-sum-exps and ``o_p``/``o_s`` the softmax outputs of the two parts,
    ``lse = logaddexp(l_p, l_s)`` and ``out = exp(l_p − lse)·o_p + exp(l_s − lse)·o_s`` — exactly softmax attention over
    the concatenated cache. Scores and accumulation are fp32; ``scale`` defaults to ``Dh ** -0.5``.

    Returns out ``[N, H, S, Dh]`` in q's dtype, and with ``return_lse`` also lse ``[N, H, S]`` fp32 (natural log).
    CUDA tensors run the Triton kernel; CPU tensors a PyTorch path with the same semantics. The kernel splits the
    prefix across ``num_splits`` programs per query block (flash-decoding; rounded to a power of 2; default: enough
    to cover the GPU twice) and merges the partial results by their log-sum-exps. No path reads a tensor value on
    the host when ``max_group_size`` is given. ``plan``: a ``DecodePlan`` shared by the layers of one decode step
    (CPU, S = 1), so its masks are built once per step instead of once per layer.
    """
    n_rows, h, s, dh = q.shape
    b, hkv = prefix_k.shape[0], prefix_k.shape[1]
    if h % hkv != 0:
        raise ValueError(f"number of query heads H={h} must be a multiple of the kv heads Hkv={hkv}")
    if prefix_k.shape[-1] != dh or suffix_k.shape[-1] != dh:
        raise ValueError(f"head dim mismatch: q {dh}, prefix {prefix_k.shape[-1]}, suffix {suffix_k.shape[-1]}")
    if suffix_k.shape[0] != n_rows or suffix_k.shape[1] != hkv:
        raise ValueError(f"suffix_k must be [N={n_rows}, Hkv={hkv}, Ls, Dh], got {tuple(suffix_k.shape)}")
    scale = dh**-0.5 if scale is None else float(scale)
    if isinstance(group_size, int):
        if group_size < 1 or b * group_size != n_rows:
            raise ValueError(f"group_size={group_size} must be >= 1 with N = B·G (N={n_rows}, B={b})")
        even, max_group = True, group_size
        offsets = None
    else:
        offsets = group_size.to(device=q.device, dtype=torch.long)
        if offsets.shape != (b + 1,):
            raise ValueError(f"group offsets must have shape [B + 1] = [{b + 1}], got {tuple(offsets.shape)}")
        max_group = int(offsets.diff().max()) if max_group_size is None else int(max_group_size)
        even = False

    if not isinstance(suffix_lens, int) and suffix_lens.shape not in ((), (n_rows,)):
        raise ValueError(f"suffix_lens must be an int, a 0-dim tensor or [N={n_rows}], got {tuple(suffix_lens.shape)}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")

    if use_triton(q):
        if offsets is None:
            offsets = torch.arange(0, n_rows + 1, group_size, device=q.device, dtype=torch.long)
        if isinstance(suffix_lens, int):
            suffix_lens = torch.full((), suffix_lens, device=q.device, dtype=torch.long)
        out, lse = _launch_triton(q, prefix_k, prefix_v, prefix_lens.to(torch.long), suffix_k, suffix_v,
                                  suffix_lens.to(torch.long), offsets, max(max_group, 1), scale, num_splits)
    elif s == 1 and not return_lse:
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores as promised, not autocast's bf16 bmm
            return _torch_decode(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, offsets,
                                 max(max_group, 1), scale, plan)
    else:
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _torch_path(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, offsets,
                                   max(max_group, 1), scale, even)
    return (out, lse) if return_lse else out


def prefix_decode_attention_ref(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, group_size,
                                scale=None, return_lse=False, dtype=torch.float64):
    """fp64 oracle: for each row, plain masked softmax attention over ``cat(prefix[:plen], suffix[:slen])``
    (``dtype`` lets tests evaluate the same plain math in the kernel's dtype)."""
    n_rows, h, s, dh = q.shape
    hkv = prefix_k.shape[1]
    scale = dh**-0.5 if scale is None else scale
    if isinstance(group_size, int):
        group_of = [n // group_size for n in range(n_rows)]
    else:
        group_of = torch.repeat_interleave(torch.arange(len(group_size) - 1), group_size.diff().cpu()).tolist()
    out = torch.zeros(q.shape, dtype=dtype)
    lse = torch.zeros((n_rows, h, s), dtype=dtype)
    for n in range(n_rows):
        bi = group_of[n]
        plen = int(prefix_lens[bi])
        slen = suffix_lens if isinstance(suffix_lens, int) else int(suffix_lens[n])
        k = torch.cat([prefix_k[bi, :, :plen], suffix_k[n, :, :slen]], 1).cpu().to(dtype).repeat_interleave(h // hkv, 0)
        v = torch.cat([prefix_v[bi, :, :plen], suffix_v[n, :, :slen]], 1).cpu().to(dtype).repeat_interleave(h // hkv, 0)
        scores = q[n].cpu().to(dtype) @ k.transpose(-1, -2) * scale  # [H, S, plen + slen]
        key_pos = torch.arange(plen + slen) - plen
        allowed = key_pos[None, :] <= (slen - s + torch.arange(s))[:, None]  # [S, plen + slen]
        scores = scores.masked_fill(~allowed, -math.inf)
        lse[n] = torch.logsumexp(scores, -1)
        out[n] = torch.softmax(scores, -1) @ v
    return (out, lse) if return_lse else out
