"""grpo_fast: a kernel-level GRPO training engine."""

__version__ = "0.1.0"
