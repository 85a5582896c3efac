"""DAPO's dynamic sampling on TRL 1.16's GRPOTrainer: groups whose rewards do not vary are replaced by fresh groups.

A group (``num_generations`` consecutive rows, one prompt) whose rewards are all equal has zero advantage everywhere:
it costs a forward and backward pass and teaches nothing. With ``skip_zero_std_groups`` (train mode only), after TRL
has generated and scored a batch, ``DynamicSampling`` finds those groups and puts in their place groups of fresh
prompts, generated and scored by TRL's own ``_generate_and_score_completions``, for at most ``max_resample_rounds``
rounds; zero-std groups left after the last round stay in the batch (counted in ``dynamic_sampling/zero_std_groups``).

Semantics, each a deliberate choice:

- **Criterion.** A group is zero-std when the standard deviation of TRL's aggregated reward over its rows
  (``multi_objective_aggregation``'s weighted sum; TRL's ``nanstd``, unscored rows left out) is ``isclose`` to 0, or
  undefined (fewer than two scored rows, whose advantages TRL zeroes). This is TRL's ``is_std_zero`` taken per group
  whatever ``scale_rewards`` is (with ``"batch"`` TRL's own flag is batch-wide).
- **Fresh prompts** come from the train dataset by index, drawn with a generator seeded by (``seed``, optimizer step,
  process, round): deterministic, identical after a resume, and TRL's dataloader is not consumed. Their sampling
  seeds continue the step's prompt counter (``GRPOTrainer._prompt_seeds`` with ``_seed_offset``), so a prompt drawn
  again is not sampled with the seeds it had before.
- **Several processes.** Each process replaces its own zero-std groups with groups it generated itself; groups never
  move between processes. TRL's generation gathers over processes, so every process must make the same calls with the
  same sizes: the rewards are gathered, every process sees every process's zero-std groups, and each round every
  process generates as many fresh groups as the process with the most still to fill needs (the others discard the
  surplus). This needs whole groups per process (``generation_batch_size / num_processes`` a multiple of
  ``num_generations``), checked at the first call.
- **Advantages** of the final batch are recomputed with TRL's formula over the final batch's rewards (gathered over
  processes): with ``scale_rewards`` "group" or "none" each group's advantages are exactly those its own call
  computed; with "batch" and with ``normalize_then_sum`` the batch statistics are the final batch's.
  ``num_items_in_batch`` is recomputed for the final batch.
- **Metrics.** TRL logs its generation and reward metrics once per call, replacement calls included, so those describe
  everything sampled; ``dynamic_sampling/replaced_groups`` (summed over processes), ``dynamic_sampling/rounds`` and
  ``dynamic_sampling/zero_std_groups`` (left in the final batch, summed over processes) describe the filtering.

Multimodal batches are not merged (their image tensors are not per row); a batch carrying them raises.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from grpo_fast.config import own_option

try:
    from trl.trainer.utils import nanstd
except ImportError as e:  # pragma: no cover
    raise ImportError("grpo_fast.dynamic_sampling needs trl: pip install 'trl>=1.16,<1.17'") from e

#: per-row tensors left-padded (prompts) and right-padded (completions), with their pad values (None: the pad token)
_LEFT_PAD = {"prompt_ids": None, "prompt_mask": 0}
_RIGHT_PAD = {"completion_ids": None, "completion_mask": 0, "old_per_token_logps": 0.0, "ref_per_token_logps": 0.0,
              "sampling_per_token_logps": 0.0, "importance_sampling_ratio": 0.0, "tool_mask": 1}
_RECOMPUTED = ("advantages", "num_items_in_batch")


def aggregated_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor, group_size: int,
                       aggregation: str) -> torch.Tensor:
    """TRL 1.16's per-row reward ``[N]`` from ``rewards_per_func [N, F]`` before its advantage step (NaN where every
    function left the row unscored): the weighted sum, or for ``normalize_then_sum`` the weighted sum of each
    function's group-normalized reward."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # [N]
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)  # [N]
    elif aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, group_size, rewards_per_func.size(1))  # [B, G, F]
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)  # [B, 1, F]
        std_k = nanstd(grouped, dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean_k)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.size(1))  # [N, F]
        rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)  # [N]
    else:
        raise ValueError(f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum'; "
                         f"got {aggregation!r}")
    rewards[unscorable] = torch.nan
    return rewards


