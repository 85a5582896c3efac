"""Wall-clock to reach a reward level: grpo_fast vs TRL 1.16's GRPOTrainer, same hyperparameters, in one run.

Both train the embedded SmolLM2-135M-Instruct on the demo's task (2-digit addition, chat format, accuracy reward)
with the demo's hyperparameters (configs/demo.yaml: 2 prompts × 8 completions, lr 1e-5, dapo, beta 0, 32 new
tokens, fp32, no gradient checkpointing, seed 0), and stop when the 5-step moving average of the reward reaches
``--target`` (or after ``--max_steps``). The clock starts when ``train()`` is called (model loading excluded).

Simplifications: one run per trainer, so sampling luck enters the result (the two trainers draw different
completions); TRL sees the same prompt rows, in its own shuffled order.

    python benchmarks/bench_time_to_reward.py [--target 0.3] [--max_steps 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import git_commit, load_average
from transformers import TrainerCallback


class StopAtReward(TrainerCallback):
    """Records (step, reward, seconds since train start) and stops at the target moving average."""

    def __init__(self, target: float, window: int = 5):
        self.target, self.window = target, window
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.reached: dict | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or logs.get("reward") is None:
            return
        self.rows.append({"step": state.global_step, "reward": logs["reward"], "s": time.perf_counter() - self.t0})
        recent = [r["reward"] for r in self.rows[-self.window :]]
        if self.reached is None and len(recent) == self.window and sum(recent) / self.window >= self.target:
            self.reached = self.rows[-1]
            control.should_training_stop = True  # both trainers stop after this step


def hyperparameters(max_steps: int) -> dict:
    return dict(per_device_train_batch_size=16, num_generations=8, max_completion_length=32, learning_rate=1e-5,
                beta=0.0, loss_type="dapo", temperature=1.0, max_steps=max_steps, logging_steps=1, seed=0,
                gradient_checkpointing=False, bf16=False, lr_scheduler_type="constant", warmup_steps=0)


def run_grpo_fast(rows, target, max_steps, out) -> dict:
    from grpo_fast import GRPOConfig, GRPOTrainer
    from grpo_fast.models import load_default_model
    from grpo_fast.rewards import accuracy_reward

    model, tok = load_default_model()
    cb = StopAtReward(target)
    trainer = GRPOTrainer(model, [accuracy_reward], args=GRPOConfig(output_dir=str(out), report_to=[],
                          save_steps=0, **hyperparameters(max_steps)), train_dataset=rows, processing_class=tok,
                          callbacks=[cb])
    cb.t0 = time.perf_counter()
    trainer.train()
    return {"reached": cb.reached, "curve": cb.rows}


def run_trl(rows, target, max_steps, out) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from grpo_fast.models import load_default_model
    from grpo_fast.rewards import accuracy_reward

    model, tok = load_default_model()
    cb = StopAtReward(target)
    cfg = GRPOConfig(output_dir=str(out), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                     **hyperparameters(max_steps))
    trainer = GRPOTrainer(model, [accuracy_reward], args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[cb])
    cb.t0 = time.perf_counter()
    trainer.train()
    return {"reached": cb.reached, "curve": cb.rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", type=float, default=0.3, help="5-step moving average of the reward to reach")
    p.add_argument("--max_steps", type=int, default=40)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import transformers
    import trl

    from grpo_fast.tasks import get_task

    rows = get_task("arithmetic", n=2000, seed=0, split="train", digits=2, ops=("+",))
    work = Path(tempfile.mkdtemp(prefix="bench_reach_"))
    results = {"grpo_fast": run_grpo_fast(rows, args.target, args.max_steps, work / "ours"),
               "trl": run_trl(rows, args.target, args.max_steps, work / "trl")}
    print(f"\ntarget: 5-step moving average of the reward >= {args.target} (max {args.max_steps} steps)")
    for name, r in results.items():
        hit = r["reached"]
        where = f"step {hit['step']} after {hit['s']:.0f} s" if hit else f"not reached in {r['curve'][-1]['s']:.0f} s"
        print(f"{name:10s} {where}")
    out = Path(args.out or Path(__file__).parent / "results" / "time_to_reward_cpu.json")
    out.write_text(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                               "trl": trl.__version__, "commit": git_commit(), "load": load_average(),
                               "args": vars(args), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
