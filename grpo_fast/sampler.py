"""Shared-prefix sampler: G completions per prompt that share the prompt's KV cache instead of copying it G times.

How it plugs into a Hugging Face causal LM (public extension points only, model code untouched):
- the attention function ``grpo_fast.shared_prefix.DECODE_ATTN_NAME`` (registered with transformers'
  ``AttentionInterface`` there, beside the training forward's) selected with ``model.set_attn_implementation``
  for the duration of ``generate`` (previous implementation and train/eval mode restored in a ``finally``);
- a ``transformers.Cache`` of ``_PrefixLayer``s: the prompt's keys/values once per prompt ``[B, Hkv, P, Dh]`` and
  per-sample suffix buffers ``[N, Hkv, L, Dh]`` preallocated for ``max_new_tokens``. The cache reaches the attention
  function as the extra keyword ``prefix_cache=`` given to ``model(...)``; transformers forwards unknown keywords to it.
On the CPU, a Llama or Qwen2 model's prefill and decode steps run through ``grpo_fast.lean_decode`` instead of
``model(...)``: the same arithmetic, cache layers and attention function, in a quarter of the op calls.

Generation: one prefill of the B prompts packed into one sequence (no padding: attention runs per prompt, through
flash-attention's varlen kernel when importable on CUDA, else SDPA; the LM head runs only on each prompt's last
token through ``logits_to_keep``), then lockstep
decoding of the N = B·G rows (row n = b·G + g) with explicit positions (prompt at 0..P_b−1, token t at P_b+t, as
``generate`` places left-padded prompts). The decode loop lives in ``grpo_fast.decode``: a step free of host syncs
over device-resident state (so it can be captured in a CUDA graph, and is on a GPU), finished rows kept behind a
mask until the host looks every ``check_every`` steps and compacts them away (to the live count on the CPU, to
batch buckets under graphs). Sampling (``grpo_fast.sampling``): one softmax, truncation (top-p by a radix select,
no sort), a two-level inverse-CDF draw with one counter-based uniform per row.

Simplifications: stop strings are checked on the host at each check by decoding the last few tokens of each row,
so a row may run up to ``check_every`` tokens past its stop before leaving the batch (they are cut); the repetition
penalty is applied to prompt and generated tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from grpo_fast.decode import CudaGraphRunner, DecodeState, GraphCaptureError, param_fingerprint, run_decode
from grpo_fast.lean_decode import LeanDecoder, is_fsdp2, pack_bf16, packed_bf16_autocast, packed_linear
from grpo_fast.sampling import CounterUniform, SamplingOptions
from grpo_fast.shared_prefix import DECODE_ATTN_NAME

ATTN_NAME = DECODE_ATTN_NAME


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
    """One layer's cache: the prompts' K/V (stored once per prompt at prefill) and preallocated per-sample suffixes.
    Buffers are zero-filled (attention multiplies masked entries by 0) and kept across calls of the same shape."""

    def __init__(self, state: DecodeState):
        super().__init__()
        self.state = state
        self.prefix_k = self.prefix_v = None  # [B, Hkv, P_cap, Dh]
        self.suffix_k = self.suffix_v = None  # [N, Hkv, max_new_tokens, Dh]

    def lazy_initialization(self, key_states, value_states):
        st = self.state
        b, hkv, _, dh = key_states.shape
        # On the CPU the values are kept in the keys' dtype (fp32 under autocast, where the rotary embedding
        # promotes the keys): the attention computes in fp32 and would otherwise convert them at every layer and step.
        v_dtype = key_states.dtype if key_states.device.type == "cpu" else value_states.dtype
        self.prefix_k = key_states.new_zeros((b, hkv, st.prefix_cap, dh))
        self.prefix_v = value_states.new_zeros((b, hkv, st.prefix_cap, dh), dtype=v_dtype)
        self.suffix_k = key_states.new_zeros((st.full, hkv, st.max_new_tokens, dh))
        self.suffix_v = value_states.new_zeros((st.full, hkv, st.max_new_tokens, dh), dtype=v_dtype)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        st = self.state
        if st.prefill:  # the packed prompts' K/V [1, Hkv, T, Dh] land in their prompt's row, once per prompt
            b, hkv = st.n_prompts, key_states.shape[1]
            if (self.prefix_k is None or self.prefix_k.shape[:2] != (b, hkv)
                    or self.prefix_k.shape[2] != st.prefix_cap or self.prefix_k.dtype != key_states.dtype):
                self.lazy_initialization(key_states.expand(b, -1, -1, -1), value_states.expand(b, -1, -1, -1))
            prompt, pos = st.packed_index  # [T], [T]
            self.prefix_k[prompt, :, pos] = key_states[0].transpose(0, 1)  # [T, Hkv, Dh]
            self.prefix_v[prompt, :, pos] = value_states[0].transpose(0, 1).to(self.prefix_v.dtype)
        else:  # token t of each slot goes to suffix entry t, a device index
            n = st.n
            self.suffix_k[:n].index_copy_(2, st.step.view(1), key_states)
            self.suffix_v[:n].index_copy_(2, st.step.view(1), value_states.to(self.suffix_v.dtype))
        return key_states, value_states

    def compact(self, keep: torch.Tensor, length: int) -> None:
        """Move the kept slots' first ``length`` suffix entries to the front (``keep`` sorted)."""
        m, n = keep.numel(), self.state.n
        self.suffix_k[:m, :, :length] = self.suffix_k[:n, :, :length].index_select(0, keep)
        self.suffix_v[:m, :, :length] = self.suffix_v[:n, :, :length].index_select(0, keep)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        # Only transformers' mask sizing reads this (positions are passed, no mask is built): a host int, no sync.
        return 0 if self.prefix_k is None else self.prefix_k.shape[2]

    def get_max_length(self) -> int:
        return -1