def zero_std_groups(rewards_per_func: torch.Tensor, weights: torch.Tensor, group_size: int,
                    aggregation: str) -> torch.Tensor:
    """``[N / G]`` bool: groups whose aggregated reward has zero (or undefined) standard deviation."""
    rewards = aggregated_rewards(rewards_per_func, weights, group_size, aggregation)  # [N]
    std = nanstd(rewards.view(-1, group_size), dim=1)  # [B]
    return torch.isclose(std, torch.zeros_like(std)) | torch.isnan(std)


def trl_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, group_size: int, aggregation: str,
                   scale_rewards: str) -> torch.Tensor:
    """TRL 1.16's advantages ``[N]`` for a (process-gathered) batch ``rewards_per_func [N, F]``, as its
    ``_generate_and_score_completions`` computes them."""
    rewards = aggregated_rewards(rewards_per_func, weights, group_size, aggregation)  # [N]
    if aggregation == "normalize_then_sum":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        return torch.nan_to_num((rewards - torch.nanmean(rewards)) / (std + 1e-4), nan=0.0)
    mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)  # [N]
    if scale_rewards in ("group", "none"):
        if group_size > 1:
            std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)  # [N]
        else:
            std = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards must be 'batch', 'group' or 'none'; got {scale_rewards!r}")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def merge_groups(pieces: list[tuple[dict, int]], group_size: int, pad_token_id: int) -> dict:
    """One batch from groups of several ``_generate_and_score_completions`` outputs: ``pieces[i] = (output, j)`` puts
    group ``j`` of ``output`` at group ``i``. Prompt tensors are left-padded and completion tensors right-padded to the
    widest piece; ``advantages`` and ``num_items_in_batch`` are left to the caller."""
    keys = set(pieces[0][0]) - set(_RECOMPUTED)
    for out, _ in pieces:
        if set(out) - set(_RECOMPUTED) != keys:
            raise ValueError(f"dynamic sampling: generation outputs differ in keys ({sorted(keys)} vs {sorted(out)})")
    merged = {}
    for key in keys:
        if key in _LEFT_PAD:
            value, left = _LEFT_PAD[key], True
        elif key in _RIGHT_PAD:
            value, left = _RIGHT_PAD[key], False
        else:
            raise ValueError(f"dynamic sampling (skip_zero_std_groups) cannot merge {key!r}; multimodal batches are "
                             "not supported")
        value = pad_token_id if value is None else value
        parts = [out[key][j * group_size : (j + 1) * group_size] for out, j in pieces]  # each [G, W_i]
        width = max(p.size(1) for p in parts)
        parts = [F.pad(p, (width - p.size(1), 0) if left else (0, width - p.size(1)), value=value) for p in parts]
        merged[key] = torch.cat(parts)  # [N, W]
    return merged


