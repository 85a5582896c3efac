"""Seconds per GRPO step, grpo_fast's TRL-based trainer vs TRL's GRPOTrainer, same model, batch, G, lengths, beta and
seed, in one run.

"ours" is ``grpo_fast.GRPOTrainer`` with ``grpo_fast.GRPOConfig`` when that is TRL's trainer subclassed, else
``grpo_fast.integrations.trl.FastGRPOTrainer`` with ``trl.GRPOConfig`` (the same class underneath); the JSON says
which. Three configs:

- "short": ≈20-token chat prompts, 24 new tokens, 2 prompts × G = 8, no gradient checkpointing;
- "long": a ≈200-token few-shot chat prompt, 32 new tokens, 2 prompts × G = 8, no gradient checkpointing;
- "first-user": TRL's defaults (gradient checkpointing on, lr 1e-6, dapo, beta 0) with a plain ≈15-token prompt,
  num_generations 16, max_completion_length 24, and per_device_train_batch_size 16 (one prompt a step: TRL's
  default of 8 is refused with G = 16).

Each trainer runs ``--warmup`` optimizer steps untimed, then ``--steps`` timed ones; the wall time of a step is
measured between consecutive step-end callbacks. Both trainers are timed through the same TRL methods (wrapped, not
changed): sampling = ``_generate`` (tokenizing, generating, decoding), reward = ``_calculate_rewards``, update =
``training_step`` minus its ``_prepare_inputs`` (the policy's log-probs, loss and backward), other = the rest of the
step (the rest of ``_prepare_inputs`` — old/reference log-probs, advantages — the optimizer step, logging); the
rest of ``_prepare_inputs`` alone is also recorded as ``scoring_s``. Both run fp32 on ``--device`` (cpu, or cuda
with the peak GPU memory of each), or both under bf16 autocast with ``--bf16`` (TRL's own default; on a CPU only
fast where it has AMX/AVX512-BF16 units, ``torch.backends.mkldnn`` reports them), with the same seed;
completions may stop at EOS at different lengths, so each one's mean completion length is reported next to its
time. On the CPU the peak resident memory of each trainer's run (training only, over what was resident before) is
recorded too. ``--threads 1`` on a shared, loaded machine: there, with 2 threads on 2 cores, each small op waits on
its sleeping partner thread (a 16 × 576 × 1536 matmul took 11.7 ms with 2 threads and 1.3 ms with 1 at load 9).
``--weights random`` is a random-init model of SmolLM2-135M's shape with the character tokenizer of
grpo_fast.testing (for machines without the embedded model; ids past that tokenizer decode to nothing).

Simplifications: one process, the two trainers one after the other (ours first), so load drift on a shared machine
enters the ratio; the JSON records the load average.

    python benchmarks/bench_e2e.py [--configs short,long,first-user] [--steps 3] [--warmup 1] [--threads 1]
                                   [--device cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import git_commit, load_average, proc_status_bytes, reset_cpu_peak
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
        elif kind == "long":
            prompt = [{"role": "user", "content": FEW_SHOT + f"Question: What is {a} + {b}?\nAnswer:"}]
        else:  # a plain-text prompt (TRL's "standard" format: no chat template)
            prompt = f"Question: what is {a} plus {b}? Give the number.\nAnswer:"
        rows.append({"prompt": prompt, "answer": str(a + b)})
    return rows


# per config: the options that differ from the CLI's (prompts × num_generations per step, no checkpointing)
CONFIGS = {
    "short": {"max_completion_length": 24},
    "long": {"max_completion_length": 32},
    "first-user": {"max_completion_length": 24, "num_generations": 16, "per_device_train_batch_size": 16,
                   "gradient_checkpointing": True},
}


class StepTimer(TrainerCallback):
    """Records the wall time at each optimizer step's end (a transformers callback: both trainers call it)."""

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


def ours():
    """(trainer class, config class, name) of grpo_fast's TRL-based trainer."""
    import trl

    try:
        from grpo_fast import GRPOConfig, GRPOTrainer

        if issubclass(GRPOTrainer, trl.GRPOTrainer) and issubclass(GRPOConfig, trl.GRPOConfig):
            return GRPOTrainer, GRPOConfig, "grpo_fast.GRPOTrainer"
    except ImportError:
        pass
    from grpo_fast.integrations.trl import FastGRPOTrainer

    return FastGRPOTrainer, trl.GRPOConfig, "grpo_fast.integrations.trl.FastGRPOTrainer"


