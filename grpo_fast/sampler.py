"""Shared-prefix sampler: G completions per prompt that share the prompt's KV cache instead of copying it G times.

How it plugs into a Hugging Face causal LM (public extension points only, model code untouched):
- an attention function registered with ``transformers.AttentionInterface`` and selected with
  ``model.set_attn_implementation`` for the duration of ``generate`` (previous implementation and train/eval mode
  restored in a ``finally``);
- a ``transformers.Cache`` of ``_PrefixLayer``s: the prompt's keys/values once per prompt ``[B, Hkv, P, Dh]`` and
  per-sample suffix buffers ``[N, Hkv, L, Dh]`` preallocated for ``max_new_tokens``. The cache reaches the attention
  function as the extra keyword ``prefix_cache=`` given to ``model(...)``; transformers forwards unknown keywords to it.

Generation: one batched, right-padded prefill of the B prompts (causal attention never lets a real token see the
padding on its right; the LM head runs only on each prompt's last token through ``logits_to_keep``), then lockstep
decoding of the N = B·G rows (row n = b·G + g) with explicit positions (prompt at 0..P_b−1, token t at P_b+t, as
``generate`` places left-padded prompts). Finished rows leave the batch: when a row ends (EOS or stop string) the
active rows' suffix buffers are compacted in place, so finished rows cost no compute; the attention then receives
row offsets per prompt instead of a fixed group size. No mask is built per step. Sampling runs on the active rows
only: one softmax, truncation on the top-k candidates when ``top_k`` is set (top-p looks at the top 1024 before
falling back to a full sort), and a two-level inverse-CDF draw with one uniform per row from a seeded generator.

Simplifications: one host sync per step (to learn whether a row finished); stop strings are checked by decoding the
last few tokens of each active row on the host; the repetition penalty is applied to prompt and generated tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from grpo_fast.kernels.prefix_attention import prefix_decode_attention

ATTN_NAME = "grpo_fast_shared_prefix"


@dataclass
class SampleOutput:
    """Result of ``SharedPrefixSampler.generate``; N = B·G rows, row n = b·G + g, L = longest completion."""

    completion_ids: torch.Tensor  # [N, L] long, padded with the pad id
    completion_mask: torch.Tensor  # [N, L] long, 1 up to and including EOS / the last kept token
    logprobs: torch.Tensor  # [N, L] fp32 log p(token) under softmax(logits / T), before any truncation (0 on pads)
    texts: list[str] | None  # decoded completions (stop string and anything after it removed), None without tokenizer
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    prompt_ids: list[list[int]]  # [B] token ids of each prompt
    truncated_logprobs: torch.Tensor | None = None  # [N, L] fp32 under the distribution actually sampled from


class _PrefixLayer(CacheLayerMixin):
    """One layer's cache: the prompts' K/V (stored once per prompt at prefill) and preallocated per-sample suffixes."""

    def __init__(self, state: _DecodeState):
        super().__init__()
        self.state = state
        self.prefix_k = self.prefix_v = None  # [B, Hkv, P, Dh]
        self.suffix_k = self.suffix_v = None  # [N, Hkv, max_new_tokens, Dh]

    def lazy_initialization(self, key_states, value_states):
        st = self.state
        shape = (st.n_rows, key_states.shape[1], st.max_new_tokens, key_states.shape[3])
        self.suffix_k = key_states.new_empty(shape)
        self.suffix_v = value_states.new_empty(shape)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        st = self.state
        if st.step < 0:  # prefill: keep the prompts' K/V as they are, once per prompt
            self.lazy_initialization(key_states, value_states)
            # The projections arrive as transposed views; one contiguous copy now spares one per decode step.
            self.prefix_k, self.prefix_v = key_states.contiguous(), value_states.contiguous()
        else:
            n = key_states.shape[0]
            self.suffix_k[:n, :, st.step] = key_states[:, :, 0]
            self.suffix_v[:n, :, st.step] = value_states[:, :, 0]
        return key_states, value_states

    def compact(self, keep: torch.Tensor, length: int) -> None:
        """Move the kept rows' first ``length`` suffix entries to the front (rows in ``keep`` stay sorted)."""
        m = keep.numel()
        self.suffix_k[:m, :, :length] = self.suffix_k[keep, :, :length]
        self.suffix_v[:m, :, :length] = self.suffix_v[keep, :, :length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.prefix_k is None else self.prefix_k.shape[2] + max(self.state.step, 0)

    def get_max_length(self) -> int:
        return -1


class _SharedPrefixCache(Cache):
    """The sampler's cache: ``_PrefixLayer``s plus the decode state they and the attention function share."""

    def __init__(self, state: _DecodeState, num_layers: int):
        super().__init__(layers=[_PrefixLayer(state) for _ in range(num_layers)])
        self.state = state


@dataclass
class _DecodeState:
    n_rows: int
    max_new_tokens: int
    prefix_lens: torch.Tensor  # [B] long
    total_len: int  # longest prompt + max_new_tokens, for the sliding-window check
    step: int = -1  # -1 during prefill, else the index t of the token being written
    groups: int | torch.Tensor = 1  # group size G while every group is complete, else row offsets [B + 1]
    max_group: int = 1


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             prefix_cache=None, **kwargs):
    """Attention function registered as ``ATTN_NAME``: SDPA at prefill, prefix + suffix cascade at decode."""
    if prefix_cache is None:
        raise RuntimeError(f"attention '{ATTN_NAME}' is only usable inside SharedPrefixSampler.generate")
    st = prefix_cache.state
    layer = prefix_cache.layers[module.layer_idx]
    if st.step < 0:
        window = kwargs.get("sliding_window")
        if window is not None and window < st.total_len:
            raise ValueError(f"SharedPrefixSampler: layer {module.layer_idx} uses a sliding window of {window} tokens, "
                             f"smaller than prompt + max_new_tokens = {st.total_len}; this model cannot be served")
        for name in ("softcap", "s_aux"):
            if kwargs.get(name) is not None:
                raise ValueError(f"SharedPrefixSampler: attention with '{name}' is not supported")
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])  # [B, H, P, Dh]
        return out.transpose(1, 2), None
    n = query.shape[0]
    out = prefix_decode_attention(query, layer.prefix_k, layer.prefix_v, st.prefix_lens, layer.suffix_k[:n],
                                  layer.suffix_v[:n], st.step + 1, st.groups, scale=scaling,
                                  max_group_size=st.max_group)  # [n, H, 1, Dh]
    return out.transpose(1, 2), None


