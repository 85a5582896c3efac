"""The harness of the two LM-head benchmarks (bench_logprob.py, bench_linear_grpo_loss.py): inputs, the memory and
time workers, and the table. A benchmark script gives its variants as ``make_fn(variant) -> fn(h, w, t)`` and calls
``main``; the workers re-run that same script in subprocesses.

Memory: each variant in a fresh subprocess, so one variant's allocator state cannot flatter or hurt another's;
after one warm-up call, on the CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim) of
one forward+backward minus the RSS before it — the gradients of hidden and weight are included, for every variant
alike; on CUDA, max_memory_allocated minus the allocation before the call.
Time: all variants in one subprocess with their repeats interleaved, so a shared machine's drifting load biases
none of them in particular; the median after one warm-up call. On a shared machine CPU times are noisy; the JSON
keeps every repeat.
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
from collections.abc import Callable
from pathlib import Path

import torch
from common import git_commit, load_average, proc_status_bytes, reset_cpu_peak, versions

ROOT = Path(__file__).resolve().parent.parent
MakeFn = Callable[[str], Callable]


def inputs(T: int, D: int, V: int, dtype_name: str, device: str):
    """hidden ``[T, D]`` and head weight ``[V, D]`` (both requiring grad), targets ``[T]``."""
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(T, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(V, D, generator=gen) * D**-0.5).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, V, (T,), generator=gen).to(device)
    return h, w, t


def stepper(fn, h, w, t, device):
    """One forward + backward of ``fn(h, w, t).sum()``, synchronized on CUDA."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        h.grad = w.grad = None
        fn(h, w, t).sum().backward()
        sync()

    return step


def _memory_worker(make_fn: MakeFn, variant: str, T: int, D: int, V: int, dtype_name: str, device: str) -> dict:
    """Own process per variant: peak extra memory of one forward+backward, after a warm-up call."""
    h, w, t = inputs(T, D, V, dtype_name, device)
    step = stepper(make_fn(variant), h, w, t, device)
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


def _time_worker(make_fn: MakeFn, variants: list[str], T: int, D: int, V: int, dtype_name: str, repeats: int,
                 device: str) -> dict:
    """One process for all variants, repeats interleaved (a, b, c, a, b, c, ...)."""
    h, w, t = inputs(T, D, V, dtype_name, device)
    steps, times, failed = {}, {}, {}
    for v in variants:
        try:
            steps[v] = stepper(make_fn(v), h, w, t, device)
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


def _subprocess(script: str, args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"failed: {last[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(script, variants, needs, T, D, V, dtype, repeats, device) -> tuple[dict, float | None]:
    rows = {}
    for v in variants:
        if v in needs and importlib.util.find_spec(needs[v]) is None:
            rows[v] = {"skipped": f"{needs[v]} is not installed"}
            continue
        rows[v] = _subprocess(script, ["--memory-worker", v, str(T), str(D), str(V), dtype, device])
    runnable = [v for v in variants if "skipped" not in rows[v]]
    timed = _subprocess(script, ["--time-worker", ",".join(runnable), str(T), str(D), str(V), dtype, str(repeats),
                                 device])
    if "skipped" in timed:
        timed = {v: timed for v in runnable}
    gemm4 = timed.pop("gemm4_s", None)
    for v in runnable:
        rows[v].update(timed[v])
    return rows, gemm4


def main(script: str, doc: str, op: str, variants: tuple[str, ...], make_fn: MakeFn,
         needs: dict[str, str] | None = None) -> None:
    """The command line of an LM-head benchmark. ``variants[0]`` is the naive baseline every ratio divides by
    (``*_ratio_vs_naive`` in the JSON); ``needs`` maps a variant to the optional module it imports (skipped with a
    note when that is missing)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--quick", action="store_true", help="one small shape (T=256, V=8192)")
    ap.add_argument("--tokens", type=int, nargs="*", help="values of T (default: CPU 1024 4096, CUDA +16384)")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) / bfloat16 (CUDA default) / float16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=list(variants), choices=variants)
    ap.add_argument("--memory-worker", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--time-worker", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        v, T, D, V, dt, dev = args.memory_worker
        print(json.dumps(_memory_worker(make_fn, v, int(T), int(D), int(V), dt, dev)))
        return
    if args.time_worker:
        vs, T, D, V, dt, reps, dev = args.time_worker
        print(json.dumps(_time_worker(make_fn, vs.split(","), int(T), int(D), int(V), dt, int(reps), dev)))
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    tokens = args.tokens or ([1024, 4096, 16384] if device == "cuda" else [1024, 4096])
    D, V = args.hidden, args.vocab
    if args.quick:
        tokens, V = [256], 8192
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    report = {
        "device": name, **versions(), "commit": git_commit("kernels", "benchmarks"),
        "op": op, "dtype": dtype, "D": D, "V": V, "repeats": args.repeats, "results": [],
        "load_before": load_average(),
        "memory_method": "CUDA max_memory_allocated delta" if device == "cuda" else
        "peak RSS (VmHWM) delta of one fwd+bwd after a warm-up, fresh subprocess per variant; includes the grads",
    }  # fmt: skip
    print(f"{name}  torch {torch.__version__}  triton {report['triton']}  dtype {dtype}  D={D} V={V}  op {op}")
    print(f"load before: {report['load_before']}")
    base_name = variants[0]
    print(f"{'T':>6} {'variant':>15} {'median s':>9} {'peak MiB':>9} {'time/naive':>10} {'mem/naive':>9}  note")
    out_dir = ROOT / "benchmarks" / "results"
    path = Path(args.out) if args.out else out_dir / f"{op}_{device}{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for T in tokens:
        rows, gemm4 = _measure(script, args.variants, needs or {}, T, D, V, dtype, args.repeats, device)
        base = rows.get(base_name, {})
        for v, r in rows.items():
            if "median_s" not in r:
                print(f"{T:>6} {v:>15} {'-':>9} {'-':>9} {'-':>10} {'-':>9}  skipped: {r.get('skipped')}")
                continue
            if "median_s" in base:
                r["time_ratio_vs_naive"] = r["median_s"] / base["median_s"]
                r["mem_ratio_vs_naive"] = r["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
                r["mem_beyond_grads_ratio_vs_naive"] = r["peak_extra_beyond_grads_bytes"] / max(
                    base["peak_extra_beyond_grads_bytes"], 1
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
