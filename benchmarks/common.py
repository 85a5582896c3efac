"""Helpers every benchmark script shares: the commit a result belongs to, the machine's load, CPU peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_commit(*paths: str) -> str:
    """HEAD, with "-dirty" when any of ``paths`` (all tracked files when none) differs from it; "uncommitted"
    outside a repository. ``GRPO_FAST_COMMIT`` overrides it (a copy of the tree without .git, as on a lent GPU)."""
    if os.environ.get("GRPO_FAST_COMMIT"):
        return os.environ["GRPO_FAST_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        if head.returncode != 0 or not head.stdout.strip():
            return "uncommitted"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
                               capture_output=True, text=True, cwd=ROOT)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "uncommitted"


def versions() -> dict:
    """The versions a result depends on."""
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def load_average() -> str:
    """``uptime``'s load averages: on a shared machine every time is inflated, so results record it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def proc_status_bytes(field: str) -> int:
    """A byte count from /proc/self/status (VmRSS, VmHWM, ...); Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_cpu_peak() -> int:
    """Returns freed heap to the OS, resets the peak-RSS mark (VmHWM), and returns the current RSS; the peak extra
    memory of what runs next is then ``proc_status_bytes("VmHWM") - reset_cpu_peak()``."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_bytes("VmRSS")


# Peak HBM bandwidth by device-name substring, most specific first ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_HBM_BYTES_S = {
    "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12,
    "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12, "A100-PCIE-40GB": 1.555e12, "L40S": 0.864e12,
}


def peak_bandwidth(device_name: str) -> float | None:
    """Peak HBM bytes/s of a known CUDA device, by name; None for others (no fraction of peak reported)."""
    for key, value in PEAK_HBM_BYTES_S.items():
        if key in device_name:
            return value
    return None


def interleaved_times(calls: dict[str, Callable[[], object]], warmup: int, repeats: int, inner: int, device: str,
                      context: Callable[[str], contextlib.AbstractContextManager] | None = None) -> dict[str, list]:
    """Seconds per call of each of ``calls`` (name → no-argument function), one entry per repeat after ``warmup``.

    A repeat runs ``inner`` calls back to back, synchronized once on CUDA (launch-bound ops are timed as they run
    in a loop, not one host round trip each); the variants alternate within each repeat so that a shared machine's
    drifting load hits them alike. ``context(name)`` wraps each variant's calls (a forced backend, no_grad).
    """
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, call in calls.items():
            with context(name) if context else contextlib.nullcontext():
                sync()
                t0 = time.perf_counter()
                for _ in range(inner):
                    call()
                sync()
                elapsed = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(elapsed / inner)
    return times


def write_report(report: dict, op: str, device: str, quick: bool = False, out: str | None = None) -> Path:
    """Writes ``report`` as JSON to ``out`` or benchmarks/results/<op>_<device>[_quick].json and says where."""
    path = Path(out) if out else ROOT / "benchmarks" / "results" / f"{op}_{device}{'_quick' if quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return path