class _SharedPrefixCache(Cache):
    """The sampler's cache: ``_PrefixLayer``s plus the decode state they and the attention function share."""

    def __init__(self, state: DecodeState, num_layers: int):
        super().__init__(layers=[_PrefixLayer(state) for _ in range(num_layers)])
        self.state = state




def check_sampling_options(group_size, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, stop,
                           seed):
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


@contextlib.contextmanager
def _packed_cpu_linears(model, rows: int):
    """Under the caller's CPU bf16 autocast, where oneDNN computes bf16: each plain ``nn.Linear`` runs oneDNN's bf16
    GEMM on its weight cast and packed (blocked for the CPU's AMX/AVX-512 units) once for the call, instead of
    autocast's F.linear, which re-packs the weight at every call (~30% of the decode's linear time on an AMX CPU,
    SmolLM2-135M at 16 rows). The same bf16 GEMM with fp32 accumulation: the tests find the tokens and log-probs
    unchanged. Anything else (no autocast, CUDA, FSDP2's sharded weights, other module types): a no-op."""
    device = model.get_input_embeddings().weight.device
    usable = device.type == "cpu" and packed_bf16_autocast() and not is_fsdp2(model)
    # a module whose forward is already replaced on the instance (accelerate's offload hooks) keeps it
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in m.__dict__
               and m.weight.device.type == "cpu"] if usable else []
    try:
        for m in linears:
            weight, bias = pack_bf16(m.weight, m.bias, rows)
            m.forward = functools.partial(packed_linear, weight=weight, bias=bias)
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


def _model_logits(model, cache, state, ids, positions, keep=None):
    """Logits from the model's own forward: of the packed prompts ``[1, T]`` at prefill (rows ``keep`` only), of the
    n rows' last tokens ``[n, 1]`` at decode."""
    if state.prefill:
        return model(input_ids=ids[None], position_ids=positions[None], cache=cache, use_cache=True,
                     logits_to_keep=keep, prefix_cache=cache).logits[0]
    return model(input_ids=ids[:, None], position_ids=positions[:, None], cache=cache, use_cache=True,
                 prefix_cache=cache).logits[:, -1]


@contextlib.contextmanager
def _step_forward(model, rows: int, lean: bool):
    """The logits function ``forward(cache, state, ids, positions, keep=None)`` of one ``generate`` call:
    ``LeanDecoder`` where it applies (and ``lean``), else the model's forward with packed linears."""
    decoder = LeanDecoder.build(model, rows) if lean else None
    if decoder is not None:
        yield decoder
        return
    with _packed_cpu_linears(model, rows):
        yield functools.partial(_model_logits, model)


