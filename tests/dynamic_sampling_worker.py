"""One rank of test_dynamic_sampling's two-process check (run under torchrun, gloo): rank 0's batch has one zero-std
group, rank 1's two, so the ranks need different numbers of replacements and must still make the same collective
calls. Writes each rank's final prompts, advantages and dynamic-sampling metrics to ``<out>/rank<r>.pt``."""

import sys
import warnings

import torch
from datasets import Dataset

from grpo_fast import GRPOConfig, GRPOTrainer
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer

G, CONST = 4, "1+1="
DATA = ["1+1=", "22+22=", "1+1=", "333+333=", "5+5="]


def by_prompt(prompts, completions, **kw):
    return [0.5 if p == CONST else float(i % 2) for i, p in enumerate(prompts)]


def main(out: str):
    warnings.simplefilter("ignore")
    args = GRPOConfig(output_dir=out, use_cpu=True, report_to="none", per_device_train_batch_size=12,
                      num_generations=G, max_completion_length=6, seed=0, skip_zero_std_groups=True, plot=False,
                      max_steps=1)
    t = GRPOTrainer(tiny_causal_lm(seed=1), [by_prompt], args=args, processing_class=tiny_tokenizer(),
                    train_dataset=Dataset.from_list([{"prompt": p} for p in DATA]))
    t.model.train()
    rank = t.accelerator.process_index
    prompts = [CONST, "22+22=", "5+5="] if rank == 0 else [CONST, "333+333=", CONST]
    batch = t._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(G)])
    metrics = {k: v for k, v in t._metrics["train"].items() if k.startswith("dynamic_sampling/")}
    text = t.processing_class.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    torch.save({"prompts": text, "advantages": batch["advantages"], "metrics": metrics,
                "world": t.accelerator.num_processes}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
