"""Triton ops of grpo_fast, installed as ``grpo_fast.kernels``. Imports torch and triton only."""
