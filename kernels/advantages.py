"""Group-relative advantages: rewards [N, R] of B groups of G completions → advantages [N] plus logging stats.

One Triton program per group reduces the weighted rewards of its G completions in registers (two-pass mean and
variance, shifted so that equal rewards give an exactly zero advantage) and writes per-group partial statistics;
batch-wide quantities (the batch std of ``scale="batch"``, ``normalize_then_sum``'s batch baseline, the logged
means) are merged from those partials with a few tiny torch ops on the device: no host synchronization anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._backend import use_triton
from ._triton import tl, triton

EPS = 1e-4  # TRL's constant in (r - mean) / (std + 1e-4)
_SCALES = ("group", "batch", "none")
_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
_ESTIMATORS = ("grpo", "rloo")
# Columns of the per-group statistics buffer [B, 7].
_RAW_N, _RAW_MEAN, _RAW_M2, _SRC_N, _SRC_MEAN, _SRC_M2, _GROUP_STD = range(7)


@triton.jit
def _shifted_stats(v, ok):
    """Count, mean and M2 of ``v[ok]`` ([BG] vector), shifted by the max so equal values cancel exactly."""
    n = tl.sum(ok.to(tl.float32), axis=0)
    shift = tl.max(tl.where(ok, v, -float("inf")), axis=0)
    shift = tl.where(n > 0, shift, 0.0)
    mean = shift + tl.sum(tl.where(ok, v - shift, 0.0), axis=0) / tl.maximum(n, 1.0)
    dev = tl.where(ok, v - mean, 0.0)
    return n, mean, tl.sum(dev * dev, axis=0), dev


@triton.jit
def _group_advantages_fwd_kernel(
    x_ptr,  # [N, R] rewards, NaN/inf = unscored
    w_ptr,  # [R] fp32 weights
    out_ptr,  # [N] fp32
    gstat_ptr,  # [B, 7] fp32 per-group partials
    fstat_ptr,  # [B, R, 3] fp32 per-function (count, mean, M2)
    G,
    R,
    stride_xn,
    stride_xr,
    stride_gb,
    stride_fb,
    stride_fr,
    NORMALIZE_THEN_SUM: tl.constexpr,
    RLOO: tl.constexpr,
    FINISH: tl.constexpr,  # write final advantages (scale group/none) or values for the batch-wide epilogue
    SCALE: tl.constexpr,  # divide by the group std (scale="group")
    BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_r = tl.arange(0, BLOCK_R)
    mask_g = offs_g < G
    mask_r = offs_r < R
    rows = pid * G + offs_g  # [BG] int64
    x = tl.load(
        x_ptr + rows[:, None] * stride_xn + offs_r[None, :] * stride_xr,
        mask=mask_g[:, None] & mask_r[None, :],
        other=float("nan"),
    ).to(tl.float32)  # [BG, BR]
    w = tl.load(w_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)  # [BR]
    valid = (x == x) & (tl.abs(x) < float("inf"))  # scored and finite
    scorable = tl.sum(valid.to(tl.int32), axis=1) > 0  # [BG]

    # Per-function (count, mean, M2) over the group, shifted by the group max so equal values cancel exactly.
    n_k = tl.sum(valid.to(tl.float32), axis=0)  # [BR]
    shift_k = tl.max(tl.where(valid, x, -float("inf")), axis=0)
    shift_k = tl.where(n_k > 0, shift_k, 0.0)
    mean_k = shift_k + tl.sum(tl.where(valid, x - shift_k[None, :], 0.0), axis=0) / tl.maximum(n_k, 1.0)
    dev_k = tl.where(valid, x - mean_k[None, :], 0.0)
    m2_k = tl.sum(dev_k * dev_k, axis=0)
    fbase = fstat_ptr + pid * stride_fb + offs_r * stride_fr
    tl.store(fbase, n_k, mask=mask_r)
    tl.store(fbase + 1, mean_k, mask=mask_r)
    tl.store(fbase + 2, m2_k, mask=mask_r)

    # Raw weighted reward (nansum over functions) and its group statistics.
    r = tl.sum(tl.where(valid, x, 0.0) * w[None, :], axis=1)  # [BG]
    n, mean, m2, dev = _shifted_stats(r, scorable)
    # Unbiased std, NaN with fewer than two scored members, 0 when G == 1 (TRL's conventions).
    std = tl.where(n > 1, tl.sqrt(m2 / tl.maximum(n - 1.0, 1.0)), float("nan"))
    std = tl.where(G > 1, std, 0.0)
    gbase = gstat_ptr + pid * stride_gb
    tl.store(gbase + 0, n)
    tl.store(gbase + 1, mean)
    tl.store(gbase + 2, m2)
    tl.store(gbase + 6, std)

    # "src": what the batch-wide epilogue normalizes (NaN rows are left out of it and end with advantage 0).
    if NORMALIZE_THEN_SUM:
        std_k = tl.where(n_k > 1, tl.sqrt(m2_k / tl.maximum(n_k - 1.0, 1.0)), float("nan"))
        std_k = tl.where(G > 1, std_k, 0.0)
        z = tl.where(valid, (x - mean_k[None, :]) / (std_k[None, :] + 1e-4), 0.0)
        z = tl.where(z == z, z, 0.0)  # a NaN std (one scored member) drops that function, as nansum does
        src = tl.sum(z * w[None, :], axis=1)  # [BG]
        src_ok = scorable
    elif RLOO:
        # r_i - mean of the other n-1 scored members == n / (n - 1) * (r_i - mean); undefined when n < 2.
        src = dev * (n / tl.maximum(n - 1.0, 1.0))
        src_ok = scorable & ((tl.zeros_like(src) + n) > 1.0)  # a vector: the interpreter can't AND in a scalar
    else:
        src = dev
        src_ok = scorable
    n_s, mean_s, m2_s, _ = _shifted_stats(src, src_ok)
    tl.store(gbase + 3, n_s)
    tl.store(gbase + 4, mean_s)
    tl.store(gbase + 5, m2_s)
    if FINISH:
        if SCALE:
            adv = tl.where(src_ok, src / (std + 1e-4), 0.0)
            adv = tl.where(adv == adv, adv, 0.0)  # NaN std: fewer than two scored members
        else:
            adv = tl.where(src_ok, src, 0.0)
        tl.store(out_ptr + rows, adv, mask=mask_g)
    else:
        tl.store(out_ptr + rows, tl.where(src_ok, src, float("nan")), mask=mask_g)


def _group_partials_triton(x, w, G, aggregation, scale, estimator):
    N, R = x.shape
    B = N // G
    out = torch.empty(N, dtype=torch.float32, device=x.device)
    gstat = torch.empty(B, 7, dtype=torch.float32, device=x.device)
    fstat = torch.empty(B, R, 3, dtype=torch.float32, device=x.device)
    _group_advantages_fwd_kernel[(B,)](
        x, w, out, gstat, fstat,
        G, R,
        x.stride(0), x.stride(1), gstat.stride(0), fstat.stride(0), fstat.stride(1),
        NORMALIZE_THEN_SUM=aggregation == "normalize_then_sum",
        RLOO=estimator == "rloo",
        FINISH=scale != "batch" and aggregation == "sum_then_normalize",
        SCALE=scale == "group",
        BLOCK_G=max(triton.next_power_of_2(G), 2),
        BLOCK_R=max(triton.next_power_of_2(R), 2),
    )  # fmt: skip
    return out, gstat, fstat


def _shifted_mean_m2(v: torch.Tensor, ok: torch.Tensor, dim: int):
    """Count, mean and M2 of ``v[ok]`` along ``dim``, shifted by the max so equal values cancel exactly."""
    n = ok.sum(dim).to(v.dtype)
    shift = torch.where(ok, v, -torch.inf).amax(dim)
    shift = torch.where(n > 0, shift, 0.0)
    mean = shift + torch.where(ok, v - shift.unsqueeze(dim), 0.0).sum(dim) / n.clamp(min=1.0)
    dev = torch.where(ok, v - mean.unsqueeze(dim), 0.0)
    return n, mean, (dev * dev).sum(dim), dev


def _unbiased_std(n, m2, G):
    std = torch.where(n > 1, (m2 / (n - 1.0).clamp(min=1.0)).sqrt(), torch.nan)
    return std if G > 1 else torch.zeros_like(std)


def _group_partials_torch(x, w, G, aggregation, scale, estimator):
    """The kernel's algorithm with torch ops on [B, G, R] views (the CPU path)."""
    N, R = x.shape
    B = N // G
    x = x.float().view(B, G, R)
    valid = torch.isfinite(x)  # [B, G, R]
    scorable = valid.any(-1)  # [B, G]
    n_k, mean_k, m2_k, _ = _shifted_mean_m2(x, valid, dim=1)  # [B, R]
    fstat = torch.stack([n_k, mean_k, m2_k], dim=-1)  # [B, R, 3]
    r = (torch.where(valid, x, 0.0) * w).sum(-1)  # [B, G]
    n, mean, m2, dev = _shifted_mean_m2(r, scorable, dim=1)  # [B]
    std = _unbiased_std(n, m2, G)
    if aggregation == "normalize_then_sum":
        std_k = _unbiased_std(n_k, m2_k, G)  # [B, R]
        z = torch.where(valid, (x - mean_k.unsqueeze(1)) / (std_k.unsqueeze(1) + EPS), 0.0)
        src = (torch.where(z.isnan(), 0.0, z) * w).sum(-1)  # [B, G]
        src_ok = scorable
    elif estimator == "rloo":  # r_i - mean of the others == n / (n - 1) * (r_i - mean)
        src = (n / (n - 1.0).clamp(min=1.0)).unsqueeze(1) * dev
        src_ok = scorable & (n > 1).unsqueeze(1)
    else:
        src, src_ok = dev, scorable
    n_s, mean_s, m2_s, _ = _shifted_mean_m2(src, src_ok, dim=1)
    if aggregation == "normalize_then_sum" or scale == "batch":
        out = torch.where(src_ok, src, torch.nan)
    elif scale == "group":
        out = torch.where(src_ok, src / (std.unsqueeze(1) + EPS), 0.0)
        out = torch.where(out.isnan(), 0.0, out)  # NaN std: fewer than two scored members
    else:
        out = torch.where(src_ok, src, 0.0)
    gstat = torch.stack([n, mean, m2, n_s, mean_s, m2_s, std], dim=-1)  # [B, 7]
    return out.reshape(N), gstat, fstat


