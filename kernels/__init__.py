"""Triton ops of grpo_fast, installed as ``grpo_fast.kernels``. Imports torch and triton only (triton optional)."""

from .advantages import group_advantages, group_advantages_ref
from .grpo_loss import grpo_loss, grpo_loss_ref, high_entropy_mask
from .linear_grpo_loss import linear_grpo_loss
from .logprob import linear_logprobs, linear_logprobs_ref
from .loss_options import LossOptions

__all__ = [
    "LossOptions",
    "group_advantages",
    "group_advantages_ref",
    "grpo_loss",
    "grpo_loss_ref",
    "high_entropy_mask",
    "linear_grpo_loss",
    "linear_logprobs",
    "linear_logprobs_ref",
]
