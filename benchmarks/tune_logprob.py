"""Sweep the CUDA launch shapes of the fused LM-head log-prob kernels (``kernels/logprob.py: CUDA_BLOCKS``).

Each candidate is checked against the PyTorch path (log-probs and d_hidden) before it is timed, so a shape that
computes garbage cannot win. Forward candidates are timed on the forward alone; backward candidates on forward +
backward with the default forward. Times are medians from ``triton.testing.do_bench`` (CUDA events).

    python benchmarks/tune_logprob.py                      # SmolLM2's head and a 7B-class head, bf16
    python benchmarks/tune_logprob.py --shapes 4096x576x49152
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import git_commit, versions

FWD = [  # (BLOCK_T, BLOCK_V, BLOCK_D, SPLIT_V, num_warps, num_stages)
    (64, 128, 64, 2048, 8, 3), (128, 128, 64, 2048, 8, 3), (128, 128, 64, 4096, 8, 3), (64, 256, 64, 4096, 8, 3),
    (128, 256, 64, 4096, 8, 3), (128, 128, 64, 2048, 4, 4), (64, 128, 128, 2048, 4, 3), (128, 64, 64, 2048, 4, 4),
]
BWD = [  # (BLOCK_T, BLOCK_V, BLOCK_D, num_warps, num_stages)
    (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x576x49152,4096x4096x151936", help="TxDxV list")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_logprob.py needs a CUDA device")
    import triton.testing

    import grpo_fast.kernels.logprob as lp

    dtype = getattr(torch, args.dtype)
    default = dict(lp.CUDA_BLOCKS)
    report = {"device": torch.cuda.get_device_name(), **versions(), "commit": git_commit("kernels", "benchmarks"),
              "dtype": args.dtype, "default": default, "results": []}
    for shape in args.shapes.split(","):
        T, D, V = map(int, shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(T, D, device="cuda", generator=g).to(dtype).requires_grad_()
        w = (torch.randn(V, D, device="cuda", generator=g) * D**-0.5).to(dtype).requires_grad_()
        t = torch.randint(0, V, (T,), device="cuda", generator=g)
        with torch.no_grad():
            ref_logp = lp._torch_forward(h, w, None, t, 1.0, False, max(1, lp._TORCH_TILE_ELEMS // V))[0]
        ref_dh = torch.autograd.grad(lp.linear_logprobs_ref(h, w, t).sum(), h)[0].float()

        def fwd():
            with torch.no_grad():
                return lp.linear_logprobs(h, w, t)

        def fwd_bwd():
            return torch.autograd.grad(lp.linear_logprobs(h, w, t).sum(), h)[0]

        rows = []
        for kind, cands, fn in (("fwd", FWD, fwd), ("bwd", BWD, fwd_bwd)):
            for cand in cands:
                lp.CUDA_BLOCKS.update(default)
                lp.CUDA_BLOCKS[kind] = cand
                try:
                    err = (fwd() - ref_logp.float()).abs().max().item()
                    derr = ((fwd_bwd().float() - ref_dh).norm() / ref_dh.norm()).item() if kind == "bwd" else None
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    row = {"kind": kind, "config": cand, "ms": ms, "max_abs_logp_err": err, "rel_dh_err": derr}
                except Exception as exc:  # a shape the compiler refuses (shared memory, registers) is skipped
                    row = {"kind": kind, "config": cand, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                rows.append(row)
                print(T, D, V, row, flush=True)
        lp.CUDA_BLOCKS.update(default)
        report["results"].append({"T": T, "D": D, "V": V, "rows": rows})
        for kind in ("fwd", "bwd"):
            ok = [r for r in rows if r["kind"] == kind and "ms" in r]
            base = next((r["ms"] for r in ok if tuple(r["config"]) == tuple(default[kind])), None)
            best = min(ok, key=lambda r: r["ms"]) if ok else None
            if best and base:
                print(f"T={T} D={D} V={V} {kind}: default {base:.3f} ms, best {best['config']} {best['ms']:.3f} ms "
                      f"({base / best['ms']:.2f}x)")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "tune_logprob_cuda.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
