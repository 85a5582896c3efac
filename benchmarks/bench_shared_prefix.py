"""Benchmark of the shared-prefix training forward (grpo_fast/shared_prefix.py) in one GRPO update's model part:
padded forward (each completion with its own prompt copy) against the shared-prefix forward (each prompt once),
forward + backward.

One step = hidden states (``completion_hidden_states`` or ``shared_prefix_hidden_states``) → the fused LM-head
log-prob op (``grpo_fast.kernels.logprob.linear_logprobs``) → loss = Σ logp · mask → backward into every
parameter.
Shape: SmolLM2-135M (the embedded default model's weights, or a random-init model of its config with
``--weights random``), B = 1 prompt of P tokens, G = 8 completions of L = 64 tokens, full masks.
Each (variant, P) runs in a fresh subprocess: one warm-up step, then the timed repeats (median reported); the
first timed step also gives the peak memory.
Memory: on the CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim) of that step minus
the RSS before it (activations, gradients and the transient buffers); on CUDA, max_memory_allocated minus the
allocation before the step. Before timing, the parent checks that both variants give the same log-probs and
gradients on a small P; it refuses to print a speed-up otherwise. CPU timings on a shared machine are noisy.

    python benchmarks/bench_shared_prefix.py          # P in {32, 256, 1024}, 3 repeats
    python benchmarks/bench_shared_prefix.py --quick  # 1 repeat per case (the P = 1024 padded step is slow)

``--trl`` measures the same thing one level up, in TRL's trainer: the policy update of
``grpo_fast.integrations.trl.FastGRPOTrainer`` (``_compute_loss`` + backward on one minibatch of B prompts × G
completions, TRL's left-padded inputs, ragged prompt and completion lengths) with ``use_shared_prefix_update`` on
against off, on a random-init SmolLM2-135M-shaped model. Update time only (no generation, no optimizer step), the
two variants interleaved, medians after a warm-up; both first run on the same batch and must give the same loss
and gradients (relative difference < 1e-3) or no ratio is printed.

    python benchmarks/bench_shared_prefix.py --trl --prompt-lens 256 --completion-len 32 --threads 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import git_commit, interleaved_times, load_average, proc_status_bytes, reset_cpu_peak, write_report

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("padded", "shared_prefix")


def _model(weights: str, device: str, dtype: torch.dtype):
    from grpo_fast.models import load_default_model, smollm2_config

    if weights == "default":
        model, tok = load_default_model(dtype)
        pad = tok.pad_token_id
    else:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model, pad = AutoModelForCausalLM.from_config(smollm2_config(), dtype=dtype), 0
    model.config.attention_dropout = 0.0
    return model.to(device).train(), pad


def _batch(P: int, L: int, G: int, vocab: int, device: str):
    from grpo_fast.shared_prefix import PolicyBatch

    gen = torch.Generator().manual_seed(P)
    prompt = torch.randint(10, vocab, (P,), generator=gen).tolist()
    ids = torch.randint(10, vocab, (G, L), generator=gen).to(device)
    return PolicyBatch([prompt], ids, torch.ones(G, L, dtype=torch.long, device=device), G)


def _step_fn(model, variant: str, batch, pad: int):
    from grpo_fast.forward import completion_hidden_states
    from grpo_fast.kernels.logprob import linear_logprobs
    from grpo_fast.shared_prefix import shared_prefix_hidden_states

    # shared_prefix_matmul forces the CPU form of the completion attention (the matmul one) on any device.
    impl = "matmul" if variant == "shared_prefix_matmul" else "auto"
    hidden_fn = (completion_hidden_states if variant == "padded"
                 else functools.partial(shared_prefix_hidden_states, impl=impl))
    head = model.get_output_embeddings()

    def step():
        hidden = hidden_fn(model, batch, pad)  # [N, L, D]
        n, L, d = hidden.shape
        logp = linear_logprobs(hidden.reshape(n * L, d), head.weight, batch.completion_ids.reshape(-1))  # [N·L]
        loss = (logp * batch.completion_mask.reshape(-1)).sum()
        loss.backward()
        return logp.detach()

    return step


def worker(variant: str, P: int, L: int, G: int, weights: str, dtype_name: str, repeats: int, device: str,
           threads: int) -> dict:
    """Runs in its own process: one step's peak extra memory (after a warm-up) and the timed repeats."""
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, pad = _model(weights, device, getattr(torch, dtype_name))
    batch = _batch(P, L, G, model.config.vocab_size, device)
    step = _step_fn(model, variant, batch, pad)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        model.zero_grad(set_to_none=True)
        step()
        sync()

    timed()  # warm-up
    times, peak = [], None
    for _ in range(repeats):  # the first timed step also gives the peak memory
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = reset_cpu_peak()
        t0 = time.perf_counter()
        timed()
        times.append(time.perf_counter() - t0)
        if peak is None:
            peak = (torch.cuda.max_memory_allocated() if device == "cuda" else proc_status_bytes("VmHWM")) - base
    return {"variant": variant, "P": P, "tokens": _tokens(variant, P, L, G), "peak_extra_bytes": peak,
            "times_s": times, "median_s": statistics.median(times)}


