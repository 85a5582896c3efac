"""Benchmark of the GRPO loss op (forward + backward w.r.t. logp) against plain PyTorch, on N × L shapes.

Variants, timed in the same run on the same inputs (fp32 log-probs, int64 mask as TRL's completion_mask, off-policy
old log-probs, β = 0.04 so the reference log-probs are read, an entropy tensor for the metric):
  ref      grpo_loss_ref: eager PyTorch with TRL's math (what TRL's _compute_loss does, without the trainer)
  ours     grpo_fast.kernels.grpo_loss.grpo_loss: two Triton kernels on CUDA; on the CPU it dispatches to the same
           PyTorch math as ``ref`` (so CPU numbers only show the overhead of dispatch, not a kernel)
  liger    Liger-Kernel's Triton GRPO loss, when ``liger_kernel`` is importable (it is not a dependency; skipped with a
           note otherwise). Liger's op takes [B, L+1, V] logits, so it is not a like-for-like comparison anyway.
Each timing is the median of ``--repeats`` forward+backward calls after ``--warmup`` untimed ones. On CUDA the
report adds achieved bandwidth: bytes the op must move (forward reads logp, old, ref, mask, entropy; backward
reads logp, old, ref, mask and writes d logp; per-row buffers ignored) / time, and its fraction of the device's
peak HBM bandwidth (a table of known parts; unknown devices get none).
Simplifications: one loss configuration (dapo, token level); timings on a shared machine are noisy.

    python benchmarks/bench_grpo_loss.py            # CPU: 64×1024, 256×2048; CUDA: also 1024×4096
    python benchmarks/bench_grpo_loss.py --quick    # one small shape, for a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import torch

from grpo_fast.kernels.grpo_loss import grpo_loss, grpo_loss_ref
from common import git_commit, peak_bandwidth, write_report

VARIANTS = {"ref": grpo_loss_ref, "ours": grpo_loss}
LOSS = dict(loss_type="dapo", beta=0.04)
def inputs(N, L, device, seed=0):
    """logp, old, ref ``[N, L]``, advantages ``[N]``, int64 mask ``[N, L]`` and entropy ``[N, L]``."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, L, generator=g) * 3
    old = logp + torch.randn(N, L, generator=g) * 0.1
    ref = logp + torch.randn(N, L, generator=g) * 0.1
    adv = torch.randn(N, generator=g)
    lengths = torch.randint(1, L + 1, (N,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ent = torch.rand(N, L, generator=g) * 4
    return [t.to(device) for t in (logp, old, ref, adv, mask, ent)]


def _time(fns: dict, logp, args, warmup, repeats, device) -> dict[str, list[float]]:
    """Forward+backward times of each variant; the variants alternate within each repeat, so machine noise
    (other processes, clock changes) hits them alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            x = logp.detach().clone().requires_grad_()
            sync()
            t0 = time.perf_counter()
            loss, _ = fn(x, *args)
            loss.backward()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def _bytes_moved(N, L, logp, mask):
    f, m = logp.element_size(), mask.element_size()
    forward = N * L * (4 * f + m)  # logp, old, ref, entropy, mask
    backward = N * L * (4 * f + m)  # logp, old, ref, mask read; d logp written
    return forward + backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--quick", action="store_true", help="one small shape (smoke run)")
    parser.add_argument("--shapes", default=None, help="comma-separated NxL list, e.g. 64x1024,256x2048")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    elif args.quick:
        shapes = [(16, 256)]
    else:
        shapes = [(64, 1024), (256, 2048)] + ([(1024, 4096)] if device == "cuda" else [])
    repeats = 5 if args.quick else args.repeats
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    peak = peak_bandwidth(name) if device == "cuda" else None
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    notes = []
    if not has_liger:
        notes.append("liger_kernel is not installed: the Liger variant was skipped")
    if device == "cpu":
        notes.append("CPU: 'ours' runs the same PyTorch math as 'ref' (no kernel on the CPU): any difference is noise")
    report = {"device": name, "torch": torch.__version__, "triton": triton_version,
              "commit": git_commit("kernels", "benchmarks"),
              "loss": "dapo, token level, beta=0.04, off-policy, fp32 logp, int64 mask", "warmup": args.warmup,
              "repeats": repeats, "peak_bandwidth_bytes_s": peak, "notes": notes, "results": []}
    print(f"device: {name}   torch {torch.__version__}   triton {triton_version}")
    header = f"{'N x L':>12} {'ref ms':>10} {'ours ms':>10} {'speed-up':>9}"
    if device == "cuda":
        header += f" {'ours GB/s':>10} {'% peak':>7}"
    print(header)
    for N, L in shapes:
        logp, old, ref, adv, mask, ent = inputs(N, L, device)
        rest = (old, ref, adv, mask)

        def with_entropy(fn):
            return lambda x, *a: fn(x, *a, entropy=ent, **LOSS)

        row = {"N": N, "L": L}
        for variant, times in _time({v: with_entropy(fn) for v, fn in VARIANTS.items()}, logp, rest, args.warmup,
                                    repeats, device).items():
            row[variant] = {"times_s": times, "median_s": statistics.median(times)}
        row["speedup_vs_ref"] = row["ref"]["median_s"] / row["ours"]["median_s"]
        line = f"{f'{N}x{L}':>12} {row['ref']['median_s'] * 1e3:>10.3f} {row['ours']['median_s'] * 1e3:>10.3f}"
        line += f" {row['speedup_vs_ref']:>8.2f}x"
        if device == "cuda":
            moved = _bytes_moved(N, L, logp, mask)
            gbs = moved / row["ours"]["median_s"]
            row["ours"]["bytes_moved"] = moved
            row["ours"]["achieved_bytes_s"] = gbs
            row["ours"]["fraction_of_peak"] = gbs / peak if peak else None
            line += f" {gbs / 1e9:>10.1f} {f'{100 * gbs / peak:.1f}%' if peak else 'n/a':>7}"
        print(line)
        report["results"].append(row)
    for note in notes:
        print("note:", note)
    write_report(report, "grpo_loss", device, args.quick, args.out)


if __name__ == "__main__":
    main()