def _merge(n, mean, m2):
    """Chan's merge of per-group (count, mean, M2) [B, ...] into batch (count, mean, unbiased std) [...]."""
    total = n.sum(0)
    grand = (n * torch.nan_to_num(mean)).sum(0) / total.clamp(min=1.0)
    m2_all = (m2 + n * (torch.nan_to_num(mean) - grand) ** 2).sum(0)
    mean_out = torch.where(total > 0, grand, torch.nan)
    std_out = torch.where(total > 1, (m2_all / (total - 1.0).clamp(min=1.0)).sqrt(), torch.nan)
    return total, mean_out, std_out


@dataclass
class AdvantageStats:
    """Logging statistics of one batch of rewards, as 0-d/1-d device tensors (no host sync until ``metrics``).

    Semantics are TRL 1.16's logged metrics: per-function nan-aware mean and unbiased std over all N completions,
    ``reward``/``reward_std`` over the weighted sum of the scorable completions, ``frac_reward_zero_std`` the
    fraction of completions whose normalizing std is ``isclose`` to 0.
    """

    reward_mean_per_func: torch.Tensor  # [R]
    reward_std_per_func: torch.Tensor  # [R]
    reward: torch.Tensor  # []
    reward_std: torch.Tensor  # []
    frac_reward_zero_std: torch.Tensor  # []
    num_unscorable: torch.Tensor  # [] int64
    group_mean: torch.Tensor  # [B] mean weighted reward of each group (NaN when none is scorable)
    group_std: torch.Tensor  # [B] unbiased std of each group (NaN below two scorable, 0 when G == 1)

    _ALIASES = {"reward_mean": "reward_mean_per_func"}

    def __getitem__(self, key: str) -> torch.Tensor:
        """Dict-style access, ``stats["reward"]``; ``"reward_mean"`` is the per-function mean [R]."""
        name = self._ALIASES.get(key, key)
        if name.startswith("_") or name not in self.__dataclass_fields__:
            raise KeyError(f"{key!r}; keys: {sorted([*self.__dataclass_fields__, *self._ALIASES])}")
        return getattr(self, name)

    def metrics(self, func_names: Sequence[str]) -> dict[str, float]:
        """TRL's metric names and values (one host sync): rewards/<name>/mean|std, reward, reward_std, ..."""
        if len(func_names) != self.reward_mean_per_func.numel():
            raise ValueError(f"got {len(func_names)} names for {self.reward_mean_per_func.numel()} reward functions")
        vals = torch.cat(
            [self.reward_mean_per_func, self.reward_std_per_func,
             torch.stack([self.reward, self.reward_std, self.frac_reward_zero_std, self.num_unscorable.float()])]
        ).tolist()  # fmt: skip
        R = len(func_names)
        out = {}
        for i, name in enumerate(func_names):
            out[f"rewards/{name}/mean"] = vals[i]
            out[f"rewards/{name}/std"] = vals[R + i]
        out["reward"], out["reward_std"], out["frac_reward_zero_std"] = vals[2 * R : 2 * R + 3]
        out["num_unscorable"] = vals[2 * R + 3]
        return out


