"""TRL's generation seam served by grpo_fast's ``SharedPrefixSampler``: each group's prompt is prefilled once and its
G completions decode against that one KV prefix, instead of transformers' ``generate`` on G copies of the prompt.

``SharedPrefixGeneration`` overrides ``GRPOTrainer._generate_single_turn`` (TRL 1.16), the narrowest seam: TRL still
tokenizes prompts, decodes completions, runs tools, rewards and everything after. It honours TRL's sampling options
(temperature, top_p, top_k, min_p, repetition_penalty, max_completion_length, the EOS ids) and returns the sampler's
per-token log-probs, which TRL keeps as ``sampling_per_token_logps``. When completions serve several optimizer steps
(TRL then recomputes "old" log-probs with an extra forward pass), the sampler's log-probs (log softmax(logits / T)
of the same weights) stand in for that pass.

TRL's own path runs instead, for: vLLM and continuous batching (their own engines), multimodal prompts, tools and
environments (multi-turn), ``generation_kwargs`` beyond the options above (named in a warning), greedy decoding
(``do_sample=False``), a ``cache_implementation``, and models the sampler cannot serve (attention outside
transformers' AttentionInterface, non-attention layers, attention soft-capping or sinks, a sliding window shorter
than prompt + completion).
"""

from __future__ import annotations

import logging

import torch

from grpo_fast.sampler import SharedPrefixSampler

logger = logging.getLogger(__name__)

# TRL's own generation kwargs (trl/trainer/grpo_trainer.py, the GenerationConfig it builds); anything else a user
# adds through ``GRPOConfig.generation_kwargs`` sends generation back to transformers' generate.
_HONOURED = {"max_new_tokens", "do_sample", "pad_token_id", "bos_token_id", "eos_token_id", "temperature", "top_p",
             "top_k", "min_p", "repetition_penalty", "cache_implementation"}
_ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


def sampler_refusal(model, longest_prompt: int, max_new_tokens: int) -> str | None:
    """Why ``SharedPrefixSampler`` cannot serve ``model`` for this batch, or None when it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if not getattr(base, "_supports_attention_backend", False):
        return f"{type(base).__name__} does not route attention through transformers' AttentionInterface"
    kinds = set(getattr(config, "layer_types", None) or ()) - _ATTENTION_LAYERS
    if kinds:
        return f"{type(base).__name__} has non-attention layers ({', '.join(sorted(kinds))})"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    if any(hasattr(m, "sinks") for m in base.modules()):
        return "attention sinks"
    window = getattr(config, "sliding_window", None)
    if window is not None and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        if window < longest_prompt + max_new_tokens:
            return f"a sliding window of {window} tokens < prompt + completion ({longest_prompt + max_new_tokens})"
    return None


def _runs(prompt_ids: list[list[int]]) -> list[tuple[list[int], int]]:
    """Consecutive identical prompts as (prompt, count): TRL's sampler repeats each prompt num_generations times."""
    runs: list[tuple[list[int], int]] = []
    for ids in prompt_ids:
        if runs and runs[-1][0] == ids:
            runs[-1] = (ids, runs[-1][1] + 1)
        else:
            runs.append((list(ids), 1))
    return runs


