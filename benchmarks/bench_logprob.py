"""Benchmark of the fused LM-head log-prob op (forward + backward) against the plain PyTorch path.

For each T it times forward+backward (median of repeats after one warm-up) and measures peak extra memory for:
  naive    logits = h @ W.T; log_softmax; gather; backward (holds several [T, V] tensors)
  ours     grpo_fast.kernels.logprob.linear_logprobs (chunked torch path on CPU, Triton on CUDA)
  compile  torch.compile of the naive function (not chunked; skipped with a note when compilation fails)
  compile_chunked  the compiled naive function over 1024-row chunks under activation checkpointing (the usual
           "chunk it in PyTorch" answer: recomputes each chunk's logits in the backward)
  liger    Liger's fused linear cross-entropy, only when liger_kernel is importable
With ``--op grpo`` it benchmarks the LM head + GRPO loss (dapo, β = 0.04, token-level IS, off-policy old log-probs,
rows of L = 256 fully masked in) instead:
  naive_grpo    logits = h @ W.T; log_softmax; gather; grpo_loss_ref; backward
  chained_grpo  linear_logprobs → grpo_loss (the fallback path of linear_grpo_loss: 4 GEMMs)
  fused_grpo    grpo_fast.kernels.linear_grpo_loss.linear_grpo_loss (its one-pass 3-GEMM path)
Memory: each variant in a fresh subprocess, so one variant's allocator state cannot flatter or hurt another's.
Time: all variants in one subprocess with their repeats interleaved, so a shared machine's drifting load biases
none of them in particular.
Memory: after one warm-up call, on the CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs after
malloc_trim) of one forward+backward minus the RSS before it — the gradients of hidden and weight are included,
for every variant alike; on CUDA, max_memory_allocated minus the allocation before the call.
Simplifications: loss = logp.sum() (upstream gradient of ones), no bias, no entropy. On a shared machine CPU
times are noisy; the JSON keeps every repeat.

    python benchmarks/bench_logprob.py            # CPU: T in {1024, 4096}; CUDA: T in {1024, 4096, 16384}
    python benchmarks/bench_logprob.py --quick    # a small shape, for a smoke run
    python benchmarks/bench_logprob.py --op grpo  # the fused LM head + GRPO loss
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import git_commit, load_average, proc_status_bytes, reset_cpu_peak

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("naive", "ours", "compile", "compile_chunked", "liger")
GRPO_VARIANTS = ("naive_grpo", "chained_grpo", "fused_grpo")
GRPO_L = 256  # completion length of the --op grpo problem: N = T / 256 rows
CHUNK_ROWS = 1024  # rows per checkpointed chunk of the compile_chunked variant


def _grpo_inputs(t: torch.Tensor):
    """old/ref log-probs, advantages and mask of the --op grpo problem, for targets t [T]."""
    T = t.shape[0]
    N, L = max(1, T // GRPO_L), min(T, GRPO_L)
    gen = torch.Generator(device="cpu").manual_seed(1)
    old = (-torch.rand(N, L, generator=gen) * 12 - 5).to(t.device)  # near log(1/V) for V = 49152
    ref = old + 0.1 * torch.randn(N, L, generator=gen).to(t.device)
    adv = torch.randn(N, generator=gen).to(t.device)
    mask = torch.ones(N, L, device=t.device)
    return (N, L), old, ref, adv, mask


def _make_grpo_fn(variant: str):
    from grpo_fast.kernels.grpo_loss import grpo_loss, grpo_loss_ref
    from grpo_fast.kernels.linear_grpo_loss import linear_grpo_loss
    from grpo_fast.kernels.logprob import linear_logprobs

    kw = dict(loss_type="dapo", beta=0.04)

    def naive_grpo(h, w, t):
        shape, old, ref, adv, mask = _grpo_inputs(t)
        logits = h @ w.t()  # [T, V]
        logp = logits.float().log_softmax(-1).gather(1, t[:, None]).view(shape)
        return grpo_loss_ref(logp, old, ref, adv, mask, **kw)[0]

    def chained_grpo(h, w, t):
        shape, old, ref, adv, mask = _grpo_inputs(t)
        logp, ent = linear_logprobs(h, w, t, return_entropy=True)
        return grpo_loss(logp.view(shape), old, ref, adv, mask, entropy=ent.detach().view(shape), **kw)[0]

    def fused_grpo(h, w, t):
        shape, old, ref, adv, mask = _grpo_inputs(t)
        return linear_grpo_loss(h, w, t, old, ref, adv, mask, completion_shape=shape, **kw)[0]

    return {"naive_grpo": naive_grpo, "chained_grpo": chained_grpo, "fused_grpo": fused_grpo}[variant]


def _make_fn(variant: str):
    if variant in GRPO_VARIANTS:
        return _make_grpo_fn(variant)
    if variant == "ours":
        from grpo_fast.kernels.logprob import linear_logprobs

        return lambda h, w, t: linear_logprobs(h, w, t)

    def naive(h, w, t):
        logits = h @ w.t()  # [T, V]
        return logits.float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)

    if variant == "naive":
        return naive
    if variant == "compile":
        return torch.compile(naive)
    if variant == "compile_chunked":
        from torch.utils.checkpoint import checkpoint

        compiled = torch.compile(naive)

        def chunked(h, w, t):
            parts = [
                checkpoint(compiled, h[i : i + CHUNK_ROWS], w, t[i : i + CHUNK_ROWS], use_reentrant=False)
                for i in range(0, h.shape[0], CHUNK_ROWS)
            ]
            return torch.cat(parts)

        return chunked
    if variant == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none")
    raise ValueError(variant)


def _inputs(T, D, V, dtype_name, device):
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(T, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(V, D, generator=gen) * D**-0.5).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, V, (T,), generator=gen).to(device)
    return h, w, t


def _stepper(fn, h, w, t, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        h.grad = w.grad = None
        fn(h, w, t).sum().backward()
        sync()

    return step


def memory_worker(variant: str, T: int, D: int, V: int, dtype_name: str, device: str) -> dict:
    """Own process per variant: peak extra memory of one forward+backward, after a warm-up call."""
    h, w, t = _inputs(T, D, V, dtype_name, device)
    step = _stepper(_make_fn(variant), h, w, t, device)
    step()  # warm-up: library initialisation, first-touch page faults, compilation
    h.grad = w.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = reset_cpu_peak()
        step()
        peak = proc_status_bytes("VmHWM") - base
    grads = (h.numel() + w.numel()) * h.element_size()
    return {"peak_extra_bytes": peak, "peak_extra_beyond_grads_bytes": peak - grads}


def time_worker(variants: list[str], T: int, D: int, V: int, dtype_name: str, repeats: int, device: str) -> dict:
    """One process for all variants, repeats interleaved (a, b, c, a, b, c, ...) so that the load of a shared
    machine drifting over time biases no variant in particular."""
    h, w, t = _inputs(T, D, V, dtype_name, device)
    steps, times, failed = {}, {}, {}
    for v in variants:
        try:
            steps[v] = _stepper(_make_fn(v), h, w, t, device)
            steps[v]()  # warm-up
            times[v] = []
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            failed[v] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            steps.pop(v, None)
    for _ in range(repeats):
        for v, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[v].append(time.perf_counter() - t0)
    out = {v: {"times_s": ts, "median_s": statistics.median(ts)} for v, ts in times.items()}
    out.update({v: {"skipped": why} for v, why in failed.items()})
    if device == "cuda":
        out["gemm4_s"] = _gemm4_time(h.detach(), w.detach(), repeats)
    return out


def _gemm4_time(h, w, repeats):
    """The 4 GEMMs a recomputing fused head cannot avoid: logits, recomputed logits, d_hidden, d_weight."""
    z = h @ w.t()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        h @ w.t()
        h @ w.t()
        z @ w
        z.t() @ h
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _subprocess(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"failed: {last[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(variants, T, D, V, dtype, repeats, device) -> tuple[dict, float | None]:
    rows = {}
    for v in variants:
        if v == "liger" and importlib.util.find_spec("liger_kernel") is None:
            rows[v] = {"skipped": "liger_kernel is not installed"}
            continue
        rows[v] = _subprocess(["--memory-worker", v, str(T), str(D), str(V), dtype, device])
    runnable = [v for v in variants if "skipped" not in rows[v]]
    timed = _subprocess(["--time-worker", ",".join(runnable), str(T), str(D), str(V), dtype, str(repeats), device])
    if "skipped" in timed:
        timed = {v: timed for v in runnable}
    gemm4 = timed.pop("gemm4_s", None)
    for v in runnable:
        rows[v].update(timed[v])
    return rows, gemm4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--quick", action="store_true", help="one small shape (T=256, V=8192)")
    ap.add_argument("--tokens", type=int, nargs="*", help="values of T (default: CPU 1024 4096, CUDA +16384)")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) / bfloat16 (CUDA default) / float16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--op", choices=("logprob", "grpo"), default="logprob", help="grpo: LM head + GRPO loss")
    ap.add_argument("--variants", nargs="*", default=None, choices=VARIANTS + GRPO_VARIANTS)
    ap.add_argument("--memory-worker", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--time-worker", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        v, T, D, V, dt, dev = args.memory_worker
        print(json.dumps(memory_worker(v, int(T), int(D), int(V), dt, dev)))
        return
    if args.time_worker:
        vs, T, D, V, dt, reps, dev = args.time_worker
        print(json.dumps(time_worker(vs.split(","), int(T), int(D), int(V), dt, int(reps), dev)))
        return

    if args.variants is None:
        args.variants = list(GRPO_VARIANTS if args.op == "grpo" else VARIANTS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    tokens = args.tokens or ([1024, 4096, 16384] if device == "cuda" else [1024, 4096])
    D, V = args.hidden, args.vocab
    if args.quick:
        tokens, V = [256], 8192
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    report = {
        "device": name, "torch": torch.__version__, "triton": triton_version,
        "commit": git_commit("kernels", "benchmarks"),
        "op": args.op, "dtype": dtype, "D": D, "V": V, "repeats": args.repeats, "results": [],
        "load_before": load_average(),
        "memory_method": "CUDA max_memory_allocated delta" if device == "cuda" else
        "peak RSS (VmHWM) delta of one fwd+bwd after a warm-up, fresh subprocess per variant; includes the grads",
    }  # fmt: skip
    print(f"{name}  torch {torch.__version__}  triton {triton_version}  dtype {dtype}  D={D} V={V}  op {args.op}")
    print(f"load before: {report['load_before']}")
    print(f"{'T':>6} {'variant':>15} {'median s':>9} {'peak MiB':>9} {'time/naive':>10} {'mem/naive':>9}  note")
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "linear_grpo_loss" if args.op == "grpo" else "logprob"
    path = Path(args.out) if args.out else out_dir / f"{stem}_{device}{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for T in tokens:
        rows, gemm4 = _measure(args.variants, T, D, V, dtype, args.repeats, device)
        naive = rows.get("naive_grpo" if args.op == "grpo" else "naive", {})
        for v, r in rows.items():
            if "median_s" not in r:
                print(f"{T:>6} {v:>15} {'-':>9} {'-':>9} {'-':>10} {'-':>9}  skipped: {r.get('skipped')}")
                continue
            if "median_s" in naive:
                r["time_ratio_vs_naive"] = r["median_s"] / naive["median_s"]
                r["mem_ratio_vs_naive"] = r["peak_extra_bytes"] / max(naive["peak_extra_bytes"], 1)
                r["mem_beyond_grads_ratio_vs_naive"] = r["peak_extra_beyond_grads_bytes"] / max(
                    naive["peak_extra_beyond_grads_bytes"], 1
                )
            note = f"beyond grads {r['peak_extra_beyond_grads_bytes'] / 2**20:.1f} MiB"
            if device == "cuda":
                r["tflops"] = 6 * T * D * V / r["median_s"] / 1e12  # forward 2TDV + backward 4TDV
                note += f", {r['tflops']:.1f} TFLOP/s"
                if gemm4:
                    r["time_ratio_vs_gemm4"] = r["median_s"] / gemm4
                    note += f", {r['time_ratio_vs_gemm4']:.2f}x the 4 GEMMs"
            print(
                f"{T:>6} {v:>15} {r['median_s']:>9.4f} {r['peak_extra_bytes'] / 2**20:>9.1f} "
                f"{r.get('time_ratio_vs_naive', float('nan')):>10.3f} {r.get('mem_ratio_vs_naive', float('nan')):>9.3f}"
                f"  {note}"
            )
        report["results"].append({"T": T, "gemm4_s": gemm4, "variants": rows})
        path.write_text(json.dumps(report, indent=2))  # partial results survive a time limit
    report["load_after"] = load_average()
    print(f"load after: {report['load_after']}")
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