def _validate(rewards, group_size, weights, scale, aggregation, estimator):
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point() or rewards.dim() not in (1, 2):
        raise ValueError("rewards must be a floating-point tensor of shape [N] or [N, R]")
    scale = {True: "group", False: "none"}.get(scale, scale)
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}")
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
    x = rewards.unsqueeze(1) if rewards.dim() == 1 else rewards  # [N, R]
    N, R = x.shape
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if N == 0 or R == 0:
        raise ValueError(f"rewards must be non-empty, got shape {tuple(rewards.shape)}")
    if N % group_size:
        raise ValueError(f"the number of completions N={N} is not divisible by group_size={group_size}")
    if estimator == "rloo" and group_size == 1:
        raise ValueError("estimator='rloo' needs group_size >= 2: a single completion has no leave-one-out baseline")
    if estimator == "rloo" and aggregation != "sum_then_normalize":
        raise ValueError("estimator='rloo' is only defined with multi_objective_aggregation='sum_then_normalize'")
    if weights is None:
        w = torch.ones(R, dtype=torch.float32, device=x.device)
    else:
        w = torch.as_tensor(weights, dtype=torch.float32, device=x.device).reshape(-1)
        if w.numel() != R:
            raise ValueError(f"weights has {w.numel()} entries but rewards has R={R} reward functions")
    return x, w, scale


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    weights: torch.Tensor | Sequence[float] | None = None,
    scale: str = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    estimator: str = "grpo",
) -> tuple[torch.Tensor, AdvantageStats]:
    r"""Group-relative advantages of N = B·G completions, TRL 1.16's ``_generate_and_score_completions`` semantics.

    Rows ``[b*G, (b+1)*G)`` form group b. Let ``x [N, R]`` be the rewards (``[N]`` means R = 1), NaN for a function
    that returned None. A completion is *unscorable* when every function left it unscored; it is excluded from
    every statistic and gets advantage 0. Statistics are nan-aware, std is unbiased (Bessel), NaN with fewer than
    two values (TRL's ``nanstd``), and ``eps = 1e-4``.

    ``sum_then_normalize``: ``r_i = Σ_k w_k x_ik`` over scored k; ``A_i = (r_i − mean_g(r)) / (std + eps)`` with
    std the group's (``scale="group"``), the batch's over all scorable r (``"batch"``; the baseline stays the
    group mean), or no division (``"none"``). G = 1 uses std = 0 (so grpo gives A = 0). A group whose std is NaN
    (one scorable member) gives A = 0.
    ``normalize_then_sum`` (GDPO): ``z_ik = (x_ik − mean_g(x_k)) / (std_g(x_k) + eps)``, ``r_i = Σ_k w_k z_ik``
    over finite z, then ``A_i = (r_i − mean(r)) / (std(r) + eps)`` over the whole batch. As in TRL, ``scale`` is
    ignored in this mode.
    ``estimator="rloo"`` (TRL's ``RLOOTrainer``): the baseline is the mean of the *other* scorable members,
    ``A_i = r_i − (Σ_{j≠i} r_j) / (n − 1) = n / (n − 1) · (r_i − mean)``; a group with fewer than two scorable
    members gives 0. ``scale="none"`` is RLOOTrainer's default; ``"batch"`` is its ``normalize_advantages=True``,
    ``A ← (A − mean(A)) / (std(A) + eps)`` over the batch's defined A; ``"group"`` (not in TRL) divides by the
    group's reward std + eps. Needs G ≥ 2 (TRL's eval-only G = 1 case gives 0; here it is an error) and
    sum_then_normalize. frac_reward_zero_std uses the group std, as RLOOTrainer does.

    frac_reward_zero_std is the mean over completions of ``isclose(std, 0)`` for the std that normalizes it: the
    group's (scale group/none), or, as in TRL, the batch's under ``scale="batch"`` and normalize_then_sum (so it is
    0 or 1 there). Deviation from TRL: ±inf rewards are treated as unscored (as NaN); TRL lets them turn
    advantages into NaN and then into 0 or ±float max. The handling of all-None completions is TRL 1.16's.

    Args:
        rewards: ``[N]`` or ``[N, R]`` float, any float dtype (computed in fp32).
        group_size: G; N must be divisible by it.
        weights: ``[R]`` reward weights (default ones).
        scale: ``"group" | "batch" | "none"`` (TRL's ``scale_rewards``; True/False map to group/none).
        multi_objective_aggregation: ``"sum_then_normalize" | "normalize_then_sum"``.
        estimator: ``"grpo" | "rloo"``.

    Returns:
        ``(advantages [N] fp32, AdvantageStats)`` on the rewards' device, without host synchronization.
    """
    x, w, scale = _validate(rewards, group_size, weights, scale, multi_objective_aggregation, estimator)
    N = x.shape[0]
    G = group_size
    partials = _group_partials_triton if use_triton(x) else _group_partials_torch
    out, gstat, fstat = partials(x, w, G, multi_objective_aggregation, scale, estimator)
    g = gstat.T  # [7, B]

    raw_n, reward, reward_std = _merge(g[_RAW_N], g[_RAW_MEAN], g[_RAW_M2])
    f_n, f_mean, f_std = _merge(fstat[..., 0], fstat[..., 1], fstat[..., 2])  # [R]
    if multi_objective_aggregation == "normalize_then_sum":
        _, src_mean, src_std = _merge(g[_SRC_N], g[_SRC_MEAN], g[_SRC_M2])
        std_used = src_std if N > 1 else torch.zeros_like(src_std)
        adv = torch.where(out.isnan(), 0.0, (out - src_mean) / (std_used + EPS))  # [N]
        zero_std = torch.isclose(std_used, torch.zeros_like(std_used)).float()
    elif scale == "batch" and estimator == "rloo":
        # TRL's RLOOTrainer(normalize_advantages=True): the advantages themselves are batch-normalized.
        _, src_mean, src_std = _merge(g[_SRC_N], g[_SRC_MEAN], g[_SRC_M2])
        adv = torch.where(out.isnan(), 0.0, (out - src_mean) / (src_std + EPS))  # [N]
        zero_std = torch.isclose(g[_GROUP_STD], torch.zeros_like(g[_GROUP_STD])).float().mean()
    elif scale == "batch":
        std_used = reward_std if N > 1 else torch.zeros_like(reward_std)
        adv = torch.where(out.isnan(), 0.0, out / (std_used + EPS))  # [N]
        zero_std = torch.isclose(std_used, torch.zeros_like(std_used)).float()
    else:
        adv = out
        zero_std = torch.isclose(g[_GROUP_STD], torch.zeros_like(g[_GROUP_STD])).float().mean()
    adv = torch.where(adv.isnan(), 0.0, adv)
    stats = AdvantageStats(
        reward_mean_per_func=f_mean,
        reward_std_per_func=f_std,
        reward=reward,
        reward_std=reward_std,
        frac_reward_zero_std=zero_std,
        num_unscorable=(N - raw_n).round().long(),
        group_mean=torch.where(g[_RAW_N] > 0, g[_RAW_MEAN], torch.nan),
        group_std=g[_GROUP_STD],
    )
    return adv, stats


