"""Seconds per GRPO step, grpo_fast vs TRL's GRPOTrainer, on the same model, batch, G, lengths and beta, in one run.

Two configs: "short" (≈20-token chat prompts, 24 new tokens) and "long" (a ≈200-token few-shot prompt, 32 new
tokens). Each trainer runs ``--warmup`` optimizer steps untimed, then ``--steps`` timed ones; the wall time of a
step is measured between consecutive step-end callbacks, and split into sampling / reward / update / other.
update is the policy's log-probs, loss and backward (ours: and the optimizer step, which TRL's loop runs outside
``training_step``); other is the rest (reference log-probs, TRL's optimizer step, logging). Both run on
``--device`` (cpu, or cuda with the peak GPU memory of each), fp32 or both with ``--bf16`` (TRL: accelerate's
autocast; ours: the trainer's), without gradient checkpointing, with learning rate 1e-6 and the same seed;
completions may stop at EOS at different lengths, so the mean completion length of each is reported next to its
time. ``--weights random`` is a random-init model of SmolLM2-135M's shape with the character tokenizer of
grpo_fast.testing (for machines without the embedded model; ids past that tokenizer decode to nothing).

Simplifications: TRL is timed through its own methods ``_generate``, ``_calculate_rewards``, ``training_step`` and
``_prepare_inputs`` (wrapped, not changed); one process each, one after the other.

    python benchmarks/bench_e2e.py [--configs short,long] [--steps 3] [--warmup 1] [--device cuda --bf16]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import git_commit, load_average
from transformers import TrainerCallback

FEW_SHOT = (
    "Solve each addition. Show only the result.\n"
    + "".join(
        f"Question: What is {a} + {b}?\nAnswer: {a + b}\n"
        for a, b in [(12, 35), (47, 21), (8, 64), (33, 33), (71, 19), (25, 48), (90, 7), (14, 86), (52, 29),
                     (66, 15), (38, 44), (27, 59), (81, 13), (45, 45), (19, 72), (63, 28), (9, 91), (56, 37)]
    )
)


def make_rows(kind: str, n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = (torch.randint(10, 100, (2,), generator=g)).tolist()
        if kind == "short":
            prompt = [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}]
        else:
            prompt = [{"role": "user", "content": FEW_SHOT + f"Question: What is {a} + {b}?\nAnswer:"}]
        rows.append({"prompt": prompt, "answer": str(a + b)})
    return rows


CONFIGS = {"short": {"max_completion_length": 24}, "long": {"max_completion_length": 32}}


class StepTimer(TrainerCallback):
    """Records the wall time at each optimizer step's end (a transformers callback: TRL and grpo_fast call it)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def load(args):
    """(model, tokenizer) on ``--device``, the same for both trainers."""
    from grpo_fast.models import load_default_model

    if args.weights == "default":
        model, tok = load_default_model()
    else:
        from transformers import AutoModelForCausalLM

        from grpo_fast.models import smollm2_config
        from grpo_fast.testing import tiny_tokenizer

        torch.manual_seed(0)
        model, tok = AutoModelForCausalLM.from_config(smollm2_config(), dtype=torch.float32), tiny_tokenizer()
    return model.to(args.device), tok


