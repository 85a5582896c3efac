"""``FastGRPOTrainer``: TRL's GRPOTrainer with grpo_fast's fused LM-head log-probs and fused GRPO loss.

A TRL user changes one import::

    from grpo_fast.integrations.trl import FastGRPOTrainer as GRPOTrainer

Everything else is TRL's own code (rewards, advantages, logging, checkpoints, accelerate/DeepSpeed). Generation goes
through grpo_fast's shared-prefix sampler where it can serve the batch (``SharedPrefixGeneration``, trl_sampler.py;
``use_shared_prefix_sampler = False`` turns it off). Two more methods are replaced:

- ``_get_per_token_logps_and_entropies``: the decoder's final hidden states go into ``linear_logprobs`` (the head
  never produces a ``[T, V]`` logits tensor, forward or backward). When consecutive rows share a prompt (TRL's
  groups), the decoder runs once over the packed batch of ``shared_prefix_hidden_states`` (each prompt once, its
  completions attending to it: B·P + N·L tokens instead of N·(P + L)), with TRL's positions (a prompt after k pads
  starts at k, completion token t sits at P + t); otherwise it is called as TRL calls it (same inputs, no
  ``position_ids``). Either way log-probs equal TRL's up to float rounding, and every caller goes through here: the
  policy update, the no-grad old-log-prob pass, the reference model and the adapters-disabled reference.
  ``use_shared_prefix_update = False`` turns the packed forward off.
- ``_prepare_inputs``: TRL shuffles the generation batch row-wise before cutting it into ``steps_per_generation``
  minibatches; here whole groups (``num_generations`` consecutive rows) are shuffled, with the same global torch
  RNG, so every minibatch holds whole groups and the update shares each prompt. When a minibatch
  (``per_device_train_batch_size``) is not a multiple of ``num_generations`` TRL's row shuffle stays.
- ``_compute_loss``: ``grpo_loss`` (one fused kernel per direction on CUDA) with TRL's option names and
  normalizers, and TRL's metric names.

Options whose math lives outside the loss op fall back to TRL's own ``_compute_loss`` (still with our fused
log-probs): the off-policy sequence mask, vLLM importance-sampling correction, the entropy bonus and MoE aux loss.
Multimodal inputs fall back to TRL's log-prob path too. Metrics are exact for one process; with several, the
per-process means are averaged (TRL weights them by token counts).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Sequence

import torch

from grpo_fast.kernels.grpo_loss import LossOptions, grpo_loss, high_entropy_mask
from grpo_fast.kernels.logprob import linear_logprobs
from grpo_fast.models import lm_head_of
from grpo_fast.shared_prefix import PolicyBatch, can_share_prefix, shared_prefix_hidden_states

from .trl_sampler import SharedPrefixGeneration

try:
    from trl import GRPOTrainer as _TRLGRPOTrainer
    from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid
except ImportError as e:  # pragma: no cover
    raise ImportError("grpo_fast.integrations.trl needs trl: pip install 'grpo_fast[test]' or 'trl>=1.16,<1.17'") from e

_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")

logger = logging.getLogger(__name__)


def prompt_runs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of consecutive rows holding the same prompt (same tokens under the same mask), in row
    order: ``[n, P]`` → run lengths summing to n (one host sync)."""
    n = prompt_ids.size(0)
    key = prompt_ids.masked_fill(prompt_mask == 0, 0)  # [n, P]: pad tokens may differ, the prompt may not
    same = (key[1:] == key[:-1]).all(1) & (prompt_mask[1:] == prompt_mask[:-1]).all(1)  # [n - 1]
    starts = [0, *(torch.nonzero(~same).flatten() + 1).tolist(), n]
    return [b - a for a, b in zip(starts, starts[1:])]


