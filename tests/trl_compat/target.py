"""The trainer under test, chosen by ``GRPO_FAST_TRL_TARGET``: the only line of TRL's test file that differs from
TRL's is the import of ``GRPOConfig`` and ``GRPOTrainer`` from here.

- ``trl``: TRL's own ``GRPOTrainer`` (the reference the counts are measured against);
- ``fast``: ``grpo_fast.integrations.trl.FastGRPOTrainer`` (TRL's trainer on grpo_fast's ops) with TRL's config;
- ``fast-trl-generation``: the same with ``use_shared_prefix_sampler = False`` (TRL's own generation);
- ``grpo_fast``: ``grpo_fast.GRPOTrainer`` with ``grpo_fast.GRPOConfig``.
"""

from __future__ import annotations

import os

TARGETS = ("trl", "fast", "fast-trl-generation", "grpo_fast")
TARGET = os.environ.get("GRPO_FAST_TRL_TARGET", "trl")

if TARGET == "trl":
    from trl import GRPOConfig, GRPOTrainer
elif TARGET == "fast":
    from trl import GRPOConfig

    from grpo_fast.integrations.trl import FastGRPOTrainer as GRPOTrainer
elif TARGET == "fast-trl-generation":
    from trl import GRPOConfig

    from grpo_fast.integrations.trl import FastGRPOTrainer

    class GRPOTrainer(FastGRPOTrainer):
        use_shared_prefix_sampler = False
elif TARGET == "grpo_fast":
    from grpo_fast import GRPOConfig, GRPOTrainer
else:
    raise ValueError(f"GRPO_FAST_TRL_TARGET must be one of {', '.join(TARGETS)}; got {TARGET!r}")

__all__ = ["GRPOConfig", "GRPOTrainer", "TARGET", "TARGETS"]
