"""``FastGRPOTrainer``: TRL's GRPOTrainer with grpo_fast's fused LM-head log-probs and fused GRPO loss.

A TRL user changes one import::

    from grpo_fast.integrations.trl import FastGRPOTrainer as GRPOTrainer

Everything else is TRL's own code (rewards, advantages, logging, checkpoints, accelerate/DeepSpeed). Generation goes
through grpo_fast's shared-prefix sampler where it can serve the batch (``SharedPrefixGeneration``, trl_sampler.py;
``use_shared_prefix_sampler = False`` turns it off). Two more methods are replaced:

- ``_get_per_token_logps_and_entropies``: the decoder's final hidden states go into ``linear_logprobs`` (the head
  never produces a ``[T, V]`` logits tensor, forward or backward). The model is called as TRL calls it (same
  inputs, no ``position_ids``), so log-probs equal TRL's up to float rounding.
- ``_compute_loss``: ``grpo_loss`` (one fused kernel per direction on CUDA) with TRL's option names and
  normalizers, and TRL's metric names.

Options whose math lives outside the loss op fall back to TRL's own ``_compute_loss`` (still with our fused
log-probs): the off-policy sequence mask, vLLM importance-sampling correction, the entropy bonus and MoE aux loss.
Multimodal inputs fall back to TRL's log-prob path too. Metrics are exact for one process; with several, the
per-process means are averaged (TRL weights them by token counts).
"""

from __future__ import annotations

import functools

import torch

from grpo_fast.kernels.grpo_loss import LossOptions, grpo_loss, high_entropy_mask
from grpo_fast.kernels.logprob import linear_logprobs
from grpo_fast.models import lm_head_of

from .trl_sampler import SharedPrefixGeneration

try:
    from trl import GRPOTrainer as _TRLGRPOTrainer
except ImportError as e:  # pragma: no cover
    raise ImportError("grpo_fast.integrations.trl needs trl: pip install 'grpo_fast[test]' or 'trl>=1.16,<1.17'") from e

_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class FastGRPOTrainer(SharedPrefixGeneration, _TRLGRPOTrainer):
    """TRL's GRPOTrainer; generation runs on the shared-prefix sampler, log-probs and loss on grpo_fast's fused ops."""

    #: rows of hidden states per LM-head chunk on the CPU path (None: the op's default)
    logprob_chunk_size: int | None = None

    @functools.cached_property
    def loss_options(self) -> LossOptions:
        """The loss's options, built once from TRL's config (TRL's trainer reads the same fields, unchanged)."""
        return LossOptions.from_config(self.args)

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):
        sampled = self._take_sampled_logps(model, logits_to_keep, compute_entropy)
        if sampled is not None:
            return sampled, None, None
        if compute_aux_loss or any(multimodal.get(k) is not None for k in _MULTIMODAL):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal,
            )
        unwrapped = self.accelerator.unwrap_model(model)
        if hasattr(unwrapped, "get_base_model"):  # PEFT: the adapters live inside the base model's modules
            unwrapped = unwrapped.get_base_model()
        head = lm_head_of(unwrapped)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            with self.accelerator.autocast():
                hidden = unwrapped.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            hidden = hidden[:, -logits_to_keep - 1 : -1]  # [n, L, D]: the positions predicting each completion token
            targets = ids[:, -logits_to_keep:].masked_fill(mask[:, -logits_to_keep:] == 0, -100)  # [n, L]
            n, L, d = hidden.shape
            logp, entropy = linear_logprobs(
                hidden.reshape(n * L, d), head.weight, targets.reshape(-1), temperature=self.temperature / head.scale,
                bias=head.bias, return_entropy=True, chunk_size=self.logprob_chunk_size, softcap=head.softcap,
            )
            logps.append(logp.view(n, L))
            entropies.append(entropy.view(n, L))
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _compute_loss(self, model, inputs):
        uses_vllm_is = self.use_vllm and self.vllm_importance_sampling_correction
        if self.off_policy_mask_threshold is not None or uses_vllm_is or self._entropy_bonus_enabled:
            return super()._compute_loss(model, inputs)
        if self.aux_loss_enabled or any(inputs.get(k) is not None for k in _MULTIMODAL):
            return super()._compute_loss(model, inputs)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logp, entropy, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True
        )
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = high_entropy_mask(entropy, mask, self.top_entropy_quantile)
        advantages = inputs["advantages"]
        if advantages.dim() == 2:
            raise ValueError("per-token advantages [N, L] are not supported by grpo_fast's loss; use TRL's trainer")
        training = self.model.training
        ga = self.current_gradient_accumulation_steps if training else 1
        args = self.args
        loss, metrics = grpo_loss(
            logp, inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps") if self.beta != 0 else None,
            advantages, mask, self.loss_options,
            num_items_in_batch=inputs.get("num_items_in_batch"), entropy=entropy.detach(), entropy_mask=entropy_mask,
            gradient_accumulation_steps=ga,
            steps_per_generation=args.steps_per_generation if training else 1,
            num_processes=self.accelerator.num_processes,
        )
        mode = "train" if training else "eval"
        for name, value in metrics.items():
            value = self.accelerator.gather(value.detach().reshape(1)).nanmean().item()
            self._metrics[mode][name].append(value)
        return loss