def peak_memory(device: str, reset: bool = False) -> float | None:
    """Peak GPU memory in GiB since the last reset (None on the CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    if reset:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / 2**30


def options(args, kind) -> dict:
    kw = dict(
        per_device_train_batch_size=args.prompts * args.num_generations,
        num_generations=args.num_generations,
        learning_rate=1e-6,
        beta=args.beta,
        temperature=1.0,
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        seed=0,
        gradient_checkpointing=False,
        bf16=args.bf16,
        use_cpu=args.device == "cpu",
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
    )
    kw.update(CONFIGS[kind])
    return kw


def split(timer: StepTimer, parts: dict[str, list[float]], warmup: int) -> dict:
    """Mean seconds per timed step, in total and per part (one entry per step in each list)."""
    step_times = [b - a for a, b in zip(timer.times[warmup - 1 : -1], timer.times[warmup:])]
    total = sum(step_times) / len(step_times)
    out = {"s_per_step": total, "step_s": step_times}
    for name, values in parts.items():
        out[f"{name}_s"] = sum(values[warmup:]) / len(values[warmup:])
    out["other_s"] = total - sum(out[f"{k}_s"] for k in ("sampling", "reward", "update"))
    return out


def run(args, kind, which: str, out_dir: Path) -> dict:
    """One trainer (``which``: "ours" or "trl") on config ``kind``: its mean step time and split."""
    import trl
    from datasets import Dataset

    from grpo_fast.rewards import accuracy_reward

    trainer_cls, config_cls = (trl.GRPOTrainer, trl.GRPOConfig) if which == "trl" else ours()[:2]
    model, tok = load(args)
    peak_memory(args.device, reset=True)
    timer = StepTimer()
    cfg = config_cls(output_dir=str(out_dir / f"{which}_{kind}"), **options(args, kind))
    trainer = trainer_cls(model, [accuracy_reward], args=cfg, train_dataset=Dataset.from_list(make_rows(kind, 256)),
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
    rss0 = reset_cpu_peak() if args.device == "cpu" else None
    trainer.train()
    # one training_step per optimizer step (gradient_accumulation_steps = 1); its _prepare_inputs samples and scores
    prepare = parts.pop("prepare")
    parts["update"] = [a - b for a, b in zip(parts.pop("step"), prepare)]
    parts["scoring"] = [p - s - r for p, s, r in zip(prepare, parts["sampling"], parts["reward"])]
    res = split(timer, parts, args.warmup)
    res["peak_gpu_gib"] = peak_memory(args.device)
    res["peak_rss_extra_gib"] = (proc_status_bytes("VmHWM") - rss0) / 2**30 if rss0 is not None else None
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    res["mean_completion_length"] = sum(lengths[args.warmup:]) / len(lengths[args.warmup:])
    prompt = make_rows(kind, 1)[0]["prompt"]
    if kind != "first-user":  # chat prompts go through the template, as TRL applies it
        prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    res["prompt_tokens"] = len(tok(prompt, add_special_tokens=False)["input_ids"])
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="short,long,first-user")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (short, long)")
    p.add_argument("--num_generations", type=int, default=8, help="G (short, long)")
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in both trainers")
    p.add_argument("--weights", choices=("default", "random"), default="default")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 on a loaded machine, where threads spin-wait")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first timed step's start is the warm-up's end)")
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    import transformers
    import trl

    work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    load_before = load_average()
    rows = []
    for kind in args.configs.split(","):
        mine = run(args, kind, "ours", work)
        theirs = run(args, kind, "trl", work)
        speedup = theirs["s_per_step"] / mine["s_per_step"]
        opts = options(args, kind)
        keys = ("per_device_train_batch_size", "num_generations", "max_completion_length", "gradient_checkpointing")
        rows.append({"config": kind, "options": {k: opts[k] for k in keys},
                     "grpo_fast": mine, "trl": theirs, "speedup": speedup, "load": load_average()})
        print(f"\n[{kind}] prompt ≈{mine['prompt_tokens']} tokens, {opts['per_device_train_batch_size']} completions "
              f"(G={opts['num_generations']}), {opts['max_completion_length']} new tokens, gradient checkpointing "
              f"{'on' if opts['gradient_checkpointing'] else 'off'}")
        print(f"{'':10s} {'s/step':>8s} {'sampling':>9s} {'reward':>8s} {'update':>8s} {'other':>8s} {'(scoring)':>9s}"
              f" {'mean len':>9s} {'peak GiB':>9s}")
        for name, r in (("grpo_fast", mine), ("trl", theirs)):
            peak = r["peak_gpu_gib"] if r["peak_gpu_gib"] is not None else r["peak_rss_extra_gib"]
            print(f"{name:10s} {r['s_per_step']:8.2f} {r['sampling_s']:9.2f} {r['reward_s']:8.3f} {r['update_s']:8.2f} "
                  f"{r['other_s']:8.2f} {r['scoring_s']:9.2f} {r['mean_completion_length']:9.1f} {peak:9.2f}")
        print(f"speed-up: {speedup:.2f}x   ({rows[-1]['load']})")
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    device = "cuda:" + torch.cuda.get_device_name() if args.device == "cuda" else cpu
    result = {
        "device": device, "ours": ours()[2],
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "commit": git_commit(), "load_before": load_before, "load": load_average(), "args": vars(args),
        "results": rows,
    }
    suffix = args.device + ("_bf16" if args.bf16 else "")
    out = Path(args.out or Path(__file__).parent / "results" / f"e2e_{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