AttentionInterface.register(ATTN_NAME, _shared_prefix_attention)


def _check_options(group_size, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, stop, seed):
    def bad(name, valid, value):
        raise ValueError(f"{name} must be {valid}, got {value!r}")

    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        bad("group_size", "an int >= 1", group_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        bad("max_new_tokens", "an int >= 1", max_new_tokens)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        bad("temperature", "a finite float >= 0 (0 = greedy)", temperature)
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        bad("top_p", "a float in (0, 1]", top_p)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        bad("top_k", "None or an int >= 0 (0 = disabled)", top_k)
    if min_p is not None and (not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1):
        bad("min_p", "None or a float in [0, 1]", min_p)
    if (not isinstance(repetition_penalty, (int, float)) or not math.isfinite(repetition_penalty)
            or repetition_penalty <= 0):
        bad("repetition_penalty", "a finite float > 0 (1 = off)", repetition_penalty)
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)):
        bad("stop", "None or a list of non-empty strings", stop)
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if seed is not None and not is_int(seed) and not (isinstance(seed, (list, tuple)) and all(map(is_int, seed))):
        bad("seed", "None, an int, or a list of ints (one per prompt)", seed)


class SharedPrefixSampler:
    """Samples G completions per prompt from ``model`` (a Hugging Face causal LM using the attention interface)."""

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    def _special_ids(self, eos_token_id):
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = eos_token_id
        if eos is None and gen_cfg is not None:
            eos = gen_cfg.eos_token_id
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        if pad is None and gen_cfg is not None:
            pad = gen_cfg.pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
        return eos, pad

    def _tokenize(self, prompts) -> list[list[int]]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        if all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; pass token-id lists or give SharedPrefixSampler one")
            ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        else:
            ids = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        return ids

    @torch.no_grad()
    def generate(self, prompts, group_size: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int | None = None, min_p: float | None = None,
                 repetition_penalty: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                 return_truncated_logprobs: bool = False, ignore_eos: bool = False,
                 eos_token_id: int | list[int] | None = None) -> SampleOutput:
        """Sample ``group_size`` completions for each prompt.

        ``prompts``: list of B strings (needs the tokenizer; tokenized without special tokens, as TRL does for
        chat-templated text) or of B token-id lists. ``temperature == 0`` is greedy (its log-probs are then those
        of softmax(logits)). Truncation order: repetition penalty → temperature → top-k → top-p → min-p (as HF).
        ``logprobs`` are log softmax(logits / T) at the sampled token — what the trainer recomputes — without the
        penalty or truncation; ``return_truncated_logprobs`` adds those of the distribution actually sampled.
        ``stop``: a row ends at the token that completes one of the strings (kept in the ids, removed from the
        text). ``ignore_eos`` keeps sampling past EOS. ``seed`` seeds a private torch.Generator. Returns a
        ``SampleOutput`` (see its fields)."""
        _check_options(group_size, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, stop, seed)
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        model = self.model
        prompt_ids = self._tokenize(prompts)
        eos, pad = self._special_ids(eos_token_id)
        prev_impl, was_training = model.config._attn_implementation, model.training
        try:
            model.set_attn_implementation(ATTN_NAME)
            if model.config._attn_implementation != ATTN_NAME:
                raise ValueError(f"{type(model).__name__} does not route attention through transformers' "
                                 "AttentionInterface; SharedPrefixSampler cannot serve it")
            model.eval()
            # inference mode drops autograd bookkeeping from every decode op; its tensors cannot enter a later
            # autograd graph, so the (small) outputs are cloned back to ordinary tensors outside it
            with torch.inference_mode():
                out = self._generate(prompt_ids, group_size, max_new_tokens, float(temperature), float(top_p),
                                     top_k or 0, min_p or 0.0, float(repetition_penalty), stop or [], seed,
                                     return_truncated_logprobs, ignore_eos, eos, pad)
            tensors = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
            return dataclasses.replace(out, **{k: v.clone() for k, v in tensors.items() if torch.is_tensor(v)})
        finally:
            model.set_attn_implementation(prev_impl)
            model.train(was_training)

    def _generate(self, prompt_ids, g, max_new, temperature, top_p, top_k, min_p, penalty, stop, seed,
                  want_truncated, ignore_eos, eos, pad):
        model = self.model
        device = model.get_input_embeddings().weight.device
        b, n_rows = len(prompt_ids), len(prompt_ids) * g
        lens = torch.tensor([len(p) for p in prompt_ids], device=device)  # [B]
        p_max = int(lens.max())
        input_ids = torch.full((b, p_max), pad, dtype=torch.long, device=device)  # [B, P] right-padded
        for i, p in enumerate(prompt_ids):
            input_ids[i, : len(p)] = torch.tensor(p, device=device)
        n_layers = model.config.get_text_config().num_hidden_layers
        state = _DecodeState(n_rows, max_new, lens, p_max + max_new)
        cache = _SharedPrefixCache(state, n_layers)
        gen = None
        if isinstance(seed, (list, tuple)):
            if len(seed) != b:
                raise ValueError(f"seed: a list needs one seed per prompt ({b}), got {len(seed)}")
            gen = CounterUniform(seed, g, device)
        elif seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
        vocab = model.config.get_text_config().vocab_size
        eos_t = torch.tensor(eos, device=device, dtype=torch.long)
        check_eos = bool(eos) and not ignore_eos
        seen = None
        if penalty != 1.0:
            seen = torch.zeros((n_rows, vocab), dtype=torch.bool, device=device)  # [N, V]
            for i, p in enumerate(prompt_ids):
                seen[i * g:(i + 1) * g, torch.tensor(p, device=device)] = True

        positions = torch.arange(p_max, device=device).expand(b, p_max)  # [B, P]
        logits = model(input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=(lens - 1)[:, None], prefix_cache=cache).logits[:, 0]  # [B, V]
        logits = logits.float().repeat_interleave(g, 0)  # [N, V]

        out_ids = torch.full((n_rows, max_new), pad, dtype=torch.long, device=device)  # [N, L]
        out_lp = torch.zeros((n_rows, max_new), dtype=torch.float32, device=device)  # [N, L]
        out_tlp = torch.zeros_like(out_lp) if want_truncated else None
        lengths = torch.full((n_rows,), max_new, dtype=torch.long)  # host copy, [N]
        reasons = ["length"] * n_rows
        rows = torch.arange(n_rows, device=device)  # active rows, sorted, [n]
        row_pos = lens.repeat_interleave(g)  # [n] position of the next token
        state.groups, state.max_group = g, g
        stop_window = max((len(s) for s in stop), default=0) + 8
        rows_host = list(range(n_rows))

        for t in range(max_new):
            if isinstance(gen, CounterUniform):
                gen.rows, gen.step = rows, t
            tok, lp, tlp = _sample(logits, temperature, top_k, top_p, min_p, penalty,
                                   None if seen is None else seen[rows], gen, want_truncated)  # [n]
            out_ids[rows, t] = tok
            out_lp[rows, t] = lp
            if want_truncated:
                out_tlp[rows, t] = tlp
            if seen is not None:
                seen[rows, tok] = True
            done = torch.isin(tok, eos_t) if check_eos else None
            finished = []  # local indices of rows that end at this token
            if done is not None and bool(done.any()):
                for i in done.nonzero()[:, 0].tolist():
                    finished.append(i)
                    reasons[rows_host[i]] = "eos"
            if stop:
                finished += self._stop_hits(out_ids, rows_host, t, stop, stop_window, reasons, set(finished))
            for i in finished:
                lengths[rows_host[i]] = t + 1
            if t + 1 == max_new:
                break
            if finished:
                keep_mask = torch.ones(len(rows_host), dtype=torch.bool)
                keep_mask[finished] = False
                if not bool(keep_mask.any()):
                    break
                keep = keep_mask.nonzero()[:, 0].to(device)  # [n'] local indices
                for layer in cache.layers:
                    layer.compact(keep, t)
                rows, tok, row_pos = rows[keep], tok[keep], row_pos[keep]
                rows_host = [r for r, k in zip(rows_host, keep_mask.tolist()) if k]
                counts = torch.bincount(torch.tensor(rows_host) // g, minlength=b)  # [B]
                if bool((counts == counts[0]).all()):
                    state.groups, state.max_group = int(counts[0]), int(counts[0])
                else:
                    state.groups = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)
                    state.max_group = int(counts.max())
            state.step = t
            logits = model(input_ids=tok[:, None], position_ids=(row_pos + t)[:, None], cache=cache, use_cache=True,
                           prefix_cache=cache).logits[:, -1].float()  # [n, V]

        width = int(lengths.max())
        mask = (torch.arange(width) < lengths[:, None]).long().to(device)  # [N, L]
        ids = out_ids[:, :width].masked_fill(mask == 0, pad)
        texts = None
        if self.tokenizer is not None:
            texts = [self._text(ids[i, : lengths[i]].tolist(), stop, reasons[i]) for i in range(n_rows)]
        return SampleOutput(ids, mask, out_lp[:, :width] * mask, texts, reasons, prompt_ids,
                            None if out_tlp is None else out_tlp[:, :width] * mask)

    def _stop_hits(self, out_ids, rows_host, t, stop, window, reasons, already):
        """Rows whose newest token completes a stop string (the string ends inside the newest token's text)."""
        tail = out_ids[rows_host, max(0, t + 1 - window): t + 1].tolist()
        hits = []
        for i, toks in enumerate(tail):
            if i in already:
                continue
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            before = self.tokenizer.decode(toks[:-1], skip_special_tokens=True)
            if any(s in text and s not in before for s in stop):
                hits.append(i)
                reasons[rows_host[i]] = "stop"
        return hits

    def _text(self, toks, stop, reason):
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        if reason == "stop":
            cut = min((text.find(s) for s in stop if s in text), default=len(text))
            text = text[:cut]
        return text