class SharedPrefixSampler:
    """Samples G completions per prompt from ``model`` (a Hugging Face causal LM using the attention interface).

    ``cuda_graphs``: capture the decode step in CUDA graphs (default: when the model is on a CUDA device);
    ``check_every``: steps between host checks (K; default 8 on CUDA, where a check waits for the device, and 1 on
    the CPU, where it costs nothing and compacting finished rows at once saves their compute: with rows ending at
    scattered steps, K = 1 / 4 / 8 / 16 took 4.0 / 4.5 / 5.1 / 6.2 s of CPU time on SmolLM2-135M);
    ``bucketed``: run the bucketed, masked schedule of the graph path even without graphs (default: only with
    graphs), which tests use to check it on the CPU;
    ``lean``: compute the steps with ``LeanDecoder`` where it applies, a Llama or Qwen2 model on the CPU (default);
    False: always the model's own forward."""

    def __init__(self, model, tokenizer=None, *, cuda_graphs: bool | None = None, check_every: int | None = None,
                 bucketed: bool | None = None, lean: bool = True):
        if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int)
                                        or check_every < 1):
            raise ValueError(f"check_every must be None or an int >= 1, got {check_every!r}")
        if cuda_graphs and not torch.cuda.is_available():
            raise ValueError("cuda_graphs=True needs a CUDA device; pass None (auto) or False")
        self.model = model
        self.tokenizer = tokenizer
        self.cuda_graphs, self.check_every, self.bucketed, self.lean = cuda_graphs, check_every, bucketed, lean
        self._workspace = None  # (signature, fingerprint, state, cache, runner) kept for the next call's graphs

    def release(self) -> None:
        """Frees the captured graphs, their memory pool and the decode buffers (dropping the sampler does too)."""
        self._workspace = None

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
        text). ``ignore_eos`` keeps sampling past EOS. ``seed``: one int per prompt (a completion then depends only on
        its prompt, seed, index in the group and step), or an int s (prompt i gets s·1000003 + i), or None (drawn
        from torch's global generator). Returns a ``SampleOutput`` (see its fields)."""
        check_sampling_options(group_size, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, stop,
                               seed)
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
            with (_step_forward(model, len(prompt_ids) * group_size, self.lean) as forward,
                  self._decode_mode(model, lean=isinstance(forward, LeanDecoder))):
                opts = SamplingOptions(float(temperature), top_k or 0, float(top_p), float(min_p or 0.0),
                                       float(repetition_penalty), bool(return_truncated_logprobs))
                args = (forward, prompt_ids, group_size, max_new_tokens, opts, stop or [], seed, ignore_eos, eos, pad)
                try:
                    out = self._generate(*args)
                except GraphCaptureError as err:
                    warnings.warn(f"SharedPrefixSampler: {err}; decoding without CUDA graphs from now on",
                                  stacklevel=3)
                    self.cuda_graphs, self._workspace = False, None
                    out = self._generate(*args)
            tensors = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
            return dataclasses.replace(out, **{k: v.clone() for k, v in tensors.items() if torch.is_tensor(v)})
        finally:
            model.set_attn_implementation(prev_impl)
            model.train(was_training)

    def _graphs(self, device) -> bool:
        """Whether the decode steps on ``device`` run as CUDA graphs."""
        return self.cuda_graphs is not False and device.type == "cuda"

    def _decode_mode(self, model, lean: bool = False):
        """inference_mode (always with the ``LeanDecoder``, which casts no weight through autocast), except (no_grad
        instead):
        - for an FSDP2 model: FSDP2 allocates each unit's unsharded parameters at their first all-gather and refills
          them in place at every later one; allocated here as inference tensors, they would break the training
          forward;
        - under the caller's ``torch.autocast`` without CUDA graphs: autocast's weight cache (which inference mode
          disables) then casts each weight to bf16 once per call instead of once per decode step; the casts, and so
          the tokens, are the same. With graphs the cache is bypassed: a graph must not keep reading a cached copy
          that is freed when the caller's autocast exits."""
        if lean:
            return torch.inference_mode()
        device = model.get_input_embeddings().weight.device
        if torch.is_autocast_enabled(device.type) and torch.is_autocast_cache_enabled() and not self._graphs(device):
            return torch.no_grad()
        if is_fsdp2(model):
            return torch.no_grad()
        return torch.inference_mode()

    def _keys(self, seed, b, g, device) -> torch.Tensor:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        if isinstance(seed, int):
            seed = [seed * 1_000_003 + i for i in range(b)]
        if len(seed) != b:
            raise ValueError(f"seed: a list needs one seed per prompt ({b}), got {len(seed)}")
        return CounterUniform(seed, g, device).keys  # [N]

    def _state(self, b, g, max_new, p_max, vocab, opts, eos, pad, device):
        """The decode state and cache: reused from the last call when graphs are on and nothing they depend on
        changed, else new (the old ones, their graphs and memory pool are dropped first)."""
        graphs = self._graphs(device)
        if max_new == 1:  # no decode step to capture: leave the graphs of the usual calls alone
            state = DecodeState(b, g, max_new, vocab, eos, pad, opts, device)
            state.prefix_cap = p_max
            return state, _SharedPrefixCache(state, self.model.config.get_text_config().num_hidden_layers), None, False
        # A fixed prefix capacity lets the graphs captured for one batch of prompts serve the next.
        p_cap = -(-p_max // 256) * 256 if graphs else p_max
        sig = (b, g, max_new, p_cap, vocab, opts, tuple(eos), pad, device)
        fingerprint = param_fingerprint(self.model) if graphs else None
        ws = self._workspace
        if ws is not None and ws[0] == sig and ws[1] == fingerprint:
            return ws[2], ws[3], ws[4], graphs
        self._workspace = None
        state = DecodeState(b, g, max_new, vocab, eos, pad, opts, device)
        state.prefix_cap = p_cap
        cache = _SharedPrefixCache(state, self.model.config.get_text_config().num_hidden_layers)
        runner = CudaGraphRunner() if graphs else None
        if graphs:
            self._workspace = (sig, fingerprint, state, cache, runner)
        return state, cache, runner, graphs

    def _generate(self, forward, prompt_ids, g, max_new, opts, stop, seed, ignore_eos, eos, pad):
        model = self.model
        device = model.get_input_embeddings().weight.device
        b, n_rows = len(prompt_ids), len(prompt_ids) * g
        lens = torch.tensor([len(p) for p in prompt_ids], device=device)  # [B]
        p_max = max(map(len, prompt_ids))
        keys = self._keys(seed, b, g, device)
        vocab = model.config.get_text_config().vocab_size
        state, cache, runner, graphs = self._state(b, g, max_new, p_max, vocab, opts,
                                                   eos if eos and not ignore_eos else [], pad, device)
        state.reset(lens, keys, prompt_ids)
        state.total_len = p_max + max_new

        # Prefill packs the prompts into one sequence [1, T]: no padding token passes any layer.
        input_ids = torch.tensor([t for p in prompt_ids for t in p], device=device)  # [T]
        bounds = [0]
        for p in prompt_ids:
            bounds.append(bounds[-1] + len(p))
        positions = torch.cat([torch.arange(len(p), device=device) for p in prompt_ids])  # [T]
        state.packed_index = (torch.repeat_interleave(torch.arange(b, device=device), lens), positions)
        state.packed_cu = torch.tensor(bounds, dtype=torch.int32, device=device)  # [B + 1]
        state.packed_bounds = bounds
        last = torch.tensor(bounds[1:], device=device) - 1  # [B] each prompt's last token
        logits = forward(cache, state, input_ids, positions, last)  # [B, V]
        state.logits.copy_(logits.float().repeat_interleave(g, 0))  # [N, V]
        state.prefill = False
        stop_scan = self._stop_scanner(n_rows, max_new, stop) if stop else None
        bucketed = self.bucketed if self.bucketed is not None else graphs
        k = self.check_every or (8 if device.type == "cuda" else 1)
        stops = run_decode(functools.partial(forward, cache, state), cache, state, check_every=k, bucketed=bucketed,
                           runner=runner, stop_scan=stop_scan)

        eos_len = state.lengths.cpu()  # [N], max_new + 1 where no EOS was drawn
        lengths = torch.tensor([stops.get(r, min(int(eos_len[r]), max_new)) for r in range(n_rows)])
        reasons = ["stop" if r in stops else "eos" if eos_len[r] <= max_new else "length" for r in range(n_rows)]
        width = int(lengths.max())
        mask = (torch.arange(width) < lengths[:, None]).long().to(device)  # [N, L]
        ids = state.out_ids[:, :width].masked_fill(mask == 0, pad)
        texts = None
        if self.tokenizer is not None:
            texts = [self._text(ids[i, : lengths[i]].tolist(), stop, reasons[i]) for i in range(n_rows)]
        tlp = None if state.out_tlp is None else state.out_tlp[:, :width] * mask
        return SampleOutput(ids, mask, state.out_lp[:, :width] * mask, texts, reasons, prompt_ids, tlp)

    def _stop_scanner(self, n_rows, max_new, stop):
        """A ``stop_scan`` for ``run_decode``: a row stops at the first token whose text completes a stop string (the
        string ends inside that token's text), judged on the last few tokens, as each row's tokens arrive."""
        history = [[] for _ in range(n_rows)]
        window = max(len(s) for s in stop) + 8
        decode = self.tokenizer.decode

        def scan(tokens, first, eos_len, finished):
            found = {}
            cols, ends = tokens.tolist(), eos_len.tolist()
            for r in range(n_rows):
                if r in finished:
                    continue
                for j, tok in enumerate(cols[r]):
                    if first + j >= min(ends[r], max_new):
                        break
                    history[r].append(tok)
                    tail = history[r][-window:]
                    text, before = decode(tail, skip_special_tokens=True), decode(tail[:-1], skip_special_tokens=True)
                    if any(s in text and s not in before for s in stop):
                        found[r] = first + j + 1
                        break
            return found

        return scan

    def _text(self, toks, stop, reason):
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        if reason == "stop":
            cut = min((text.find(s) for s in stop if s in text), default=len(text))
            text = text[:cut]
        return text
