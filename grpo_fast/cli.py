"""``grpo-fast``: train, sample and eval from the command line.

    grpo-fast train --model smollm2 --task arithmetic [--<GRPOConfig field> VALUE ...] [--config file.yaml]
    grpo-fast sample --model smollm2 --prompt "What is 7 + 5?" --num_generations 4 [--answer 12]
    grpo-fast eval --model outputs/demo/checkpoint-40 --task arithmetic --num_prompts 100

Every GRPOConfig field is a flag of ``train`` under its own name. ``--model`` takes a local Hugging Face folder
(a checkpoint included) or ``smollm2``, the embedded default. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TASK_REWARDS = {"arithmetic": ["accuracy"], "countdown": ["countdown"], "jsonl": ["accuracy"]}


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="arithmetic", help="arithmetic | countdown | a JSONL file with prompt/answer")
    p.add_argument("--task_size", type=int, default=2000, help="number of generated training prompts")
    p.add_argument("--task_digits", type=int, default=2, help="arithmetic: digits per operand")
    p.add_argument("--task_ops", default="+", help="arithmetic: operators to draw from, e.g. '+-'")
    p.add_argument("--task_chat", default="true", help="true: chat-format prompts (chat template applied)")
    p.add_argument("--task_seed", type=int, default=0)
    p.add_argument("--rewards", default=None, help="comma-separated built-in reward names (default: the task's)")


def _rows(args, split: str, n: int) -> list[dict]:
    from grpo_fast.tasks import get_task, load_jsonl

    if args.task.endswith(".jsonl") or Path(args.task).is_file():
        return load_jsonl(args.task)
    kw = {}
    if args.task == "arithmetic":
        kw = {"digits": args.task_digits, "ops": tuple(args.task_ops), "chat": args.task_chat.lower() == "true"}
    return get_task(args.task, n=n, seed=args.task_seed, split=split, **kw)


def _reward_funcs(args):
    from grpo_fast.rewards import get_reward_funcs

    task = "jsonl" if args.task.endswith(".jsonl") else args.task
    names = args.rewards.split(",") if args.rewards else TASK_REWARDS.get(task, ["accuracy"])
    return get_reward_funcs(names)


def _config(values: dict, flags: list[str]):
    """``GRPOConfig`` from a config file's values, then ``--<field> VALUE`` flags (transformers' parser, so every
    TRL / TrainingArguments field is a flag under its own name). An unknown key names the closest valid one.
    ``bf16`` also takes ``auto``: bf16 where the machine computes it natively (``native_bf16``), else fp32."""
    import dataclasses
    import difflib

    import torch
    from transformers import HfArgumentParser

    from grpo_fast.config import GRPOConfig, native_bf16

    auto_flag = [i for i, f in enumerate(flags)
                 if f == "--bf16=auto" or (f == "auto" and i and flags[i - 1] == "--bf16")]
    if auto_flag or str(values.get("bf16")).lower() == "auto":
        native = native_bf16()
        values = {**values, "bf16": native}
        if native and not torch.cuda.is_available():
            values.setdefault("use_cpu", True)  # transformers refuses bf16 without a GPU unless use_cpu is set
        flags = [(str(native) if f == "auto" else f"--bf16={native}") if i in auto_flag else f
                 for i, f in enumerate(flags)]

    fields = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}

    def unknown(what, key):
        close = difflib.get_close_matches(key.lstrip("-"), sorted(fields), n=1)
        raise SystemExit(f"grpo-fast train: unknown {what} {key!r}" + (f"; did you mean {close[0]!r}?" if close
                                                                      else ""))

    for key in values:
        if key not in fields:
            unknown("config key", key)
    parser = HfArgumentParser(GRPOConfig)
    parser.set_defaults(**values)
    config, rest = parser.parse_args_into_dataclasses(flags, return_remaining_strings=True, look_for_args_file=False)
    if rest:
        unknown("flag", rest[0])
    return config


def _summary(log_history: list[dict]) -> dict:
    """Reward over the first / last 5 logged steps and mean entropy over the last 20 (the demo's criteria)."""
    steps = [e for e in log_history if "reward" in e]
    mean = lambda es, k: sum(e[k] for e in es) / len(es) if es else None  # noqa: E731
    return {"steps_logged": len(steps), "reward_first5": mean(steps[:5], "reward"),
            "reward_last5": mean(steps[-5:], "reward"), "entropy_first20": mean(steps[:20], "entropy"),
            "entropy_last20": mean(steps[-20:], "entropy")}


def cmd_train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grpo-fast train", description="GRPO on a task or a JSONL dataset; any other "
                                "--<GRPOConfig field> VALUE flag sets that field")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--config", default=None, help="YAML/JSON file of GRPOConfig fields (and model/task keys)")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in output_dir")
    p.add_argument("--eval_prompts", type=int, default=0, help="greedy accuracy on N held-out prompts before/after")
    _task_args(p)
    pre, _ = p.parse_known_args(argv)
    values = _load_file(pre.config) if pre.config else {}
    own = {a.dest for a in p._actions} - {"help"}
    p.set_defaults(**{k: values.pop(k) for k in list(values) if k in own})  # the file's model/task keys
    args, flags = p.parse_known_args(argv)
    config = _config(values, flags)

    from grpo_fast.evaluation import greedy_accuracy
    from grpo_fast.models import load_model
    from grpo_fast.trainer import GRPOTrainer

    model, tokenizer = load_model(args.model)
    reward_funcs = _reward_funcs(args)
    eval_rows = _rows(args, "eval", args.eval_prompts)[: args.eval_prompts] if args.eval_prompts else None
    trainer = GRPOTrainer(model, reward_funcs, args=config, train_dataset=_rows(args, "train", args.task_size),
                          processing_class=tokenizer)

    def evaluate():
        return greedy_accuracy(trainer.model, tokenizer, eval_rows, reward_funcs, config.max_completion_length)

    before = evaluate() if eval_rows else None
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    wall = time.perf_counter() - t0
    after = evaluate() if eval_rows else None
    if not trainer.is_world_process_zero():
        return 0
    out = Path(config.output_dir)
    summary = {"wall_clock_s": wall, "global_step": trainer.state.global_step, **_summary(trainer.state.log_history),
               "eval_before": before, "eval_after": after}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    print(f"\ntrained {trainer.state.global_step} steps in {wall:.0f}s; reward first-5 {summary['reward_first5']:.3f} "
          f"-> last-5 {summary['reward_last5']:.3f}; entropy last-20 {summary['entropy_last20']:.3f}")
    if before is not None:
        print(f"greedy eval before: {before}\ngreedy eval after:  {after}")
    print(f"summary: {out / 'summary.json'}\nplot:    {out / 'metrics.png'}")
    return 0


