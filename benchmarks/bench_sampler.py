"""Benchmark: SharedPrefixSampler vs ``model.generate(num_return_sequences=G, do_sample=True)`` on the same prompts.

Both produce exactly ``max_new_tokens`` tokens per row (``--ignore-eos``, always on: our sampler ignores EOS, HF gets
``min_new_tokens = max_new_tokens``), temperature 1, no truncation, so tokens/s compare the same work. Prefill is
timed by runs with one new token; decode = total − prefill. After a warm-up of each side the runs alternate
(ours, HF, ours, HF, ...) so load from other processes hits both sides alike; medians (and the best run) are
reported. On a shared machine prefer ``--threads 1``: two OpenMP threads stall on every op when cores are busy.
Memory: the KV bytes each side holds (from the shapes: ours B·P + N·L, HF N·(P + L) tokens), and on a GPU the
allocator's peak; on the CPU the growth of the process's peak RSS (a high-water mark; ours is measured first,
so it is indicative only).

Default: the embedded SmolLM2-135M-Instruct (``grpo_fast.models.load_default_model``), G = 8, four prompts of about
256 tokens, 64 new tokens, fp32. ``--random-init`` uses a randomly initialized Llama of SmolLM2-135M's shape
(same timing) when the model package is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import transformers

from grpo_fast.sampler import SharedPrefixSampler
from common import git_commit

_WORDS = ("the model samples several answers for every prompt and the trainer compares them within the group so "
          "that better answers are reinforced while worse ones are discouraged by the advantage").split()


def _prompts(tokenizer, n_prompts, length, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(n_prompts):
        target = length - 8 + 4 * i  # slightly different lengths, as real prompts
        if tokenizer is not None:
            words = [_WORDS[j] for j in torch.randint(len(_WORDS), (target * 2,), generator=gen).tolist()]
            ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:target]
        else:
            ids = torch.randint(10, vocab, (target,), generator=gen).tolist()
        prompts.append(ids)
    return prompts


def _load(args):
    if args.random_init:
        from grpo_fast.models import smollm2_config

        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(smollm2_config()).to(args.dtype), None
    from grpo_fast.models import load_default_model

    return load_default_model(dtype=args.dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hf_generate(model, prompts, g, new_tokens, pad, seed):
    width = max(map(len, prompts))
    device = model.device
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=g,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=1.0, top_p=1.0,
                          top_k=0, pad_token_id=pad)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ignore-eos", action="store_true", default=True, help="always on (fair comparison)")
    ap.add_argument("--random-init", action="store_true", help="random Llama of SmolLM2-135M's shape")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--skip-hf", action="store_true", help="time only our sampler")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sampler_<device>.json)")
    args = ap.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model, tokenizer = _load(args)
    model = model.to(device).eval()
    cfg = model.config
    prompts = _prompts(tokenizer, args.prompts, args.prompt_len, cfg.vocab_size, seed=0)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    g, new = args.group_size, args.new_tokens
    sampler = SharedPrefixSampler(model, tokenizer)
    n_rows = len(prompts) * g
    total_tokens = n_rows * new

    def ours(tokens):
        return sampler.generate(prompts, group_size=g, max_new_tokens=tokens, temperature=1.0, seed=0,
                                ignore_eos=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = ours(new)  # warm-up
    assert out.completion_ids.shape == (n_rows, new), out.completion_ids.shape
    ours_peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                 else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    sides = {"ours": (ours, [], [])}
    if not args.skip_hf:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _hf_generate(model, prompts, g, new, pad, 0)  # warm-up
        hf_peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                   else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
        sides["hf"] = (lambda tokens: _hf_generate(model, prompts, g, tokens, pad, 0), [], [])
    for rep in range(args.repeats):
        for name, (fn, prefills, totals) in sides.items():
            prefills.append(_time(lambda: fn(1), device, 1))
            totals.append(_time(lambda: fn(new), device, 1))
            print(f"  run {rep + 1}/{args.repeats} {name}: prefill {prefills[-1]:.2f}s total {totals[-1]:.2f}s",
                  flush=True)

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * args.dtype.itemsize
    p_max = max(map(len, prompts))
    med = statistics.median
    rows = [{"name": "ours (shared prefix)", "prefill_s": med(sides["ours"][1]), "total_s": med(sides["ours"][2]),
             "total_s_runs": sides["ours"][2], "kv_bytes": per_token * (len(prompts) * p_max + n_rows * new),
             "peak_bytes": ours_peak}]
    if "hf" in sides:
        rows.append({"name": "HF generate", "prefill_s": med(sides["hf"][1]), "total_s": med(sides["hf"][2]),
                     "total_s_runs": sides["hf"][2], "kv_bytes": per_token * n_rows * (p_max + new),
                     "peak_bytes": hf_peak})

    base = rows[-1]["total_s"]
    print(f"device={device} dtype={args.dtype} B={len(prompts)} G={g} P~{args.prompt_len} new={new} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} load(1/5/15 min)={os.getloadavg()}")
    print(f"{'':24s}{'prefill s':>10s}{'decode s':>10s}{'total s':>10s}{'best s':>9s}{'tok/s':>10s}{'speed-up':>10s}"
          f"{'KV MB':>9s}{'peak MB':>9s}")
    for r in rows:
        r["decode_s"] = r["total_s"] - r["prefill_s"]
        r["tokens_per_s"] = total_tokens / r["total_s"]
        r["speedup_vs_hf"] = base / r["total_s"]
        r["best_total_s"] = min(r["total_s_runs"])
        print(f"{r['name']:24s}{r['prefill_s']:10.3f}{r['decode_s']:10.3f}{r['total_s']:10.3f}{r['best_total_s']:9.3f}"
              f"{r['tokens_per_s']:10.1f}{r['speedup_vs_hf']:9.2f}x{r['kv_bytes'] / 2**20:9.1f}"
              f"{r['peak_bytes'] / 2**20:9.1f}")

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "commit": git_commit(), "model": "random-init SmolLM2-135M shape"
        if args.random_init else "SmolLM2-135M-Instruct", "dtype": str(args.dtype), "prompts": len(prompts),
        "prompt_lens": [len(p) for p in prompts], "group_size": g, "new_tokens": new, "repeats": args.repeats,
        "loadavg_after": os.getloadavg(),
        "rows": rows,
    }
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / f"sampler_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
