"""The functional API for stacks that embed grpo_fast's ops (verl, OpenRLHF, hand-written loops).

Stable signatures; shapes and math are in each function's docstring:
- ``linear_logprobs(hidden [T, D], weight [V, D], targets [T], temperature, bias, return_entropy)`` → logp [T]
- ``grpo_loss(logp [N, L], old_logp, ref_logp, advantages [N], mask [N, L], options=LossOptions(...) | keywords)``
  → (loss, metrics)
- ``linear_grpo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, mask, ...)`` → (loss, metrics)
- ``group_advantages(rewards [N] | [N, R], group_size, weights, scale, ...)`` → (advantages [N], stats)
- ``SharedPrefixSampler(model, tokenizer).generate(prompts, group_size, ...)`` → SampleOutput
"""

from grpo_fast.kernels import (
    LossOptions,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
    linear_grpo_loss,
    linear_logprobs,
)
from grpo_fast.sampler import SampleOutput, SharedPrefixSampler

__all__ = [
    "LossOptions",
    "SampleOutput",
    "SharedPrefixSampler",
    "group_advantages",
    "grpo_loss",
    "high_entropy_mask",
    "linear_grpo_loss",
    "linear_logprobs",
]
