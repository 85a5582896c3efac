"""GRPOTrainer: TRL 1.16's ``GRPOTrainer`` (a ``transformers.Trainer``) with grpo_fast's engine at TRL's own seams.

A TRL user changes one import (``from grpo_fast import GRPOTrainer, GRPOConfig``) and keeps every behaviour:
datasets, reward functions and reward models, ``trainer.state``, callbacks, ``evaluate``, checkpoints, logging,
``accelerate launch`` (DDP / FSDP / DeepSpeed) are TRL's and transformers' code. The engine sits at four seams
(``grpo_fast.integrations.trl``):

- generation (``_generate_single_turn``): the shared-prefix sampler prefills each prompt once for its G completions;
  its log-probs stand in for TRL's old-log-prob forward;
- log-probs (``_get_per_token_logps_and_entropies``): the fused LM-head op (no ``[T, V]`` logits) and the
  shared-prefix forward (each prompt once per group); minibatches shuffle whole groups (``_prepare_inputs``);
- loss (``_compute_loss``): the fused ``grpo_loss`` op.

This class adds what TRL has no counterpart for, each switchable in ``GRPOConfig`` (see grpo_fast/config.py):
reward functions that hang or crash cost their rewards, not the run (``reward_timeout``, ``reward_errors``); an
optimizer step with a non-finite gradient is skipped (``max_consecutive_skipped_steps``); sampling seeds are
counter-based per (seed, step, prompt's index in the global batch), so a resumed run samples what the
uninterrupted one would have; zero-std groups can be replaced by fresh prompts' groups (DAPO's dynamic sampling,
``skip_zero_std_groups``, grpo_fast/dynamic_sampling.py); and ``metrics.png`` is written at the end (``plot``).
Two conveniences: ``model="smollm2"`` is the embedded SmolLM2-135M-Instruct (nothing is downloaded), and a list of
row dicts is accepted as a dataset. Given TRL's own ``trl.GRPOConfig``, these take their defaults.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from grpo_fast.config import GRPOConfig, own_option
from grpo_fast.dynamic_sampling import DynamicSampling
from grpo_fast.integrations.trl import FastGRPOTrainer
from grpo_fast.metrics import PlotCallback
from grpo_fast.models import DEFAULT_MODEL, default_model_path
from grpo_fast.reward_calls import guard_reward_func

logger = logging.getLogger(__name__)

_MASK62 = (1 << 62) - 1


class GRPOTrainer(DynamicSampling, FastGRPOTrainer):
    """``trl.GRPOTrainer``'s interface and behaviour, on grpo_fast's sampler, fused log-probs and fused loss."""

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None, *rest, **kwargs):
        if model in (DEFAULT_MODEL, "default"):  # the embedded SmolLM2 (a Hub id stays TRL's to resolve)
            model = str(default_model_path())
        if args is None:  # as TRL names it, with our config class
            from trl.trainer.utils import get_config_model_id

            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = GRPOConfig(f"{name.rstrip('/').split('/')[-1]}-GRPO")
        train_dataset, eval_dataset = _as_dataset(train_dataset), _as_dataset(eval_dataset)
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, *rest, **kwargs)
        self.use_shared_prefix_sampler = own_option(self.args, "use_shared_prefix_sampler")
        self.use_shared_prefix_update = own_option(self.args, "use_shared_prefix_update")
        timeout = own_option(self.args, "reward_timeout")
        isolate = own_option(self.args, "reward_errors") == "unscored"
        if isolate or timeout is not None:
            self.reward_funcs = [
                func if isinstance(func, torch.nn.Module) else guard_reward_func(func, name, timeout, isolate)
                for func, name in zip(self.reward_funcs, self.reward_func_names, strict=True)
            ]
        self._skipped_in_a_row = 0
        if own_option(self.args, "plot"):
            self.add_callback(PlotCallback())

    # -- sampling seeds ------------------------------------------------------------------------------------------
    def _prompt_seeds(self, count: int) -> list[int]:
        """One sampling seed per prompt of this generation call, from (seed, optimizer step, train/eval, the
        prompt's index in the step's global prompt stream): a completion depends on nothing else (not the global
        RNG, not the other prompts), so a run resumed from a checkpoint samples what the uninterrupted run sampled,
        and 2 ranks × b prompts sample what 1 rank × 2b does. Every process makes the same calls with the same
        ``count`` (TRL's gathers need it), so after ``_seed_offset`` prompts per process have been sampled this step
        (dynamic sampling's later rounds), prompt i of process r is number ``world · offset + r · count + i``."""
        base = (self.args.seed * 1_000_003 + self.state.global_step) * 2 + int(self.model.training)
        first = self.accelerator.num_processes * self._seed_offset + self.accelerator.process_index * count
        return [(base * 1_000_003 + first + i) & _MASK62 for i in range(count)]

    # -- non-finite steps ----------------------------------------------------------------------------------------
    _step_grad_norm = None

    def _get_grad_norm(self, model, grad_norm=None):
        """transformers' pre-step gradient norm (global over ranks), kept for the non-finite check."""
        self._step_grad_norm = super()._get_grad_norm(model, grad_norm)
        return self._step_grad_norm

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if not getattr(optimizer, "_grpo_fast_guarded", False):
            optimizer.step = self._guarded_step(optimizer.step, optimizer)
            optimizer._grpo_fast_guarded = True
        return optimizer

    def _guarded_step(self, step, optimizer):
        """``optimizer.step`` that skips the update when any gradient is not finite (on any rank), logs
        ``skipped_steps``, and stops the run after ``max_consecutive_skipped_steps`` skips in a row."""
        limit = own_option(self.args, "max_consecutive_skipped_steps")

        @functools.wraps(step)
        def guarded(*args, **kwargs):
            # the global gradient norm transformers computed just before this step (clipping or logging) is finite
            # exactly when every gradient is, on every rank; without it (a custom loop) the gradients are read
            norm, self._step_grad_norm = self._step_grad_norm, None
            finite = _gradients_finite(optimizer) if norm is None else math.isfinite(float(norm))
            self._metrics["train"]["skipped_steps"].append(0.0 if finite else 1.0)
            if finite:
                self._skipped_in_a_row = 0
                return step(*args, **kwargs)
            self._skipped_in_a_row += 1
            logger.warning("optimizer step %d skipped: a gradient is not finite (%d in a row)",
                           self.state.global_step + 1, self._skipped_in_a_row)
            if self._skipped_in_a_row > limit:
                raise RuntimeError(
                    f"{self._skipped_in_a_row} consecutive optimizer steps had a non-finite gradient "
                    f"(max_consecutive_skipped_steps={limit}); stopping. Likely causes: learning_rate too high, "
                    "non-finite rewards or advantages reaching the loss, or a bf16/fp16 overflow."
                )
            return None

        return guarded


def _as_dataset(data):
    """A list of row dicts becomes a ``datasets.Dataset`` (TRL takes datasets only); anything else is passed on."""
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        from datasets import Dataset

        return Dataset.from_list(data)
    return data


def _gradients_finite(optimizer) -> bool:
    """Whether every gradient the optimizer holds is finite, agreed over all ranks (FSDP shards gradients)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # DTensor shards (FSDP2)
    if grads:
        device = grads[0].device
        finite = torch.stack([torch.isfinite(g).all().to(device) for g in grads]).all().float()
    else:
        finite = torch.ones((), device="cuda" if torch.cuda.is_available() else "cpu")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


__all__ = ["GRPOConfig", "GRPOTrainer"]