class SharedPrefixGeneration:
    """Mixin for TRL's ``GRPOTrainer`` (put it first in the bases): generation by ``SharedPrefixSampler``."""

    #: False: always generate with TRL's own path
    use_shared_prefix_sampler: bool = True

    _sampled_logps: torch.Tensor | None = None  # [N, L], the sampler's log-probs awaiting TRL's old-log-prob pass
    _fallback_warned: frozenset[str] = frozenset()

    def _shared_prefix_fallback(self, prompt_ids, images, multimodal_fields) -> str | None:
        if not self.use_shared_prefix_sampler:
            return "use_shared_prefix_sampler is False"
        if self.use_vllm or self.use_transformers_continuous_batching:
            return "vLLM / continuous batching generate with their own engine"
        if self._is_vlm or images is not None or multimodal_fields:
            return "multimodal prompts"
        if self.tools or self.environment_factories is not None:
            return "tools and environments (multi-turn)"
        extra = set(self.args.generation_kwargs or {}) - _HONOURED
        if extra:
            return f"generation_kwargs {sorted(extra)} are not implemented by the shared-prefix sampler"
        cfg = self.generation_config
        if not cfg.do_sample:
            return "greedy decoding (do_sample=False)"
        if getattr(cfg, "cache_implementation", None) is not None:
            return f"cache_implementation={cfg.cache_implementation!r}"
        model = self.accelerator.unwrap_model(self.model)
        return sampler_refusal(model, max(len(p) for p in prompt_ids), cfg.max_new_tokens)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        reason = self._shared_prefix_fallback(prompt_ids, images, multimodal_fields)
        if reason is not None:
            if reason not in self._fallback_warned:
                self._fallback_warned = self._fallback_warned | {reason}
                logger.warning("FastGRPOTrainer generates with TRL's path: %s", reason)
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        from trl.models import unwrap_model_for_generation

        cfg = self.generation_config
        eos = cfg.eos_token_id
        args = self.args
        completion_ids, logprobs = [], []
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
            # one autocast region around the whole call (the model's forward autocasts anyway, as TRL's generate
            # does): the sampler then casts each weight once per call, not once per decode step
            self.accelerator.autocast(),
        ):
            # no tokenizer: TRL decodes the completions itself, and no stop strings are passed (they would need one)
            sampler = SharedPrefixSampler(unwrapped_model)
            runs = _runs(prompt_ids)
            seeds = self._prompt_seeds(len(runs))
            # one call for the whole batch when every prompt has the same group size (the usual case)
            batches = [runs] if len({count for _, count in runs}) == 1 else [[run] for run in runs]
            first = 0
            for batch in batches:
                seed = None if seeds is None else seeds[first : first + len(batch)]
                first += len(batch)
                out = sampler.generate(
                    [prompt for prompt, _ in batch], group_size=batch[0][1], max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p if cfg.top_p is not None else 1.0, top_k=cfg.top_k or None, min_p=cfg.min_p,
                    repetition_penalty=cfg.repetition_penalty if cfg.repetition_penalty is not None else 1.0,
                    eos_token_id=eos, seed=seed,
                )
                lengths = out.completion_mask.sum(dim=1).tolist()
                for ids, lps, n in zip(out.completion_ids.tolist(), out.logprobs.tolist(), lengths, strict=True):
                    completion_ids.append(ids[:n])
                    logprobs.append(lps[:n])
        if self._old_logps_recomputed():
            width = max((len(c) for c in completion_ids), default=0)
            stash = torch.zeros(len(logprobs), width)
            for row, lps in enumerate(logprobs):
                stash[row, : len(lps)] = torch.tensor(lps)
            self._sampled_logps = stash
        return completion_ids, logprobs

    #: prompts per process already sampled in this step before the current generation call (see _prompt_seeds)
    _seed_offset: int = 0

    def _prompt_seeds(self, count: int) -> list[int] | None:
        """Sampling seeds for the ``count`` prompts of a generation call; None: drawn from torch's global RNG."""
        return None

    def _old_logps_recomputed(self) -> bool:
        """TRL 1.16's condition for its extra no-grad forward pass computing ``old_per_token_logps``."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 and not self.use_vllm

    def _generate_and_score_completions(self, inputs):
        self._sampled_logps = None
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._sampled_logps = None

    def _take_sampled_logps(self, model, logits_to_keep: int, compute_entropy: bool) -> torch.Tensor | None:
        """The sampler's log-probs in place of TRL's old-log-prob forward pass: that pass is the first no-grad call
        on the policy after generation (the reference pass comes later, or uses another model)."""
        if self._sampled_logps is None or compute_entropy or torch.is_grad_enabled() or model is not self.model:
            return None
        logps, self._sampled_logps = self._sampled_logps, None
        width = logps.size(1)
        if width < logits_to_keep:  # TRL pads completions further (pad_to_multiple_of); pads are masked out
            logps = torch.nn.functional.pad(logps, (0, logits_to_keep - width))
        return logps[:, :logits_to_keep].to(self.accelerator.device)