class DynamicSampling:
    """Mixin for TRL's ``GRPOTrainer`` (before ``FastGRPOTrainer`` in the bases): with ``skip_zero_std_groups``,
    zero-std groups are replaced by fresh ones (see the module docstring)."""

    _gathered_rewards: torch.Tensor | None = None  # [P·N, F], the last ``_calculate_rewards`` result

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if own_option(self.args, "skip_zero_std_groups"):
            data = self.train_dataset
            if data is None or isinstance(data, torch.utils.data.IterableDataset) or not (
                hasattr(data, "__len__") and hasattr(data, "__getitem__")
            ):
                raise ValueError("skip_zero_std_groups draws replacement prompts by index: it needs a map-style "
                                 f"train_dataset (a datasets.Dataset or a list), got {type(data).__name__}")

    def _calculate_rewards(self, *args, **kwargs):
        self._gathered_rewards = super()._calculate_rewards(*args, **kwargs)
        return self._gathered_rewards

    def _zero_std(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        weights = self.reward_weights.to(rewards_per_func.device)
        return zero_std_groups(rewards_per_func, weights, self.num_generations, self.multi_objective_aggregation)

    def _generate_and_score_completions(self, inputs):
        if not (self.model.training and own_option(self.args, "skip_zero_std_groups")):
            return super()._generate_and_score_completions(inputs)
        G, n = self.num_generations, len(inputs)
        if n % G:
            raise ValueError(f"skip_zero_std_groups needs whole groups on each process: this process holds {n} rows, "
                             f"not a multiple of num_generations={G} (make generation_batch_size / num_processes "
                             "a multiple of num_generations)")
        out = super()._generate_and_score_completions(inputs)
        rank, B = self.accelerator.process_index, n // G
        rewards = self._gathered_rewards  # [P·n, F]
        per_process = self._zero_std(rewards).view(-1, B)  # [P, B]
        to_fill = per_process.sum(1)  # [P] groups each process still has to replace
        pending = torch.nonzero(per_process[rank]).flatten().tolist()  # this process's slots to replace
        pieces = [(out, j) for j in range(B)]
        group_rewards = list(rewards[rank * n : (rank + 1) * n].view(B, G, -1))  # B × [G, F]
        rounds, replaced, prompts_sampled = 0, 0, B
        while rounds < own_option(self.args, "max_resample_rounds") and int(to_fill.max()) > 0:
            k = int(to_fill.max())  # the same on every process: TRL's gathers need equal sizes
            fresh = self._fresh_inputs(k, rounds)
            new = self._generate_with_seed_offset(fresh, prompts_sampled)
            prompts_sampled += k
            rounds += 1
            new_rewards = self._gathered_rewards  # [P·k·G, F]
            informative = ~self._zero_std(new_rewards).view(-1, k)  # [P, k]
            to_fill = (to_fill - informative.sum(1)).clamp(min=0)
            mine = new_rewards[rank * k * G : (rank + 1) * k * G].view(k, G, -1)  # [k, G, F]
            for j in torch.nonzero(informative[rank]).flatten().tolist()[: len(pending)]:
                slot = pending.pop(0)
                pieces[slot] = (new, j)
                group_rewards[slot] = mine[j]
                replaced += 1
        counts = torch.tensor([replaced, len(pending)], dtype=torch.float32, device=self.accelerator.device)
        counts = self.accelerator.gather(counts).view(-1, 2).sum(0).tolist()
        self._metrics["train"]["dynamic_sampling/replaced_groups"].append(counts[0])
        self._metrics["train"]["dynamic_sampling/zero_std_groups"].append(counts[1])
        self._metrics["train"]["dynamic_sampling/rounds"].append(float(rounds))
        if not counts[0]:  # nothing replaced on any process: TRL's batch as it is
            return out
        merged = merge_groups(pieces, G, self._tokenizer.pad_token_id)
        all_rewards = self.accelerator.gather(torch.cat(group_rewards))  # [P·n, F]
        advantages = trl_advantages(all_rewards, self.reward_weights.to(all_rewards.device), G,
                                    self.multi_objective_aggregation, self.scale_rewards)
        merged["advantages"] = advantages[rank * n : (rank + 1) * n]  # [n]
        loss_mask = merged["completion_mask"] * merged.get("tool_mask", 1)  # [n, L]
        merged["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        return merged

    def _fresh_inputs(self, count: int, round_: int) -> list[dict]:
        """``count`` train-dataset rows, each repeated ``num_generations`` times (TRL's layout), from a generator
        seeded by (seed, optimizer step, process, round)."""
        seq = [self.args.seed, self.state.global_step, self.accelerator.process_index, round_]
        rng = np.random.default_rng([abs(int(s)) for s in seq])
        index = rng.integers(len(self.train_dataset), size=count).tolist()
        rows = [self.train_dataset[i] for i in index]
        return [dict(row) for row in rows for _ in range(self.num_generations)]

    def _generate_with_seed_offset(self, inputs: list[dict], offset: int) -> dict:
        """TRL's ``_generate_and_score_completions`` with the sampling seeds of the step's prompts after the first
        ``offset`` per process (``_seed_offset``), so replacement prompts do not reuse earlier prompts' seeds."""
        self._seed_offset = offset
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._seed_offset = 0
