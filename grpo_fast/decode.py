"""The shared-prefix sampler's decode loop: a sync-free step over device-resident state, a host check every K steps,
batch buckets, and CUDA graphs over the same step.

The step (``decode_step``: sample token t from the current logits → write outputs → EOS check → forward token t
through the model → new logits → ``step += 1``) reads no tensor value on the host and keeps every shape fixed: the
step index, positions, suffix length, done flags and the sampling counter are tensors, cache writes go to a device
index. Rows that finish stay in the batch behind ``done`` and emit pad; the host looks every K steps (``run_decode``:
EOS flags and new tokens copied out, stop strings, early exit) and only then compacts the live rows to the front of
the buffers, in place — on the CPU to the live count, under CUDA graphs to the next bucket size. The CPU thus runs,
eagerly, the very step a GPU captures (and ``bucketed=True`` runs the GPU's schedule on the CPU, for tests).

CUDA graphs (``CudaGraphRunner``): ``torch.cuda.CUDAGraph`` captures ``decode_step`` once per batch width. Chosen over
``torch.compile(mode="reduce-overhead")`` because the step is already static (fixed shapes, device state, buffers
at fixed addresses), so capturing it needs no tracing of the Hugging Face model, its Cache object or the Triton
launches (dynamo graph-breaks on the cache and would re-trace for every bucket and model), adds no compile time to a
training run, and the captured code is exactly the eager code the CPU tests run. Widths are buckets (``bucket_sizes``);
the batch is compacted to the next smaller bucket only when the live count falls below it, so few graphs exist. The
first step at a new width runs eagerly (it is the warm-up: Triton compiles, cuBLAS allocates) and is then captured;
all graphs share one memory pool holding only step temporaries. Graphs are kept across ``generate`` calls with the
same signature while the parameters stay at the same addresses (``param_fingerprint``).
"""

from __future__ import annotations

import torch

from grpo_fast.kernels.prefix_attention import DecodePlan
from grpo_fast.sampling import CounterUniform, SamplingOptions, sample_tokens