def _nucleus_candidates(cand, top_p):
    """Sorted candidates covering at least ``top_p`` of the mass: the top 1024 when they do for every row (the usual
    case, ~20× cheaper than sorting the vocabulary), else the fully sorted row."""
    k = min(1024, cand.shape[-1])
    vals, idx = cand.topk(k, -1)  # [n, k]
    if k == cand.shape[-1] or bool((torch.logsumexp(vals, -1) - torch.logsumexp(cand, -1) >= math.log(top_p)).all()):
        return vals, idx
    return cand.sort(-1, descending=True)


class CounterUniform:
    """Per-row uniforms that depend only on (the row's prompt seed, its index in the group, the step): a
    counter-based generator (SplitMix64), so a completion does not depend on which other prompts share the batch —
    the same prompt with the same seed gives the same completion on 1 rank or 8. ``rows`` (active row ids) and
    ``step`` are set before each draw."""

    _MASK = (1 << 64) - 1

    def __init__(self, prompt_seeds: list[int], group_size: int, device):
        keys = [self._mix((s * 0x9E3779B97F4A7C15 + g) & self._MASK) for s in prompt_seeds for g in range(group_size)]
        self.keys = torch.tensor([k - (1 << 64) if k >= 1 << 63 else k for k in keys], dtype=torch.int64,
                                 device=device)  # [N] as signed int64 bit patterns
        self.rows, self.step = None, 0

    @classmethod
    def _mix(cls, z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & cls._MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & cls._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & cls._MASK
        return z ^ (z >> 31)

    def uniform(self) -> torch.Tensor:
        """Uniform float64 in [0, 1) for each active row: SplitMix64 on (key + step), vectorized in int64 (wrapping
        multiplication; logical right shifts emulated by masking the arithmetic ones)."""
        off = ((self.step + 1) * 0x9E3779B97F4A7C15) & self._MASK
        z = self.keys[self.rows] + (off - (1 << 64) if off >= 1 << 63 else off)
        z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * -4658895280553007687  # 0xBF58476D1CE4E5B9
        z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * -7723592293110705685  # 0x94D049BB133111EB
        z = z ^ ((z >> 31) & ((1 << 33) - 1))
        return (((z >> 11) & ((1 << 53) - 1)).double() * 2.0**-53)[:, None]


def _draw(probs: torch.Tensor, gen: torch.Generator | None, width: int = 256) -> torch.Tensor:
    """One index per row of ``probs [n, K]`` (non-negative, any scale) with probability proportional to its entry:
    inverse CDF with one float64 uniform per row, in two levels (pick a block of ``width`` entries by the block
    sums, then the entry inside it), so the float64 cumulative sums cover K / width + width values, not K."""
    n, k = probs.shape
    if isinstance(gen, CounterUniform):
        u = gen.uniform()  # [n, 1]
    else:
        u = torch.rand((n, 1), generator=gen, device=probs.device, dtype=torch.float64)  # [n, 1]
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


def _sample(logits, temperature, top_k, top_p, min_p, penalty, seen, gen, want_truncated):
    """Draw one token per row of ``logits [n, V]`` (fp32, overwritten). Returns token [n], log p under
    softmax(logits / T) [n], and the log-prob under the truncated distribution actually sampled [n] (or None).
    Sampling inverts the CDF with one uniform per row (``_draw``), far cheaper on a CPU than drawing V exponentials
    (Gumbel-max) or calling multinomial."""
    if temperature not in (0.0, 1.0):
        logits.div_(temperature)
    probs = torch.softmax(logits, -1)  # [n, V]
    cand = logits
    if seen is not None:  # HF's rule on the raw logits; dividing by T first changes nothing (T > 0)
        cand = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if temperature == 0.0:
        tok = cand.argmax(-1)  # [n]
        lp = probs.gather(1, tok[:, None])[:, 0].log()
        return tok, lp, lp if want_truncated else None
    idx = None
    if 0 < top_k < cand.shape[-1]:
        cand, idx = cand.topk(top_k, -1)  # [n, k], sorted descending
    if top_p < 1.0:
        if idx is None:
            cand, idx = _nucleus_candidates(cand, top_p)
        cand_probs = cand.softmax(-1)
        before = cand_probs.cumsum(-1) - cand_probs  # mass of the strictly better candidates
        cand = cand.masked_fill(before >= top_p, float("-inf"))  # HF's rule; the best candidate always stays
    if min_p > 0.0:
        floor = cand.amax(-1, keepdim=True) + math.log(min_p)
        cand = cand.masked_fill(cand < floor, float("-inf"))
    if cand is logits:  # nothing truncated or penalized: sample from the probabilities already computed
        trunc_probs = probs
    else:
        trunc_probs = torch.softmax(cand, -1)  # [n, k or V]
    choice = _draw(trunc_probs, gen)  # [n]
    tok = choice if idx is None else idx.gather(1, choice[:, None])[:, 0]
    lp = probs.gather(1, tok[:, None])[:, 0].log()  # log of an fp32 probability: abs error ~1e-7
    tlp = trunc_probs.gather(1, choice[:, None])[:, 0].log() if want_truncated else None
    return tok, lp, tlp