def peak_memory(device: str, reset: bool = False) -> float | None:
    """Peak GPU memory in GiB since the last reset (None on the CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    if reset:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / 2**30


def common(args, kind) -> dict:
    return dict(
        per_device_train_batch_size=args.prompts * args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=CONFIGS[kind]["max_completion_length"],
        learning_rate=1e-6,
        beta=args.beta,
        temperature=1.0,
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        seed=0,
        gradient_checkpointing=False,
        bf16=args.bf16,
        report_to=[],
    )


def split(timer: StepTimer, parts: dict[str, list[float]], warmup: int, steps: int) -> dict:
    step_times = [b - a for a, b in zip(timer.times[warmup - 1 : -1], timer.times[warmup:])] if warmup else []
    if not warmup:
        raise ValueError("--warmup must be >= 1 (the first step's start is not observed)")
    total = sum(step_times) / len(step_times)
    out = {"s_per_step": total}
    for name, values in parts.items():
        out[f"{name}_s"] = sum(values[warmup:]) / max(len(values[warmup:]), 1)
    out["other_s"] = total - sum(out[f"{k}_s"] for k in parts)
    return out


def run_grpo_fast(args, kind, out_dir) -> dict:
    from grpo_fast import GRPOConfig, GRPOTrainer
    from grpo_fast.rewards import accuracy_reward

    model, tok = load(args)
    peak_memory(args.device, reset=True)
    timer = StepTimer()
    cfg = GRPOConfig(output_dir=str(out_dir / f"grpo_fast_{kind}"), **common(args, kind))
    trainer = GRPOTrainer(model, [accuracy_reward], args=cfg, train_dataset=make_rows(kind, 256),
                          processing_class=tok, callbacks=[timer])
    history = trainer.train()
    parts = {name: [r[f"timing/{name}_s"] for r in history] for name in ("sampling", "reward", "update")}
    res = split(timer, parts, args.warmup, args.steps)
    res["peak_gpu_gib"] = peak_memory(args.device)
    res["mean_completion_length"] = sum(r["completions/mean_length"] for r in history[args.warmup:]) / args.steps
    res["prompt_tokens"] = len(trainer.encode(make_rows(kind, 1)[0]["prompt"]))
    return res


def run_trl(args, kind, out_dir) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    from grpo_fast.rewards import accuracy_reward

    model, tok = load(args)
    peak_memory(args.device, reset=True)
    timer = StepTimer()
    kw = common(args, kind)
    kw["report_to"] = "none"
    cfg = GRPOConfig(output_dir=str(out_dir / f"trl_{kind}"), use_cpu=args.device == "cpu", save_strategy="no",
                     disable_tqdm=True, **kw)
    from datasets import Dataset

    trainer = GRPOTrainer(model, [accuracy_reward], args=cfg, train_dataset=Dataset.from_list(make_rows(kind, 256)),
                          processing_class=tok, callbacks=[timer])
    parts: dict[str, list[float]] = {"sampling": [], "reward": [], "step": [], "prepare": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[name].append(time.perf_counter() - t0)

        return wrapper

    trainer._generate = timed("sampling", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer.training_step = timed("step", trainer.training_step)
    trainer._prepare_inputs = timed("prepare", trainer._prepare_inputs)
    trainer.train()
    # one training_step per optimizer step (gradient_accumulation_steps = 1); its _prepare_inputs samples and scores
    parts["update"] = [a - b for a, b in zip(parts.pop("step"), parts.pop("prepare"))]
    res = split(timer, parts, args.warmup, args.steps)
    res["peak_gpu_gib"] = peak_memory(args.device)
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    res["mean_completion_length"] = sum(lengths[args.warmup:]) / max(len(lengths[args.warmup:]), 1)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="short,long")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in both trainers (with --device cuda)")
    p.add_argument("--weights", choices=("default", "random"), default="default")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.bf16 and args.device != "cuda":  # TRL would autocast the CPU, grpo_fast stays fp32 there: not like for like
        p.error("--bf16 needs --device cuda (grpo_fast trains in fp32 on the CPU)")
    import tempfile

    import transformers
    import trl

    work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    torch.manual_seed(0)
    rows = []
    for kind in args.configs.split(","):
        ours = run_grpo_fast(args, kind, work)
        theirs = run_trl(args, kind, work)
        speedup = theirs["s_per_step"] / ours["s_per_step"]
        rows.append({"config": kind, "grpo_fast": ours, "trl": theirs, "speedup": speedup})
        print(f"\n[{kind}] prompt ≈{ours['prompt_tokens']} tokens, {args.prompts} prompts x G={args.num_generations}")
        print(f"{'':10s} {'s/step':>8s} {'sampling':>9s} {'reward':>8s} {'update':>8s} {'other':>8s} {'mean len':>9s}"
              f" {'peak GiB':>9s}")
        for name, r in (("grpo_fast", ours), ("trl", theirs)):
            peak = f"{r['peak_gpu_gib']:9.2f}" if r["peak_gpu_gib"] is not None else f"{'-':>9s}"
            print(f"{name:10s} {r['s_per_step']:8.2f} {r['sampling_s']:9.2f} {r['reward_s']:8.3f} {r['update_s']:8.2f} "
                  f"{r['other_s']:8.2f} {r['mean_completion_length']:9.1f} {peak}")
        print(f"speed-up: {rows[-1]['speedup']:.2f}x")
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    device = "cuda:" + torch.cuda.get_device_name() if args.device == "cuda" else cpu
    result = {
        "device": device,
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "commit": git_commit(), "load": load_average(), "args": vars(args), "results": rows,
    }
    suffix = args.device + ("_bf16" if args.bf16 else "")
    out = Path(args.out or Path(__file__).parent / "results" / f"e2e_{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