def _nanstd(v: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std ignoring NaN; NaN with fewer than two values."""
    dims = dim if dim is not None else tuple(range(v.dim()))
    mean = torch.nanmean(v, dim=dims, keepdim=True)
    count = (~v.isnan()).sum(dim=dims, keepdim=True)
    ss = torch.nansum((v - mean) ** 2, dim=dims, keepdim=True)
    std = torch.where(count > 1, (ss / (count - 1).clamp(min=1)).sqrt(), torch.nan)
    return std if keepdim else std.squeeze(dims) if dim is not None else std.reshape(())


def group_advantages_ref(
    rewards: torch.Tensor,
    group_size: int,
    weights=None,
    scale: str = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    estimator: str = "grpo",
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain reference of ``group_advantages`` in ``dtype`` (fp64 by default); stats as a dict of tensors."""
    x, w, scale = _validate(rewards, group_size, weights, scale, multi_objective_aggregation, estimator)
    x = x.to(dtype)
    w = w.to(dtype)
    x = torch.where(torch.isfinite(x), x, torch.nan)  # inf counts as unscored
    N, R = x.shape
    G = group_size
    B = N // G
    unscorable = x.isnan().all(dim=1)  # [N]
    raw = torch.nansum(x * w, dim=1)  # [N]
    raw[unscorable] = torch.nan
    if multi_objective_aggregation == "sum_then_normalize":
        r = raw.view(B, G)
        std_g = _nanstd(r, dim=1, keepdim=True) if G > 1 else torch.zeros(B, 1, dtype=dtype)
        std_rows = std_g.expand(B, G).reshape(N)
        if estimator == "rloo":
            others_sum = torch.nansum(r, dim=1, keepdim=True) - r  # [B, G]
            others_n = (~r.isnan()).sum(dim=1, keepdim=True) - 1
            adv = (r - others_sum / others_n).reshape(N)  # 0/0 = NaN when alone: advantage 0 below
            if scale == "batch":
                adv = (adv - torch.nanmean(adv)) / (_nanstd(adv) + EPS)
            elif scale == "group":
                adv = adv / (std_rows + EPS)
        else:
            adv = (r - torch.nanmean(r, dim=1, keepdim=True)).reshape(N)
            if scale == "batch":
                std_rows = (_nanstd(raw) if N > 1 else torch.zeros((), dtype=dtype)).expand(N)
            if scale != "none":
                adv = adv / (std_rows + EPS)
    else:
        grouped = x.view(B, G, R)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = _nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean_k)
        z = ((grouped - mean_k) / (std_k + EPS)).view(N, R)
        s = torch.nansum(z * w, dim=1)
        s[unscorable] = torch.nan
        std_rows = (_nanstd(s) if N > 1 else torch.zeros((), dtype=dtype)).expand(N)
        adv = (s - torch.nanmean(s)) / (std_rows + EPS)
    adv = torch.where(adv.isnan(), 0.0, adv)
    stats = {
        "reward_mean_per_func": torch.nanmean(x, dim=0),
        "reward_std_per_func": _nanstd(x, dim=0),
        "reward": torch.nanmean(raw),
        "reward_std": _nanstd(raw),
        "frac_reward_zero_std": torch.isclose(std_rows, torch.zeros_like(std_rows)).to(dtype).mean(),
        "num_unscorable": unscorable.sum(),
    }
    return adv, stats