def bucket_sizes(n_rows: int) -> list[int]:
    """Batch widths a decode runs at, descending: ``n_rows``, then the powers of two and 1.5× powers of two below it
    (1, 2, 3, 4, 6, 8, 12, ...): from 2 up a live count pads up by at most 1.5×."""
    sizes = {n_rows}
    p = 1
    while p < n_rows:
        sizes.add(p)
        if p >= 2 and p * 3 // 2 < n_rows:
            sizes.add(p * 3 // 2)
        p *= 2
    return sorted(sizes, reverse=True)


class DecodeState:
    """Everything a decode step reads or writes, on the device, at fixed addresses. Per-row tensors are views
    ``[:n]`` of full-width buffers (``n`` the current batch width, a host int fixed between compactions); compaction
    gathers the kept rows to the front in place, so a graph captured at width n keeps reading the right memory."""

    def __init__(self, n_prompts: int, group_size: int, max_new_tokens: int, vocab: int, eos: list[int], pad: int,
                 opts: SamplingOptions, device):
        b, g, length = n_prompts, group_size, max_new_tokens
        self.n_prompts, self.group_size, self.full, self.max_new_tokens = b, g, b * g, length
        self.opts, self.pad, self.vocab = opts, pad, vocab
        n = b * g
        self.n = n
        self.prefix_cap, self.total_len = 0, 0  # prefix buffer length (>= longest prompt); prompt + new tokens
        self.packed_index = self.packed_cu = self.packed_bounds = None  # where prefill's packed tokens belong
        self.prefill = True  # the attention function's branch; a Python flag, constant inside a captured decode step
        self.plan = DecodePlan()  # shared by the layers of one decode step (CPU attention masks)
        self.step = torch.zeros((), dtype=torch.long, device=device)  # index t of the token being sampled
        self.suffix_len = torch.ones((), dtype=torch.long, device=device)  # t + 1 while token t is forwarded
        self.prefix_lens = torch.ones(b, dtype=torch.long, device=device)  # [B]
        self.arange = torch.arange(n, device=device)  # [N]
        self.offsets = torch.zeros(b + 1, dtype=torch.long, device=device)  # [B + 1] row offsets once compacted
        self.groups: int | torch.Tensor = g
        self.max_group = g
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self._tok = torch.zeros(n, dtype=torch.long, device=device)  # [N] token t, input of the forward
        self._row_ids = torch.arange(n, device=device)  # [N] original row of each slot
        self._row_plen = torch.zeros(n, dtype=torch.long, device=device)  # [N] prompt length of each slot
        self._keys = torch.zeros(n, dtype=torch.long, device=device)  # [N] counter-generator keys
        self._done = torch.zeros(n, dtype=torch.bool, device=device)  # [N]
        self._logits = torch.zeros((n, vocab), dtype=torch.float32, device=device)  # [N, V]
        self._seen = torch.zeros((n, vocab), dtype=torch.bool, device=device) if opts.penalty != 1.0 else None
        self.out_ids = torch.full((n, length), pad, dtype=torch.long, device=device)  # [N, L]
        self.out_lp = torch.zeros((n, length), dtype=torch.float32, device=device)  # [N, L]
        self.out_tlp = torch.zeros_like(self.out_lp) if opts.want_truncated else None
        self.lengths = torch.full((n,), length + 1, dtype=torch.long, device=device)  # [N] set at EOS; L + 1: none
        self.row_ids_host = list(range(n))

    def reset(self, prefix_lens: torch.Tensor, keys: torch.Tensor, prompt_ids: list[list[int]]) -> None:
        """Prepares the buffers for a new ``generate`` call (same shapes) without moving them."""
        g, n = self.group_size, self.full
        self.n, self.prefill, self.groups, self.max_group = n, True, g, g
        self.row_ids_host = list(range(n))
        self.step.zero_()
        self.prefix_lens.copy_(prefix_lens)
        self._row_ids.copy_(self.arange)
        self._row_plen.copy_(prefix_lens.repeat_interleave(g))
        self._keys.copy_(keys)
        self._done.zero_()
        self.out_ids.fill_(self.pad)
        self.out_lp.zero_()
        if self.out_tlp is not None:
            self.out_tlp.zero_()
        self.lengths.fill_(self.max_new_tokens + 1)
        if self._seen is not None:
            self._seen.zero_()
            for i, p in enumerate(prompt_ids):
                self._seen[i * g:(i + 1) * g, torch.tensor(p, device=self._seen.device)] = True

    def _rows(self):
        return [t for t in (self._tok, self._row_ids, self._row_plen, self._keys, self._done, self._logits,
                            self._seen) if t is not None]

    tok = property(lambda self: self._tok[: self.n])
    row_ids = property(lambda self: self._row_ids[: self.n])
    row_plen = property(lambda self: self._row_plen[: self.n])
    keys = property(lambda self: self._keys[: self.n])
    done = property(lambda self: self._done[: self.n])
    logits = property(lambda self: self._logits[: self.n])
    seen = property(lambda self: None if self._seen is None else self._seen[: self.n])

    def compact(self, keep: list[int], layers, written: int, bucketed: bool) -> None:
        """Moves the slots ``keep`` (sorted local indices) to the front; ``written`` suffix entries are valid. Rows
        of one prompt stay contiguous, so the attention gets row offsets per prompt."""
        m = len(keep)
        idx = torch.tensor(keep, device=self._tok.device)
        for buf in self._rows():
            buf[:m] = buf[: self.n].index_select(0, idx)
        for layer in layers:
            layer.compact(idx, written)
        self.n = m
        self.row_ids_host = [self.row_ids_host[i] for i in keep]
        counts = torch.bincount(torch.tensor(self.row_ids_host) // self.group_size, minlength=self.n_prompts)
        self.offsets.copy_(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
        self.groups = self.offsets
        # A captured graph bakes max_group into its launch shapes: the bucketed schedule uses the bound for the width.
        self.max_group = min(self.group_size, m) if bucketed else int(counts.max())


def sample_step(state: DecodeState) -> None:
    """Samples token t (t = ``state.step``) for every slot and writes it, its log-probs and the EOS check out.
    Slots already done write pad (their columns are cut by their length in the end)."""
    n = state.n
    u = CounterUniform.uniform(state.keys, state.step)  # [n, 1]
    tok, lp, tlp = sample_tokens(state.logits, state.opts, state.seen, u)  # [n]
    done = state.done
    was_done = done.clone()
    where = (state.row_ids, state.step.expand(n))
    state.out_ids.index_put_(where, tok.masked_fill(was_done, state.pad))
    state.out_lp.index_put_(where, lp.masked_fill(was_done, 0.0))
    if tlp is not None:
        state.out_tlp.index_put_(where, tlp.masked_fill(was_done, 0.0))
    if state.seen is not None:
        state.seen.index_put_((state.arange[:n], tok), torch.ones((), dtype=torch.bool, device=tok.device))
    if state.eos is not None:
        hit = (tok[:, None] == state.eos).any(-1) & ~was_done  # [n]; isin may sort (a data-dependent unique)
        rows = state.row_ids
        state.lengths.index_put_((rows,), torch.where(hit, state.step + 1, state.lengths.index_select(0, rows)))
        done.logical_or_(hit)
    state.tok.copy_(tok)


def forward_step(forward, state: DecodeState) -> None:
    """Forwards token t of every slot at position P_row + t, writing suffix entry t; new logits; ``step += 1``.
    ``forward(ids [n], positions [n])`` returns the logits ``[n, V]`` (the sampler's model forward)."""
    state.suffix_len.copy_(state.step + 1)
    state.plan = DecodePlan()  # the layers' attention masks, built by the first layer
    state.logits.copy_(forward(state.tok, state.row_plen + state.step))
    state.step.add_(1)


def decode_step(forward, state: DecodeState) -> None:
    """One whole decode step, the unit a CUDA graph captures."""
    sample_step(state)
    forward_step(forward, state)


def param_fingerprint(model) -> tuple:
    """Where the model's tensors live: a captured graph reads these addresses, so any change (``.to()``, FSDP
    re-gathering, a PEFT merge that re-allocates, a dtype change) must invalidate it."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.device) for t in
                 [*model.parameters(), *model.buffers()])


class GraphCaptureError(RuntimeError):
    """The decode step could not be captured; the sampler then decodes eagerly."""


class CudaGraphRunner:
    """One ``torch.cuda.CUDAGraph`` of ``decode_step`` per batch width, all in one memory pool."""

    def __init__(self):
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.side = None  # one warm-up stream for all widths (each new stream gets its own cuBLAS workspace)

    def step(self, width: int, fn) -> None:
        graph = self.graphs.get(width)
        if graph is not None:
            graph.replay()
            return
        # The real step at a new width runs eagerly first, on a side stream as the capture API asks: Triton compiles,
        # cuBLAS workspaces and lazy allocations happen outside the capture. Capturing then records without running.
        self.side = self.side or torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            fn()
        torch.cuda.current_stream().wait_stream(self.side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                fn()
        except RuntimeError as err:  # e.g. a host sync inside the model's forward
            raise GraphCaptureError(f"capturing the decode step at width {width} failed: {err}") from err
        self.pool = graph.pool()
        self.graphs[width] = graph


class HostView:
    """The host's copy of what it needs at a check: done flags, lengths and the new token columns. On CUDA the copies
    go to pinned memory asynchronously and one event waits for them (the check's only sync)."""

    def __init__(self, state: DecodeState):
        self.pinned = state.out_ids.is_cuda

    def fetch(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if not self.pinned:
            return [t.clone() for t in tensors]
        outs = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for o, t in zip(outs, tensors):
            o.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        event.synchronize()
        return outs


def run_decode(forward, cache, state: DecodeState, *, check_every: int, bucketed: bool,
               runner: CudaGraphRunner | None, stop_scan=None) -> dict[int, int]:
    """Decodes up to ``state.max_new_tokens`` tokens. Every ``check_every`` steps (and at the end) the host reads the
    done flags, lengths and the new token columns, lets ``stop_scan(tokens [N, k] host, first column, lengths)``
    report rows whose stop string completed (``{row: length}``), exits when no row is live, and compacts: to the
    live count exactly, or with ``bucketed`` to the smallest bucket that holds it, and only when that is narrower
    than the batch (finished slots fill the rest). Returns ``{row: length}`` for the rows ended by a stop string."""
    length = state.max_new_tokens
    sizes = sorted(bucket_sizes(state.full))
    host = HostView(state)
    stops: dict[int, int] = {}
    lo = 0
    for t in range(length):
        if t == length - 1:
            sample_step(state)  # the last token is not forwarded
        elif runner is not None:
            runner.step(state.n, lambda: decode_step(forward, state))
        else:
            decode_step(forward, state)
        if (t + 1) % check_every and t + 1 < length:
            continue
        want = [state.done, state.lengths] + ([state.out_ids[:, lo:t + 1]] if stop_scan is not None else [])
        fetched = host.fetch(*want)
        done = fetched[0].tolist()
        if stop_scan is not None:
            found = stop_scan(fetched[2], lo, fetched[1], stops)
            stops.update(found)
            slot = {r: i for i, r in enumerate(state.row_ids_host)}
            newly = [slot[r] for r in found if r in slot and not done[slot[r]]]
            if newly:
                state.done.index_fill_(0, torch.tensor(newly, device=state.step.device), True)
                for i in newly:
                    done[i] = True
        lo = t + 1
        live = [i for i, d in enumerate(done) if not d]
        if not live or t + 1 == length:
            break
        target = next(s for s in sizes if s >= len(live)) if bucketed else len(live)
        if target < state.n:
            dead = [i for i, d in enumerate(done) if d][: target - len(live)]
            state.compact(sorted(live + dead), cache.layers, t + 1, bucketed)
    return stops
