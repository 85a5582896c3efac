"""Wall-clock to reach a reward level: grpo_fast's TRL-based trainer vs TRL 1.16's GRPOTrainer, same hyperparameters,
in one run.

"ours" is the trainer bench_e2e.py's ``ours()`` picks (``grpo_fast.GRPOTrainer`` once it subclasses TRL's, else
``grpo_fast.integrations.trl.FastGRPOTrainer`` with ``trl.GRPOConfig``); the JSON says which. Both train the embedded
SmolLM2-135M-Instruct on the demo's task (2-digit addition, chat format, accuracy reward) with the demo's
hyperparameters (configs/demo.yaml: 2 prompts × 8 completions, lr 1e-5, dapo, beta 0, 32 new tokens, fp32, no
gradient checkpointing, seed 0; ``--bf16`` and ``--seed`` change these for both), and stop when the 5-step moving
average of the reward reaches ``--target`` (or after ``--max_steps``). The clock starts when ``train()`` is called (model loading excluded).

``--trl_cap F`` shortens the run on a slow machine: TRL (which runs second) stops once its clock passes F times ours
to the target, so "not reached" then means TRL takes more than F times as long (this is the only claim made).

``--seeds 0,1,2`` repeats the race per training seed and reports the median time of each trainer (sampling luck moves
the step at which a run reaches the target by ±30%; the two trainers draw different completions). Simplifications:
both see the same prompt rows, each in its own shuffled order; the two run one after the other, so load drift on a
shared machine enters the ratio (the JSON records the load average after each).

    python benchmarks/bench_time_to_reward.py [--target 0.3] [--max_steps 40] [--trl_cap 3] [--threads 1] [--bf16]
        [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_e2e import ours
from common import git_commit, load_average
from transformers import TrainerCallback


class StopAtReward(TrainerCallback):
    """Records (step, reward, seconds since train start); stops at the target moving average or past ``deadline``
    seconds."""

    def __init__(self, target: float, window: int = 5, deadline: float | None = None):
        self.target, self.window, self.deadline = target, window, deadline
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
        if self.deadline is not None and self.rows[-1]["s"] > self.deadline:
            control.should_training_stop = True


def hyperparameters(max_steps: int, bf16: bool = False, seed: int = 0) -> dict:
    return dict(per_device_train_batch_size=16, num_generations=8, max_completion_length=32, learning_rate=1e-5,
                beta=0.0, loss_type="dapo", temperature=1.0, max_steps=max_steps, logging_steps=1, seed=seed,
                gradient_checkpointing=False, bf16=bf16, lr_scheduler_type="constant", warmup_steps=0,
                use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)


def run(which: str, rows, target, max_steps, out, deadline=None, bf16=False, seed=0) -> dict:
    import trl
    from datasets import Dataset

    from grpo_fast.models import load_default_model
    from grpo_fast.rewards import accuracy_reward

    trainer_cls, config_cls = (trl.GRPOTrainer, trl.GRPOConfig) if which == "trl" else ours()[:2]
    model, tok = load_default_model()
    cb = StopAtReward(target, deadline=deadline)
    config = config_cls(output_dir=str(out), **hyperparameters(max_steps, bf16, seed))
    trainer = trainer_cls(model, [accuracy_reward], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[cb])
    cb.t0 = time.perf_counter()
    trainer.train()
    return {"reached": cb.reached, "curve": cb.rows, "deadline_s": deadline, "load": load_average()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", type=float, default=0.3, help="5-step moving average of the reward to reach")
    p.add_argument("--max_steps", type=int, default=40)
    p.add_argument("--trl_cap", type=float, default=None,
                   help="stop TRL once its clock passes this many times ours to the target")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--bf16", action="store_true", help="both trainers under bf16 autocast (TRL's default precision)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds; each runs both trainers")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    import trl

    from grpo_fast.tasks import get_task

    rows = get_task("arithmetic", n=2000, seed=0, split="train", digits=2, ops=("+",))
    work = Path(tempfile.mkdtemp(prefix="bench_reach_"))
    load_before = load_average()
    results = {}
    for seed in [int(x) for x in args.seeds.split(",")]:  # per seed ours then TRL: load drift hits both alike
        ours_run = run("ours", rows, args.target, args.max_steps, work / f"ours{seed}", bf16=args.bf16, seed=seed)
        hit = ours_run["reached"]
        deadline = args.trl_cap * hit["s"] if args.trl_cap and hit else None
        trl_run = run("trl", rows, args.target, args.max_steps, work / f"trl{seed}", deadline, bf16=args.bf16,
                      seed=seed)
        results[str(seed)] = {"grpo_fast": ours_run, "trl": trl_run}
    print(f"\ntarget: 5-step moving average of the reward >= {args.target} (max {args.max_steps} steps)")
    times = {"grpo_fast": [], "trl": []}
    for seed, pair in results.items():
        for name, r in pair.items():
            hit = r["reached"]
            # not reached: the run's last time, a lower bound (the median below is then a lower bound too)
            times[name].append(hit["s"] if hit else float("inf") if not r["curve"] else r["curve"][-1]["s"])
            where = f"step {hit['step']} after {hit['s']:.0f} s" if hit else f"not reached in {times[name][-1]:.0f} s"
            print(f"seed {seed}  {name:10s} {where}   ({r['load']})")
    summary = {name: statistics.median(t) for name, t in times.items()}
    summary["trl_over_ours"] = summary["trl"] / summary["grpo_fast"]
    summary["per_seed"] = [b / a for a, b in zip(times["grpo_fast"], times["trl"], strict=True)]
    summary["per_seed_median"] = statistics.median(summary["per_seed"])
    summary["ratio_of_means"] = statistics.mean(times["trl"]) / statistics.mean(times["grpo_fast"])
    print(f"median seconds to the target: grpo_fast {summary['grpo_fast']:.0f}, TRL {summary['trl']:.0f}; "
          f"TRL / ours {summary['trl_over_ours']:.2f}x (per seed: "
          + ", ".join(f"{r:.2f}x" for r in summary["per_seed"])
          + f"; median {summary['per_seed_median']:.2f}x; ratio of means {summary['ratio_of_means']:.2f}x)")
    out = Path(args.out or Path(__file__).parent / "results" / "time_to_reward_cpu.json")
    out.write_text(json.dumps({"ours": ours()[2], "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "transformers": transformers.__version__, "trl": trl.__version__,
                               "commit": git_commit(), "load_before": load_before, "load": load_average(),
                               "args": vars(args), "summary": summary, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
