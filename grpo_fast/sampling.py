"""Token sampling for the decode step, free of host syncs: truncation (repetition penalty, temperature, top-k, top-p,
min-p), the draw, and the log-probs of the drawn token.

Every function here has fixed output shapes and reads no tensor value on the host, so a decode step built from them
can be captured in a CUDA graph. Randomness comes from ``CounterUniform``: one float64 uniform per row that depends
only on (the row's prompt seed, its index in the group, the step), with the step a device tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _signed64(z: int) -> int:
    return z - (1 << 64) if z >= 1 << 63 else z


@dataclass(frozen=True)
class SamplingOptions:
    """What one ``generate`` call samples with; a CUDA graph bakes these values in, so they key its cache."""

    temperature: float  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    penalty: float = 1.0  # repetition penalty, 1 = off
    want_truncated: bool = False  # also the log-prob under the truncated distribution


class CounterUniform:
    """Per-row uniforms that depend only on (the row's prompt seed, its index in the group, the step): a
    counter-based generator (SplitMix64), so a completion does not depend on which other prompts share the batch —
    the same prompt with the same seed gives the same completion on 1 rank or 8 — nor on whether the step runs
    eagerly or replays in a CUDA graph (no generator state to advance)."""

    def __init__(self, prompt_seeds: list[int], group_size: int, device):
        keys = [self._mix((s * _GOLDEN + g) & _MASK64) for s in prompt_seeds for g in range(group_size)]
        self.keys = torch.tensor([_signed64(k) for k in keys], dtype=torch.int64, device=device)  # [N]

    @staticmethod
    def _mix(z: int) -> int:
        z = (z + _GOLDEN) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    @staticmethod
    def uniform(keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Uniform float64 in [0, 1) per row: SplitMix64 on (key + (step + 1)·golden), vectorized in int64 (wrapping
        multiplication; logical right shifts emulated by masking the arithmetic ones). ``keys [n]``, ``step`` a
        0-dim long tensor. Returns ``[n, 1]``."""
        z = keys + (step + 1) * _signed64(_GOLDEN)
        z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _signed64(0xBF58476D1CE4E5B9)
        z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _signed64(0x94D049BB133111EB)
        z = z ^ ((z >> 31) & ((1 << 33) - 1))
        return (((z >> 11) & ((1 << 53) - 1)).double() * 2.0**-53)[:, None]


def draw(probs: torch.Tensor, u: torch.Tensor, width: int = 256) -> torch.Tensor:
    """One index per row of ``probs [n, K]`` (non-negative, any scale) with probability proportional to its entry,
    given one uniform ``u [n, 1]`` float64 per row: inverse CDF in two levels (pick a block of ``width`` entries by
    the block sums, then the entry inside it), so the float64 cumulative sums cover K / width + width values, not K.
    Far cheaper on a CPU than drawing K exponentials (Gumbel-max) or calling multinomial."""
    n, k = probs.shape
    if k <= 4 * width:
        cdf = probs.cumsum(-1, dtype=torch.float64)
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max_(k - 1)[:, 0]
    n_blocks = -(-k // width)
    if k % width:
        probs = F.pad(probs, (0, n_blocks * width - k))  # zero mass: never drawn
    blocks = probs.view(n, n_blocks, width)
    block_mass = blocks.sum(-1).double()  # [n, n_blocks]; pairwise fp32 sums of 256 entries are exact enough
    block_cdf = block_mass.cumsum(-1)
    target = u * block_cdf[:, -1:]
    bi = torch.searchsorted(block_cdf, target, right=True).clamp_max_(n_blocks - 1)  # [n, 1]
    mass = block_mass.gather(1, bi)
    frac = (target - (block_cdf.gather(1, bi) - mass)) / mass  # position inside the block, in [0, 1)
    inner = blocks.gather(1, bi[:, :, None].expand(n, 1, width))[:, 0].cumsum(-1, dtype=torch.float64)  # [n, width]
    j = torch.searchsorted(inner, frac * inner[:, -1:], right=True).clamp_max_(width - 1)
    return (bi * width + j)[:, 0]


def top_p_keep(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool ``[n, V]``: the tokens top-p keeps — token i stays when the mass of the tokens strictly more probable than
    it is below ``top_p`` (HF's rule; the most probable token always stays) — without sorting the vocabulary.

    The cut-off is found by a radix select on the probabilities' bit patterns (non-negative floats order like their
    int32 bits): three passes of 11, 10 and 10 bits, each a mass histogram (``scatter_add``, float64) whose reversed
    cumulative sum tells which digit holds the cut-off. Fixed shapes, no host sync, ~3 passes over ``[n, V]``
    whatever the distribution (a top-1024 shortcut needs a data-dependent fallback to a full sort)."""
    n = probs.shape[0]
    bits = probs.contiguous().view(torch.int32)  # [n, V]
    p64 = probs.double()
    prefix = bits.new_zeros((n, 1), dtype=torch.int64)
    above_base = p64.new_zeros((n, 1))  # mass strictly above every value sharing the current prefix
    for shift, w in ((20, 11), (10, 10), (0, 10)):
        if shift == 20:  # the sign bit is 0: every value shares the empty prefix
            key = (bits >> shift).long()
        else:  # values outside the prefix land in a discarded bin
            key = torch.where((bits >> (shift + w)) == prefix, (bits >> shift) & ((1 << w) - 1), 1 << w).long()
        hist = p64.new_zeros((n, (1 << w) + 1)).scatter_add_(1, key, p64)[:, :-1]  # [n, 2^w]
        above = above_base + (hist.sum(-1, keepdim=True) - hist.cumsum(-1))  # mass of the higher digits
        d = (above >= top_p).sum(-1, keepdim=True)  # lowest digit whose higher mass is below top_p
        above_base = above.gather(1, d)
        prefix = (prefix << w) | d
    return bits >= prefix


def sample_tokens(logits: torch.Tensor, opts: SamplingOptions, seen: torch.Tensor | None, u: torch.Tensor):
    """Draw one token per row of ``logits [n, V]`` (fp32, overwritten) with uniforms ``u [n, 1]``. Returns token
    ``[n]``, log p under softmax(logits / T) ``[n]``, and the log-prob under the truncated distribution actually
    sampled ``[n]`` (None unless ``opts.want_truncated``). Truncation order as HF: repetition penalty (over ``seen
    [n, V]`` bool) → temperature → top-k → top-p → min-p."""
    t = opts.temperature
    if t not in (0.0, 1.0):
        logits.div_(t)
    probs = torch.softmax(logits, -1)  # [n, V]
    cand = logits
    if seen is not None:  # HF's rule on the raw logits; dividing by T first changes nothing (T > 0)
        cand = torch.where(seen, torch.where(logits < 0, logits * opts.penalty, logits / opts.penalty), logits)
    if t == 0.0:
        tok = cand.argmax(-1)  # [n]
        lp = probs.gather(1, tok[:, None])[:, 0].log()
        return tok, lp, lp if opts.want_truncated else None
    idx = None
    if 0 < opts.top_k < cand.shape[-1]:
        cand, idx = cand.topk(opts.top_k, -1)  # [n, k], sorted descending
    if opts.top_p < 1.0:
        if idx is None:
            keep = top_p_keep(probs if cand is logits else torch.softmax(cand, -1), opts.top_p)
            cand = cand.masked_fill(~keep, float("-inf"))
        else:
            cand_probs = cand.softmax(-1)
            before = cand_probs.cumsum(-1) - cand_probs  # mass of the strictly better candidates
            cand = cand.masked_fill(before >= opts.top_p, float("-inf"))  # the best candidate always stays
    if opts.min_p > 0.0:
        floor = cand.amax(-1, keepdim=True) + math.log(opts.min_p)
        cand = cand.masked_fill(cand < floor, float("-inf"))
    trunc_probs = probs if cand is logits else torch.softmax(cand, -1)  # [n, k or V]
    choice = draw(trunc_probs, u)  # [n]
    tok = choice if idx is None else idx.gather(1, choice[:, None])[:, 0]
    lp = probs.gather(1, tok[:, None])[:, 0].log()  # log of an fp32 probability: abs error ~1e-7
    tlp = trunc_probs.gather(1, choice[:, None])[:, 0].log() if opts.want_truncated else None
    return tok, lp, tlp