def _load_file(path: str) -> dict:
    """A YAML (or JSON) mapping of config / script keys."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"grpo-fast train: {path} must hold a mapping of keys to values")
    return values


def cmd_sample(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grpo-fast sample", description="sample a group of completions for a prompt")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", default="true", help="true: apply the chat template to the prompt")
    p.add_argument("--num_generations", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--answer", default=None, help="gold answer: prints each completion's accuracy reward")
    args = p.parse_args(argv)
    from grpo_fast.evaluation import encode_prompt
    from grpo_fast.models import load_model
    from grpo_fast.rewards import get_reward_funcs
    from grpo_fast.sampler import SharedPrefixSampler

    model, tokenizer = load_model(args.model)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat.lower() == "true" else args.prompt
    ids = encode_prompt(tokenizer, prompt)
    out = SharedPrefixSampler(model, tokenizer).generate(
        [ids],
        group_size=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    rewards = [None] * len(out.texts)
    if args.answer is not None:
        rewards = get_reward_funcs(["accuracy"])[0](
            prompts=[prompt] * len(out.texts), completions=list(out.texts), answer=[args.answer] * len(out.texts)
        )
    for i, (text, reason, r) in enumerate(zip(out.texts, out.finish_reasons, rewards)):
        print(f"--- completion {i} ({reason}{'' if r is None else f', reward {r}'})\n{text}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grpo-fast eval", description="greedy accuracy on a task's held-out prompts")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--num_prompts", type=int, default=100)
    p.add_argument("--max_completion_length", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    _task_args(p)
    args = p.parse_args(argv)
    from grpo_fast.evaluation import greedy_accuracy
    from grpo_fast.models import load_model

    model, tokenizer = load_model(args.model)
    rows = _rows(args, "eval", args.num_prompts)[: args.num_prompts]
    metrics = greedy_accuracy(model, tokenizer, rows, _reward_funcs(args), args.max_completion_length)
    result = {"model": args.model, "task": args.task, "num_prompts": len(rows), **metrics}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        print(f"commands: {', '.join(COMMANDS)}")
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
