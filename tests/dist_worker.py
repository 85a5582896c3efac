"""Worker for tests/test_distributed.py: a short GRPO run on a tiny model, launched alone or under torchrun.

    python tests/dist_worker.py OUT_DIR [--steps 2] [--resume] [--fsdp]
writes OUT_DIR/final.pt (rank 0): parameters and the logged rows.
"""

import argparse
import os
import warnings

import torch

from grpo_fast.config import GRPOConfig
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer
from grpo_fast.trainer import GRPOTrainer

ROWS = [{"prompt": p} for p in ("3+4=", "12+5=", "7*8=", "1+1=")]
GLOBAL_COMPLETIONS = 16  # 4 prompts x G = 4 per optimizer step, split over the ranks


def alternating_len(prompts, completions, **kw):
    return [float(len(c) % 2) for c in completions]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--save_steps", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--loss_type", default="dapo")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--tie", action="store_true", help="tied input/output embeddings")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--eval", action="store_true", help="greedy evaluation after every step")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    cfg = GRPOConfig(
        output_dir=args.out, per_device_train_batch_size=GLOBAL_COMPLETIONS // world, num_generations=4,
        max_completion_length=4, learning_rate=1e-3, max_steps=args.steps, logging_steps=1,
        save_steps=args.save_steps, report_to=[], seed=0, gradient_checkpointing=args.gc, warmup_steps=0,
        loss_type=args.loss_type, beta=0.04, adam_epsilon=1e-3, lr_scheduler_type="constant",
        fsdp="full_shard" if args.fsdp else None, eval_steps=1 if args.eval else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = GRPOTrainer(tiny_causal_lm(seed=4, tie=args.tie), [alternating_len], args=cfg, train_dataset=ROWS,
                        eval_dataset=ROWS if args.eval else None, processing_class=tiny_tokenizer())
        history = t.train(resume_from_checkpoint=args.resume or None)
    if t.sharded:  # every rank gathers the full weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(t.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = t.model.state_dict()
    if t.is_main:
        params = {k: v.detach().clone() for k, v in state.items()}
        sharded = [type(p).__name__ == "DTensor" for p in t.model.parameters()]
        torch.save({"params": params, "history": history, "sharded": all(sharded) and bool(sharded)},
                   os.path.join(args.out, "final.pt"))


if __name__ == "__main__":
    main()
