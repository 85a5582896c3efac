"""Benchmark of the decode attention op ``prefix_decode_attention`` against PyTorch SDPA over an expanded KV cache.

One decode step (S = 1 query per row) of N = B·G rows, each row's prompt P tokens long and Ls tokens sampled so far.
Variants, on the same queries and keys/values:
  sdpa_expanded  F.scaled_dot_product_attention over a cache that holds every row's own copy of its prompt,
                 ``[N, Hkv, P + Ls, Dh]`` (what ``generate`` keeps), with enable_gqa and no mask: the strongest
                 plain-PyTorch baseline. Building the copy is not timed (a padded cache holds it already).
  ours           grpo_fast.kernels.prefix_attention.prefix_decode_attention over the prompt's K/V once per group
                 ``[B, Hkv, P, Dh]`` plus per-row suffixes ``[N, Hkv, Ls, Dh]``: Triton on CUDA, its PyTorch path
                 (one matmul per (prompt, kv head), one softmax) on the CPU.
Before timing, ours must match the baseline (max abs difference ≤ 1e-4 in fp32, 2e-2 in bf16/fp16), else it is not
timed. Each repeat runs ``--inner`` calls back to back (synchronized once on CUDA); variants alternate within each
repeat; medians after ``--warmup`` repeats. The table gives the KV bytes each variant reads and, on CUDA, the
achieved bandwidth over those bytes and its fraction of the device's peak.
Simplifications: every prompt exactly P tokens (so the baseline needs no mask), every row at the same step.
Heads are SmolLM2-135M's (H = 9, Hkv = 3, Dh = 64).

    python benchmarks/bench_prefix_attention.py          # CPU: G = 8, B = 4, P in {256, 1024}; CUDA adds larger
    python benchmarks/bench_prefix_attention.py --quick  # one small shape
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics

import torch
import torch.nn.functional as F
from common import git_commit, interleaved_times, load_average, peak_bandwidth, versions, write_report

VARIANTS = ("sdpa_expanded", "ours")
HEADS = (9, 3, 64)  # H, Hkv, Dh


def inputs(B: int, G: int, P: int, Ls: int, dtype: torch.dtype, device: str, heads=HEADS, seed: int = 0) -> dict:
    """q ``[N, H, 1, Dh]``, prompt K/V ``[B, Hkv, P, Dh]``, suffix K/V ``[N, Hkv, Ls, Dh]`` and the expanded cache
    ``[N, Hkv, P + Ls, Dh]`` holding the same keys/values."""
    H, Hkv, Dh = heads
    N = B * G
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x = {"q": rnd(N, H, 1, Dh), "prefix_k": rnd(B, Hkv, P, Dh), "prefix_v": rnd(B, Hkv, P, Dh),
         "suffix_k": rnd(N, Hkv, Ls, Dh), "suffix_v": rnd(N, Hkv, Ls, Dh), "group_size": G, "suffix_lens": Ls,
         "prefix_lens": torch.full((B,), P, dtype=torch.long, device=device)}
    x["k"] = torch.cat([x["prefix_k"].repeat_interleave(G, 0), x["suffix_k"]], 2)  # [N, Hkv, P + Ls, Dh]
    x["v"] = torch.cat([x["prefix_v"].repeat_interleave(G, 0), x["suffix_v"]], 2)
    return x


def make_fn(variant: str):
    """``fn(inputs) -> out [N, H, 1, Dh]`` of one variant."""
    if variant == "sdpa_expanded":
        return lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], enable_gqa=True)
    if variant == "ours":
        from grpo_fast.kernels.prefix_attention import prefix_decode_attention

        return lambda x: prefix_decode_attention(x["q"], x["prefix_k"], x["prefix_v"], x["prefix_lens"],
                                                 x["suffix_k"], x["suffix_v"], x["suffix_lens"], x["group_size"])
    raise ValueError(variant)


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def kv_bytes(variant: str, B: int, G: int, P: int, Ls: int, dtype: torch.dtype, heads=HEADS) -> int:
    """Key and value bytes one call must read: each prompt once per group (ours) or once per row (baseline)."""
    _, Hkv, Dh = heads
    tokens = B * P + B * G * Ls if variant == "ours" else B * G * (P + Ls)
    return 2 * tokens * Hkv * Dh * torch.empty((), dtype=dtype).element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--quick", action="store_true", help="one small shape (B=2, G=4, P=128, Ls=16)")
    ap.add_argument("--shapes", default=None, help="comma-separated BxGxPxLs list, e.g. 4x8x1024x64")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) / bfloat16 (CUDA default)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--inner", type=int, default=10, help="calls per timed repeat")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 gives "
                    "steadier numbers on a machine shared with other jobs")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    elif args.quick:
        shapes = [(2, 4, 128, 16)]
    else:
        shapes = [(4, 8, 256, 64), (4, 8, 1024, 64)]
        shapes += [(16, 16, 1024, 128), (16, 16, 4096, 128)] if device == "cuda" else []
    repeats = 5 if args.quick else args.repeats
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    peak = peak_bandwidth(name) if device == "cuda" else None
    report = {"device": name, **versions(), "commit": git_commit("kernels", "benchmarks"), "dtype": str(dtype),
              "heads": dict(zip(("H", "Hkv", "Dh"), HEADS)), "warmup": args.warmup, "repeats": repeats,
              "inner": args.inner, "threads": torch.get_num_threads(), "peak_bandwidth_bytes_s": peak,
              "load_before": load_average(), "results": []}
    print(f"{name}  torch {torch.__version__}  triton {report['triton']}  dtype {dtype}  H, Hkv, Dh = {HEADS}")
    print(f"load before: {report['load_before']}")
    print(f"{'B x G x P x Ls':>16} {'variant':>13} {'median us':>10} {'KV MiB':>8} {'speed-up':>9} {'max diff':>9}"
          + (f" {'GB/s':>7} {'% peak':>7}" if device == "cuda" else ""))
    fns = {v: make_fn(v) for v in VARIANTS}
    for B, G, P, Ls in shapes:
        x = inputs(B, G, P, Ls, dtype, device)
        with torch.no_grad():
            diff = (fns["ours"](x).float() - fns["sdpa_expanded"](x).float()).abs().max().item()
        ok = diff <= tolerance(dtype)
        calls = {v: functools.partial(fn, x) for v, fn in fns.items() if ok or v == "sdpa_expanded"}
        timed = interleaved_times(calls, args.warmup, repeats, args.inner, device, context=lambda v: torch.no_grad())
        row = {"B": B, "G": G, "P": P, "Ls": Ls, "max_abs_diff": diff, "variants": {}}
        for v in VARIANTS:
            r = row["variants"][v] = {"kv_bytes": kv_bytes(v, B, G, P, Ls, dtype)}
            if v not in timed:
                r["skipped"] = f"output differs from the baseline by {diff:.2e} > {tolerance(dtype):.0e}"
                print(f"{f'{B}x{G}x{P}x{Ls}':>16} {v:>13} {'-':>10}  skipped: {r['skipped']}")
                continue
            r.update(times_s=timed[v], median_s=statistics.median(timed[v]))
            r["speedup_vs_sdpa_expanded"] = row["variants"]["sdpa_expanded"]["median_s"] / r["median_s"]
            line = (f"{f'{B}x{G}x{P}x{Ls}':>16} {v:>13} {r['median_s'] * 1e6:>10.1f} {r['kv_bytes'] / 2**20:>8.1f} "
                    f"{r['speedup_vs_sdpa_expanded']:>8.2f}x {diff if v == 'ours' else 0.0:>9.1e}")
            if device == "cuda":
                r["achieved_bytes_s"] = r["kv_bytes"] / r["median_s"]
                r["fraction_of_peak"] = r["achieved_bytes_s"] / peak if peak else None
                pct = f"{100 * r['fraction_of_peak']:.1f}%" if peak else "n/a"
                line += f" {r['achieved_bytes_s'] / 1e9:>7.0f} {pct:>7}"
            print(line)
        report["results"].append(row)
    report["load_after"] = load_average()
    write_report(report, "prefix_attention", device, args.quick, args.out)


if __name__ == "__main__":
    main()
