"""Benchmark: SharedPrefixSampler vs ``model.generate(num_return_sequences=G, do_sample=True)`` on the same prompts.

Both produce exactly ``max_new_tokens`` tokens per row (``--ignore-eos``, always on: our sampler ignores EOS, HF gets
``min_new_tokens = max_new_tokens``), temperature 1, no truncation, so tokens/s compare the same work. Prefill is
timed by runs with one new token; decode = total − prefill. After a warm-up of each side the runs alternate
(ours, HF, ours, HF, ...) so load from other processes hits both sides alike; medians (and the best run) are
reported, with the ratio of process CPU time beside the wall-clock one (on a loaded machine CPU time is far
steadier; on a GPU it counts the host's work only). On a shared machine prefer ``--threads 1``: two OpenMP threads
stall on every op when cores are busy.
Memory: the KV bytes each side holds (from the shapes: ours B·P + N·L, HF N·(P + L) tokens), and on a GPU the
allocator's peak; on the CPU the growth of the process's peak RSS (a high-water mark; ours is measured first,
so it is indicative only).

Default: the embedded SmolLM2-135M-Instruct (``grpo_fast.models.load_default_model``), G = 8, four prompts of about
256 tokens, 64 new tokens, fp32. ``--random-init`` uses a randomly initialized Llama of SmolLM2-135M's shape
(same timing) when the model package is not installed; ``--config`` picks another real architecture, random-init
(qwen2.5-1.5b: D 1536, 28 layers, 12/2 heads, V 151936; llama3-8b: D 4096, 32 layers, 32/8 heads, V 128256).

Variants (``--variants``): ``ours`` (the sampler as configured: CUDA graphs on a GPU, the lean forward on a CPU),
``ours_eager`` (graphs off), ``ours_model_forward`` (graphs off, the model's own forward instead of the lean one),
``hf`` (``generate``, dynamic cache), ``hf_static`` (``generate`` with a static cache, which transformers compiles
with ``torch.compile`` on CUDA). On a GPU the table adds each sampler's decode step time against its floor: weight
bytes + each prompt's KV once + the suffix KV (mean length L/2), over the HBM bandwidth, or the FLOPs over the peak,
whichever is larger (``--hbm-tbs``, ``--peak-tflops``; defaults by device name, H100/H200 SXM bf16 dense).
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


def _config(name):
    from grpo_fast.models import smollm2_config

    if name == "smollm2":
        return smollm2_config()
    if name == "qwen2.5-1.5b":
        return transformers.Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                        tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                                        rms_norm_eps=1e-6, eos_token_id=151643, pad_token_id=151643)
    return transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                                    eos_token_id=128001, pad_token_id=128001, bos_token_id=128000)


def _load(args):
    if args.random_init or args.config != "smollm2":
        torch.manual_seed(0)
        with torch.device(args.device):  # an 8B model initializes in seconds on the GPU, minutes on the host
            model = transformers.AutoModelForCausalLM.from_config(_config(args.config), dtype=args.dtype)
        return model, None
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


def _hf_generate(model, prompts, g, new_tokens, pad, seed, static=False):
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
                          top_k=0, pad_token_id=pad, **({"cache_implementation": "static"} if static else {}))


_PEAKS = {"H200": (4.8, 989.0), "H100": (3.35, 989.0), "A100": (2.0, 312.0)}  # TB/s, dense bf16 TFLOP/s


def _floor_s(cfg, model, b, g, p, new, dtype, hbm_tbs, peak_tflops):
    """The decode step's lower bound (s): bytes read once over the bandwidth, or FLOPs over the peak."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype.itemsize
    n = b * g
    # Weights a step reads: every matrix once (the input embedding only when it doubles as the LM head).
    matmul_params = sum(t.numel() for name, t in model.named_parameters() if "embed" not in name or
                        cfg.tie_word_embeddings)
    bytes_ = matmul_params * dtype.itemsize + kv_token * (b * p + n * new / 2)
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * (p + new / 2)
    flops = n * (2 * matmul_params + attn)
    return max(bytes_ / (hbm_tbs * 1e12), flops / (peak_tflops * 1e12)), bytes_, flops


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
    ap.add_argument("--config", default="smollm2", choices=["smollm2", "qwen2.5-1.5b", "llama3-8b"],
                    help="architecture (random-init unless smollm2 without --random-init)")
    ap.add_argument("--variants", nargs="+", default=["ours", "hf"],
                    choices=["ours", "ours_eager", "ours_model_forward", "hf", "hf_static"])
    ap.add_argument("--check-every", type=int, default=None,
                    help="the sampler's host check interval K (default: the sampler's, 8 on CUDA, 1 on the CPU)")
    ap.add_argument("--hbm-tbs", type=float, default=None, help="HBM bandwidth for the floor (TB/s)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s for the floor")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--skip-hf", action="store_true", help="time only our sampler (drops hf, hf_static)")
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
    n_rows = len(prompts) * g
    total_tokens = n_rows * new
    variants = [v for v in args.variants if not (args.skip_hf and v.startswith("hf"))]
    if "hf_static" in variants and device.type != "cuda":
        variants.remove("hf_static")  # transformers compiles the static-cache decode only on CUDA
    samplers = {"ours": SharedPrefixSampler(model, tokenizer, check_every=args.check_every),
                "ours_eager": SharedPrefixSampler(model, tokenizer, cuda_graphs=False, check_every=args.check_every),
                "ours_model_forward": SharedPrefixSampler(model, tokenizer, cuda_graphs=False, lean=False,
                                                          check_every=args.check_every)}

    def make(name):
        if name.startswith("ours"):
            return lambda tokens: samplers[name].generate(prompts, group_size=g, max_new_tokens=tokens,
                                                          temperature=1.0, seed=0, ignore_eos=True)
        return lambda tokens: _hf_generate(model, prompts, g, tokens, pad, 0, static=name == "hf_static")

    sides, peaks = {}, {}
    for name in variants:
        fn = make(name)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        try:
            out = fn(new)  # warm-up (graph captures, compilation)
        except Exception as err:  # a baseline that cannot run here is reported, not fatal
            print(f"  {name}: failed ({type(err).__name__}: {err})"[:300], flush=True)
            continue
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f}s", flush=True)
        ids = out.completion_ids if hasattr(out, "completion_ids") else out[:, -new:]
        assert ids.shape == (n_rows, new), ids.shape
        peaks[name] = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                       else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
        sides[name] = (fn, [], [], [])
    for rep in range(args.repeats):
        for name, (fn, prefills, totals, cpus) in sides.items():
            prefills.append(_time(lambda: fn(1), device, 1))
            c0 = time.process_time()
            totals.append(_time(lambda: fn(new), device, 1))
            cpus.append(time.process_time() - c0)
            print(f"  run {rep + 1}/{args.repeats} {name}: prefill {prefills[-1]:.2f}s total {totals[-1]:.2f}s",
                  flush=True)

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * args.dtype.itemsize
    p_max = max(map(len, prompts))
    med = statistics.median
    labels = {"ours": "ours (shared prefix)", "ours_eager": "ours, no graphs", "hf": "HF generate",
              "hf_static": "HF static+compile"}
    floor = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        hbm, peak = next((v for k, v in _PEAKS.items() if k in name), (3.35, 989.0))
        floor = _floor_s(cfg, model, len(prompts), g, p_max, new, args.dtype, args.hbm_tbs or hbm,
                         args.peak_tflops or peak)
    rows = []
    for name, (_, prefills, totals, cpus) in sides.items():
        kv_tokens = len(prompts) * p_max + n_rows * new if name.startswith("ours") else n_rows * (p_max + new)
        rows.append({"name": labels[name], "variant": name, "prefill_s": med(prefills), "total_s": med(totals),
                     "total_s_runs": totals, "cpu_s": med(cpus), "cpu_s_runs": cpus,
                     "kv_bytes": per_token * kv_tokens, "peak_bytes": peaks[name]})
    base = next((r["total_s"] for r in rows if r["variant"] == "hf"), rows[-1]["total_s"])
    base_cpu = next((r["cpu_s"] for r in rows if r["variant"] == "hf"), rows[-1]["cpu_s"])
    print(f"device={device} dtype={args.dtype} config={args.config} B={len(prompts)} G={g} P~{args.prompt_len} "
          f"new={new} K={args.check_every} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"load(1/5/15 min)={os.getloadavg()}")
    print(f"{'':24s}{'prefill s':>10s}{'decode s':>10s}{'total s':>10s}{'best s':>9s}{'tok/s':>10s}{'vs HF':>8s}"
          f"{'CPU-time vs HF':>15s}{'KV MB':>9s}{'peak MB':>9s}{'step ms':>9s}{'floor':>7s}")
    for r in rows:
        r["decode_s"] = r["total_s"] - r["prefill_s"]
        r["tokens_per_s"] = total_tokens / r["total_s"]
        r["speedup_vs_hf"] = base / r["total_s"]
        r["cpu_time_speedup_vs_hf"] = base_cpu / r["cpu_s"]  # process CPU time: steadier on a shared machine
        r["best_total_s"] = min(r["total_s_runs"])
        r["step_ms"] = 1e3 * r["decode_s"] / max(new - 1, 1)
        frac = ""
        if floor is not None:
            r["floor_ms"], r["floor_bytes"], r["floor_flops"] = 1e3 * floor[0], floor[1], floor[2]
            r["fraction_of_floor"] = r["floor_ms"] / r["step_ms"] if r["step_ms"] > 0 else None
            frac = f"{r['fraction_of_floor']:7.2f}" if r["fraction_of_floor"] else ""
        print(f"{r['name']:24s}{r['prefill_s']:10.3f}{r['decode_s']:10.3f}{r['total_s']:10.3f}{r['best_total_s']:9.3f}"
              f"{r['tokens_per_s']:10.1f}{r['speedup_vs_hf']:7.2f}x{r['cpu_time_speedup_vs_hf']:14.2f}x"
              f"{r['kv_bytes'] / 2**20:9.1f}"
              f"{r['peak_bytes'] / 2**20:9.1f}{r['step_ms']:9.2f}{frac}")

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "commit": git_commit(),
        "model": f"random-init {args.config} shape" if args.random_init or args.config != "smollm2"
        else "SmolLM2-135M-Instruct", "check_every": args.check_every, "dtype": str(args.dtype),
        "prompts": len(prompts),
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
