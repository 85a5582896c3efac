"""grpo_fast: a kernel-level GRPO training engine.

The public surface, imported lazily so ``import grpo_fast`` stays cheap:
- ``GRPOConfig``, ``GRPOTrainer``: TRL's GRPOTrainer interface (``from grpo_fast import GRPOTrainer``);
- the ops ``linear_logprobs``, ``grpo_loss``, ``linear_grpo_loss``, ``group_advantages`` and the
  ``SharedPrefixSampler``, for stacks that embed them (also under ``grpo_fast.ops``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GRPOConfig": "grpo_fast.config",
    "GRPOTrainer": "grpo_fast.trainer",
    "SharedPrefixSampler": "grpo_fast.sampler",
    "linear_logprobs": "grpo_fast.kernels.logprob",
    "grpo_loss": "grpo_fast.kernels.grpo_loss",
    "linear_grpo_loss": "grpo_fast.kernels.linear_grpo_loss",
    "group_advantages": "grpo_fast.kernels.advantages",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'grpo_fast' has no attribute {name!r}")
