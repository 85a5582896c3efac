"""Benchmark of ``group_advantages``: does its Triton kernel pay for itself against the op's PyTorch path?

Variants, on the same rewards ``[N, R]`` (groups of G, ~5% of the entries NaN = unscored when R > 1), same options:
  ref     group_advantages_ref(dtype=float32): the plain PyTorch formulation (nanmean / nanstd over [B, G] views,
          what TRL's trainer computes inline)
  torch   group_advantages under GRPO_FAST_BACKEND=torch: the op's PyTorch path (fp32, shifted two-pass stats,
          per-group partials merged on the device; what CPU tensors always run)
  triton  group_advantages under GRPO_FAST_BACKEND=triton: one Triton program per group, then the same merge.
          CUDA only: on the CPU the op never runs the kernel (only the interpreter could, which is no speed), so
          the variant is skipped there with a note.
Before timing, every variant's advantages are compared with group_advantages_ref in float64 (max abs error ≤ 1e-3);
a variant that fails is not timed and no ratio is reported for it.
Time: each repeat runs ``--inner`` calls back to back (synchronized once on CUDA) and records the time per call;
variants alternate within each repeat so a shared machine's load hits them alike; medians after ``--warmup``
repeats. Simplifications: one option set per run (``--scale``, ``--aggregation``); the op's stats are computed but
not read (reading them costs a host sync, the same for every variant).

    python benchmarks/bench_advantages.py            # N in {1024, 4096, 16384}, R in {1, 4}, G = 8
    python benchmarks/bench_advantages.py --quick    # N = 1024 only
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics

import torch
from common import git_commit, interleaved_times, load_average, versions, write_report

VARIANTS = ("ref", "torch", "triton")


def rewards(N: int, R: int, device: str, seed: int = 0) -> torch.Tensor:
    """``[N, R]`` fp32 rewards in [0, 1); with R > 1 about 5% are NaN (a reward function that returned None)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, R, generator=g)
    if R > 1:
        x[torch.rand(N, R, generator=g) < 0.05] = torch.nan
    return x.to(device)


@contextlib.contextmanager
def forced_backend(name: str | None):
    """``GRPO_FAST_BACKEND=name`` inside the block (the op reads it on every call); ``None`` leaves it alone."""
    old = os.environ.get("GRPO_FAST_BACKEND")
    if name is not None:
        os.environ["GRPO_FAST_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GRPO_FAST_BACKEND", None)
        else:
            os.environ["GRPO_FAST_BACKEND"] = old


def make_fn(variant: str, group_size: int, scale: str = "group", aggregation: str = "sum_then_normalize"):
    """``(fn(rewards [N, R]) -> advantages [N], backend to force or None)`` of one variant."""
    from grpo_fast.kernels.advantages import group_advantages, group_advantages_ref

    if variant == "ref":
        return (lambda x: group_advantages_ref(x, group_size, None, scale, aggregation, dtype=torch.float32)[0]), None
    if variant in ("torch", "triton"):
        return (lambda x: group_advantages(x, group_size, None, scale, aggregation)[0]), variant
    raise ValueError(variant)


def unavailable(variant: str, device: str) -> str | None:
    """Why ``variant`` cannot be timed on ``device``, or None."""
    if variant == "triton" and device != "cuda":
        return "the Triton kernel runs on CUDA only (on the CPU the op dispatches to its PyTorch path)"
    if variant == "triton":
        from grpo_fast.kernels._backend import triton_available

        if not triton_available():
            return "triton is not installed"
    return None


def max_error(fn, backend, x, group_size, scale, aggregation) -> float:
    """Max abs difference of ``fn``'s advantages from the float64 reference."""
    from grpo_fast.kernels.advantages import group_advantages_ref

    with forced_backend(backend):
        adv = fn(x)
    ref = group_advantages_ref(x, group_size, None, scale, aggregation)[0]
    return (adv.double() - ref.to(adv.device)).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--quick", action="store_true", help="N = 1024 only, fewer repeats")
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 4096, 16384], help="values of N")
    ap.add_argument("--num-rewards", type=int, nargs="*", default=[1, 4], help="values of R")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--scale", choices=("group", "batch", "none"), default="group")
    ap.add_argument("--aggregation", choices=("sum_then_normalize", "normalize_then_sum"),
                    default="sum_then_normalize")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--inner", type=int, default=20, help="calls per timed repeat")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 gives "
                    "steadier numbers on a machine shared with other jobs")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = [1024] if args.quick else args.sizes
    repeats = 5 if args.quick else args.repeats
    G = args.group_size
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    notes = {v: why for v in args.variants if (why := unavailable(v, device))}
    report = {"device": name, **versions(), "commit": git_commit("kernels", "benchmarks"), "G": G,
              "scale": args.scale, "aggregation": args.aggregation, "warmup": args.warmup, "repeats": repeats,
              "inner": args.inner, "threads": torch.get_num_threads(), "load_before": load_average(),
              "skipped": notes, "results": []}
    print(f"{name}  torch {torch.__version__}  triton {report['triton']}  G={G}  scale={args.scale}  "
          f"{args.aggregation}")
    print(f"load before: {report['load_before']}")
    print(f"{'N':>6} {'R':>2} {'variant':>7} {'median us':>10} {'max err':>9} {'time/torch':>10} {'time/ref':>9}")
    for N in sizes:
        for R in args.num_rewards:
            x = rewards(N, R, device)
            fns, row = {}, {"N": N, "R": R, "variants": {}}
            for v in args.variants:
                if v in notes:
                    continue
                fn, backend = make_fn(v, G, args.scale, args.aggregation)
                err = max_error(fn, backend, x, G, args.scale, args.aggregation)
                row["variants"][v] = {"max_abs_err_vs_fp64": err}
                if err <= 1e-3:
                    fns[v] = (fn, backend)
                else:
                    row["variants"][v]["skipped"] = f"wrong result: max abs error {err:.2e} > 1e-3"
            calls = {v: functools.partial(fn, x) for v, (fn, _) in fns.items()}
            times = interleaved_times(calls, args.warmup, repeats, args.inner, device,
                                      context=lambda v: forced_backend(fns[v][1]))
            for v, ts in times.items():
                row["variants"][v].update(times_s=ts, median_s=statistics.median(ts))
            for v, r in row["variants"].items():
                for base in ("torch", "ref"):
                    if "median_s" in r and "median_s" in row["variants"].get(base, {}):
                        r[f"time_ratio_vs_{base}"] = r["median_s"] / row["variants"][base]["median_s"]
                med = f"{r['median_s'] * 1e6:>10.1f}" if "median_s" in r else f"{'-':>10}"
                print(f"{N:>6} {R:>2} {v:>7} {med} {r['max_abs_err_vs_fp64']:>9.1e} "
                      f"{r.get('time_ratio_vs_torch', float('nan')):>10.3f} "
                      f"{r.get('time_ratio_vs_ref', float('nan')):>9.3f}  {r.get('skipped', '')}")
            report["results"].append(row)
    for v, why in notes.items():
        print(f"note: {v} skipped: {why}")
    report["load_after"] = load_average()
    write_report(report, "advantages", device, args.quick, args.out)


if __name__ == "__main__":
    main()