def _tokens(variant: str, P: int, L: int, G: int) -> int:
    return G * (P + L) if variant == "padded" else P + G * L


def check_equal(weights: str, dtype_name: str, device: str, P: int = 24, L: int = 8, G: int = 3) -> dict:
    """Both variants on one small batch: max |Δ logp| and the largest relative gradient difference."""
    model, pad = _model(weights, device, getattr(torch, dtype_name))
    batch = _batch(P, L, G, model.config.vocab_size, device)
    res = {}
    for variant in VARIANTS:
        model.zero_grad(set_to_none=True)
        logp = _step_fn(model, variant, batch, pad)()
        res[variant] = (logp, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    (lp_a, g_a), (lp_b, g_b) = res["padded"], res["shared_prefix"]
    grad_rel = max(((g_a[k] - g_b[k]).abs().max() / g_a[k].abs().max().clamp(min=1e-12)).item() for k in g_a)
    return {"max_abs_logp_diff": (lp_a - lp_b).abs().max().item(), "max_rel_grad_diff": grad_rel,
            "same_params": sorted(g_a) == sorted(g_b)}


def _run(variant, P, L, G, weights, dtype, repeats, device, threads) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, str(P), str(L), str(G), weights, dtype, str(repeats), device,
           str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"variant": variant, "P": P, "skipped": f"failed: {last[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _trl_trainer(model, G: int, out_dir: str):
    import warnings

    from datasets import Dataset
    from trl import GRPOConfig

    from grpo_fast.integrations.trl import FastGRPOTrainer
    from grpo_fast.testing import tiny_tokenizer

    args = GRPOConfig(output_dir=out_dir, use_cpu=not torch.cuda.is_available(), report_to="none", bf16=False,
                      per_device_train_batch_size=G, num_generations=G, max_completion_length=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FastGRPOTrainer(model, [lambda completions, **k: [0.0] * len(completions)], args=args,
                                  train_dataset=Dataset.from_list([{"prompt": "1+1="}] * G),
                                  processing_class=tiny_tokenizer())  # the tokenizer is unused: no generation here
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def _trl_inputs(B: int, G: int, P: int, L: int, vocab: int, device: str) -> dict:
    """TRL's minibatch: B prompts (lengths P, then shorter: left padding), each repeated G times; completions end
    at random lengths in [L/2, L]."""
    gen = torch.Generator().manual_seed(P)
    lens = [P - (b * P) // (4 * B) for b in range(B)]
    prompt_ids = torch.zeros(B * G, P, dtype=torch.long)
    for b, n in enumerate(lens):
        prompt_ids[b * G : (b + 1) * G, P - n :] = torch.randint(10, vocab, (n,), generator=gen)
    ends = torch.randint(L // 2, L + 1, (B * G,), generator=gen)
    completion_mask = (torch.arange(L)[None] < ends[:, None]).long()  # [N, L]
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": (prompt_ids != 0).long(),
              "completion_ids": torch.randint(10, vocab, (B * G, L), generator=gen) * completion_mask,
              "completion_mask": completion_mask, "advantages": torch.randn(B * G, generator=gen),
              "num_items_in_batch": completion_mask.sum()}
    return {k: v.to(device) for k, v in inputs.items()}


def trl_update(args) -> None:
    """``--trl``: FastGRPOTrainer's update with the shared-prefix forward on and off (see the module docstring)."""
    import tempfile

    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, _ = _model("random", device, torch.float32)
    trainer = _trl_trainer(model, args.group_size, tempfile.mkdtemp())
    B, G, L = args.groups, args.group_size, args.completion_len

    def update(inputs, shared: bool):
        trainer.use_shared_prefix_update = shared
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        return loss.detach()

    small = _trl_inputs(B, G, 24, 8, model.config.vocab_size, device)
    res = {}
    for shared in (False, True):
        loss = update(small, shared)
        res[shared] = (loss, {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None})
    grad_rel = max(((res[False][1][k] - res[True][1][k]).abs().max() / res[False][1][k].abs().max().clamp(min=1e-12))
                   .item() for k in res[False][1])
    ok = sorted(res[False][1]) == sorted(res[True][1]) and grad_rel < 1e-3
    print(f"{device}  torch {torch.__version__}  transformers {transformers.__version__}  threads "
          f"{torch.get_num_threads()}  SmolLM2-135M shape (random init), fp32, B={B} G={G} L={L}")
    print(f"equality check (P=24, L=8): loss {res[False][0].item():.6f} vs {res[True][0].item():.6f}, max relative "
          f"gradient difference {grad_rel:.2e} -> {'ok' if ok else 'FAILED: no ratio reported'}")
    report = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
              "commit": git_commit(), "load": load_average(), "model": "SmolLM2-135M (random init)", "dtype": "float32",
              "B": B, "G": G, "L": L, "threads": torch.get_num_threads(), "equality_ok": ok,
              "max_rel_grad_diff": grad_rel, "results": []}
    repeats = 1 if args.quick else args.repeats
    print(f"{'P':>6} {'padded s':>9} {'shared s':>9} {'speed-up':>9}")
    for P in args.prompt_lens:
        inputs = _trl_inputs(B, G, P, L, model.config.vocab_size, device)
        calls = {"padded": lambda: update(inputs, False), "shared_prefix": lambda: update(inputs, True)}
        times = interleaved_times(calls, warmup=1, repeats=repeats, inner=1, device=device)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["padded"] / med["shared_prefix"] if ok else float("nan")
        print(f"{P:>6} {med['padded']:>9.3f} {med['shared_prefix']:>9.3f} {ratio:>9.2f}")
        report["results"].append({"P": P, "times_s": times, "median_s": med, "speedup": ratio if ok else None})
    write_report(report, "trl_update", device, args.quick, args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--quick", action="store_true", help="1 repeat per case")
    ap.add_argument("--prompt-lens", type=int, nargs="*", default=[32, 256, 1024])
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--weights", choices=("default", "random"), default="default")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) / bfloat16 (CUDA default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per case (0: torch's default); 1 gives "
                    "steadier numbers on a machine shared with other jobs")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS + ("shared_prefix_matmul",))
    ap.add_argument("--worker", nargs=9, help=argparse.SUPPRESS)
    ap.add_argument("--trl", action="store_true", help="time FastGRPOTrainer's update, shared-prefix forward on/off")
    ap.add_argument("--groups", type=int, default=1, help="--trl: prompts (groups) per minibatch, B")
    args = ap.parse_args()
    if args.trl:
        trl_update(args)
        return
    if args.worker:
        v, P, L, G, w, dt, reps, dev, th = args.worker
        print(json.dumps(worker(v, int(P), int(L), int(G), w, dt, int(reps), dev, int(th))))
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    repeats = 1 if args.quick else args.repeats
    L, G = args.completion_len, args.group_size
    import transformers

    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    check = check_equal(args.weights, "float32" if device == "cpu" else dtype, device)
    ok = check["same_params"] and check["max_rel_grad_diff"] < (1e-3 if device == "cpu" else 5e-2)
    report = {
        "device": name, "torch": torch.__version__, "transformers": transformers.__version__,
        "commit": git_commit(), "dtype": dtype, "weights": args.weights, "model": "SmolLM2-135M",
        "B": 1, "G": G, "L": L, "repeats": repeats, "threads": args.threads or torch.get_num_threads(),
        "equality_check": check, "equality_ok": ok,
        "memory_method": "CUDA max_memory_allocated delta" if device == "cuda" else
        "peak RSS (VmHWM) delta of one fwd+bwd after a warm-up, fresh subprocess per case; includes the grads",
        "results": [],
    }  # fmt: skip
    print(f"{name}  torch {torch.__version__}  transformers {transformers.__version__}  dtype {dtype}  "
          f"threads {report['threads']}  B=1 G={G} L={L}")
    print(f"equality check (P=24, L=8, G=3): {check}  -> {'ok' if ok else 'FAILED: no speed-up reported'}")
    print(f"{'P':>6} {'variant':>14} {'tokens':>7} {'median s':>9} {'peak MiB':>9} {'speed-up':>9} {'mem ratio':>9}")
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else out_dir / f"shared_prefix_{device}{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for P in args.prompt_lens:
        rows = {v: _run(v, P, L, G, args.weights, dtype, repeats, device, args.threads) for v in args.variants}
        base = rows["padded"]
        for v, r in rows.items():
            if "skipped" in r:
                print(f"{P:>6} {v:>14} {'-':>7} {'-':>9} {'-':>9} {'-':>9} {'-':>9}  skipped: {r['skipped']}")
                continue
            if ok and "median_s" in base:
                r["speedup_vs_padded"] = base["median_s"] / r["median_s"]
                r["mem_ratio_vs_padded"] = r["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
            print(
                f"{P:>6} {v:>14} {r['tokens']:>7} {r['median_s']:>9.3f} {r['peak_extra_bytes'] / 2**20:>9.1f} "
                f"{r.get('speedup_vs_padded', float('nan')):>9.2f} {r.get('mem_ratio_vs_padded', float('nan')):>9.3f}"
            )
        report["results"].append({"P": P, "variants": rows})
        path.write_text(json.dumps(report, indent=2))  # partial results survive a time limit
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