def chunk_runs(runs: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive runs packed into chunks of at most ``batch_size`` rows (TRL's memory bound); a run longer than
    ``batch_size`` is a chunk of its own, since a group is never split."""
    chunks: list[list[int]] = []
    for run in runs:
        if chunks and sum(chunks[-1]) + run <= batch_size:
            chunks[-1].append(run)
        else:
            chunks.append([run])
    return chunks


def shuffle_groups(seq_dict: dict, group_size: int) -> dict:
    """TRL's ``shuffle_sequence_dict`` with groups of ``group_size`` consecutive rows moved as units: one
    ``torch.randperm`` over the groups (the global torch RNG, as TRL's row shuffle uses)."""
    n = len(next(v for v in seq_dict.values() if v is not None))
    if n % group_size:
        raise ValueError(f"{n} rows do not split into groups of num_generations={group_size}")
    order = torch.randperm(n // group_size)[:, None] * group_size + torch.arange(group_size)  # [B, G]
    perm = order.flatten()  # [N]

    def permute(v):
        if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
            return v
        if isinstance(v, torch.Tensor):
            return v[perm]
        return [v[i] for i in perm]

    return {key: permute(val) for key, val in seq_dict.items()}


def call_as_forward(model: torch.nn.Module, fn, *args):
    """``fn(*args)`` run as the forward of ``model``, the module TRL hands us (a DDP wrapper, an FSDP2-sharded root,
    or the plain model), so its forward hooks run: DDP prepares its gradient all-reduce only inside its own
    forward (a decoder called directly trains each replica on its own gradients), FSDP2 gathers the root's
    parameters (embeddings, final norm, LM head) in its root pre-forward hook. ``fn`` becomes the instance's
    ``forward`` for this one call (as accelerate itself wraps ``forward`` for mixed precision)."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    saved = inner.__dict__.get("forward")
    inner.forward = fn
    try:
        return model(*args)
    finally:
        if saved is None:
            del inner.forward
        else:
            inner.forward = saved


class FastGRPOTrainer(SharedPrefixGeneration, _TRLGRPOTrainer):
    """TRL's GRPOTrainer; generation runs on the shared-prefix sampler, log-probs and loss on grpo_fast's fused ops."""

    #: rows of hidden states per LM-head chunk on the CPU path (None: the op's default)
    logprob_chunk_size: int | None = None
    #: False: the decoder always runs on TRL's padded rows, and minibatches are TRL's row shuffle
    use_shared_prefix_update: bool = True

    _update_warned: frozenset[str] = frozenset()

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
        L = logits_to_keep
        runs = self._shared_prefix_runs(unwrapped, input_ids, attention_mask, L)
        n = input_ids.size(0)
        batch_size = batch_size or n
        if runs is None:  # TRL's chunks of rows
            chunks = [[min(batch_size, n - start)] for start in range(0, n, batch_size)]
        else:  # chunks of whole groups
            chunks = chunk_runs(runs, batch_size)
        def chunk_logps(ids, mask, chunk):  # [n, P + L] → log-probs and entropies [n, L]
            rows = ids.size(0)
            with self.accelerator.autocast():
                if runs is None:
                    hidden = unwrapped.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
                    hidden = hidden[:, -L - 1 : -1]  # [n, L, D]: the positions predicting each completion token
                else:
                    hidden = self._shared_prefix_hidden(unwrapped, ids, mask, L, chunk)  # [n, L, D]
                # The head computes as TRL's fused head does: under the autocast (bf16 GEMMs), or in fp32 outside it
                # with cast_lm_head_to_fp32 (TRL's __init__ cast the weight).
                head_precision = contextlib.nullcontext()
                if self.args.cast_lm_head_to_fp32:
                    hidden = hidden.float()
                    head_precision = torch.autocast(hidden.device.type, enabled=False)
                head = lm_head_of(unwrapped)  # read inside the forward: FSDP2 has gathered the root's (head's) weight
                targets = ids[:, -L:].masked_fill(mask[:, -L:] == 0, -100)  # [n, L]
                with head_precision:
                    logp, entropy = linear_logprobs(
                        hidden.reshape(rows * L, -1), head.weight, targets.reshape(-1),
                        temperature=self.temperature / head.scale, bias=head.bias, return_entropy=True,
                        chunk_size=self.logprob_chunk_size, softcap=head.softcap,
                    )
            return logp.view(rows, L), entropy.view(rows, L)

        logps, entropies = [], []
        start = 0
        for chunk in chunks:
            rows = sum(chunk)
            ids = input_ids[start : start + rows]
            mask = attention_mask[start : start + rows]
            start += rows
            logp, entropy = call_as_forward(model, chunk_logps, ids, mask, chunk)
            logps.append(logp)
            entropies.append(entropy)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _shared_prefix_runs(self, model, input_ids, attention_mask, L: int) -> list[int] | None:
        """The prompt runs of this batch when the packed forward can serve it (some rows share a prompt, prompts
        are left-padded, the model supports it), else None."""
        if not self.use_shared_prefix_update:
            return None
        P = input_ids.size(1) - L
        if P < 1 or input_ids.size(0) < 2:
            return None
        prompt_mask = attention_mask[:, :P]  # [n, P]
        lens = prompt_mask.sum(1)  # [n]
        # TRL left-pads: each row's prompt mask is 0…0 1…1 with at least one 1 (else the positions differ)
        if (prompt_mask[:, 1:] < prompt_mask[:, :-1]).any() or (lens == 0).any():
            return None
        runs = prompt_runs(input_ids[:, :P], prompt_mask)
        if max(runs) == 1:
            return None
        ok, reason = can_share_prefix(model, int(lens.max()) + L)
        if not ok:
            if reason not in self._update_warned:
                self._update_warned = self._update_warned | {reason}
                logger.warning("FastGRPOTrainer runs TRL's padded forward for log-probs: %s", reason)
            return None
        return runs

    def _shared_prefix_hidden(self, model, ids, mask, L: int, runs: list[int]) -> torch.Tensor:
        """Hidden states ``[n, L, D]`` predicting each completion token of ``ids [n, P + L]`` (runs of rows sharing
        a prompt), from ``shared_prefix_hidden_states`` at TRL's positions. One packed forward per distinct run
        length (the layout has one group size; TRL's batches have one)."""
        P = ids.size(1) - L
        lens = mask[:, :P].sum(1).tolist()  # [n] real prompt tokens
        firsts = [0, *itertools.accumulate(runs)][:-1]
        by_size: dict[int, list[int]] = {}
        for first, run in zip(firsts, runs):
            by_size.setdefault(run, []).append(first)
        pieces, order = [], []
        for G, group_firsts in by_size.items():
            rows = torch.tensor([f + i for f in group_firsts for i in range(G)], device=ids.device)  # [N_G]
            pads = [P - lens[f] for f in group_firsts]
            batch = PolicyBatch(
                [ids[f, pad:P].tolist() for f, pad in zip(group_firsts, pads)], ids[rows, P:], mask[rows, P:], G,
                position_offsets=pads,
            )
            # the layout's prompt padding is masked out of every attention, so its token id does not matter
            pieces.append(shared_prefix_hidden_states(model, batch, pad_id=0))  # [N_G, L, D]
            order.append(rows)
        if len(pieces) == 1:  # one group size: its rows are all rows, in order
            return pieces[0]
        return torch.cat(pieces)[torch.argsort(torch.cat(order))]  # back to row order

    def _group_shuffle_applies(self) -> bool:
        return (self.use_shared_prefix_update and self.num_generations > 1
                and self.args.per_device_train_batch_size % self.num_generations == 0)

    def _prepare_inputs(self, generation_batch):
        """TRL 1.16's ``_prepare_inputs`` with ``shuffle_groups`` in place of its row shuffle (train mode only)."""
        if not self.model.training or not self._group_shuffle_applies():
            return super()._prepare_inputs(generation_batch)
        steps = self.args.steps_per_generation
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = shuffle_groups(split_pixel_values_by_grid(batch), self.num_generations)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in split_tensor_dict(batch, steps)]
        return self._buffered_inputs[self._step % steps]

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
