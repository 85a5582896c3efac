"""Greedy accuracy on held-out prompts (what ``make demo`` reports before and after training): one greedy completion
per prompt from the shared-prefix sampler, scored by TRL-style reward functions."""

from __future__ import annotations

import torch

from trl.data_utils import is_conversational

from grpo_fast.sampler import SharedPrefixSampler


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A row's prompt (text, or chat messages through the chat template with the generation prompt) → token ids,
    as TRL tokenizes them."""
    if is_conversational({"prompt": prompt}):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids  # transformers 5 returns a BatchEncoding
    elif isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        raise TypeError(f"prompt must be a string or a list of chat messages; got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to zero tokens")
    return list(ids)


def greedy_accuracy(model, tokenizer, rows: list[dict], reward_funcs, max_new_tokens: int = 32,
                    batch_prompts: int = 16) -> dict[str, float]:
    """Mean of each reward function (``eval_rewards/<name>/mean``) and of their sum (``eval_reward``) over one
    greedy completion per row of ``rows`` (dicts with ``prompt`` and the reward functions' columns)."""
    if not rows:
        raise ValueError("rows is empty: greedy_accuracy needs at least one prompt")
    sampler = SharedPrefixSampler(model, tokenizer)
    names = [getattr(f, "__name__", type(f).__name__) for f in reward_funcs]
    scores = []
    for start in range(0, len(rows), batch_prompts):
        chunk = rows[start : start + batch_prompts]
        prompts = [r["prompt"] for r in chunk]
        out = sampler.generate([encode_prompt(tokenizer, p) for p in prompts], group_size=1,
                               max_new_tokens=max_new_tokens, temperature=0.0)
        texts = list(out.texts)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            completions = texts
        columns = {k: [r[k] for r in chunk] for k in chunk[0] if k != "prompt"}
        values = [[float("nan") if v is None else float(v) for v in f(prompts=prompts, completions=completions,
                                                                        **columns)] for f in reward_funcs]
        scores.append(torch.tensor(values).T)  # [n, R]
    rewards = torch.cat(scores)
    metrics = {f"eval_rewards/{name}/mean": torch.nanmean(rewards[:, i]).item() for i, name in enumerate(names)}
    metrics["eval_reward"] = torch.nanmean(rewards.nansum(1)).item()
    return metrics
