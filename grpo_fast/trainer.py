"""GRPOTrainer: TRL's GRPOTrainer interface on grpo_fast's fused ops and shared-prefix sampler.

One optimizer step, top to bottom (see ``train``): rollout (G completions per prompt, each prompt prefilled once)
→ reward functions → group advantages → reference log-probs when beta > 0 → ``num_iterations`` passes over the
generation batch in minibatches (fused LM-head log-probs + GRPO loss, no logits tensor) → AdamW with clipping and
schedule → metrics → checkpoint.

Deliberate simplifications, each documented in the README:
- a generation batch is split into contiguous minibatches (TRL shuffles it first); with per_device_train_batch_size
  a multiple of num_generations every minibatch holds whole groups;
- off-policy old log-probs are the sampler's own (``recompute_old_logprobs=True`` runs TRL's extra forward);
- data parallelism is ``torchrun`` over prompts with one flattened gradient all-reduce per step, or FSDP2
  (``grpo_fast/distributed.py``), not accelerate.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo_fast import distributed as dist
from grpo_fast.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from grpo_fast.config import GRPOConfig
from grpo_fast.data import PromptEncoder, PromptOrder, load_rows
from grpo_fast.entropy_control import EntropyControl
from grpo_fast.forward import completion_logprobs
from grpo_fast.kernels.advantages import group_advantages
from grpo_fast.kernels.grpo_loss import LossOptions, grpo_loss, high_entropy_mask
from grpo_fast.memory import OOM_HINT, preflight
from grpo_fast.metrics import MetricsLog, progress_bar
from grpo_fast.models import load_model, prepare_tokenizer
from grpo_fast.reward_calls import resolve_reward_funcs, reward_func_name, score
from grpo_fast.sampler import SampleOutput, SharedPrefixSampler
from grpo_fast.shared_prefix import PolicyBatch


@dataclass
class Rollout:
    """One generation batch: B prompts × G completions, scored, with everything the update needs."""

    batch: PolicyBatch
    advantages: torch.Tensor  # [N]
    sampling_logp: torch.Tensor  # [N, L]
    ref_logp: torch.Tensor | None  # [N, L]
    num_items: torch.Tensor  # [] completion tokens in the whole generation batch

    def minibatch(self, k: int, count: int) -> tuple[PolicyBatch, slice]:
        """The k-th of ``count`` contiguous minibatches (whole groups when the sizes allow)."""
        n = self.batch.completion_ids.shape[0]
        size = n // count
        rows = slice(k * size, (k + 1) * size)
        g = self.batch.group_size
        if size % g == 0:
            mb = PolicyBatch(
                self.batch.prompt_ids[rows.start // g : rows.stop // g],
                self.batch.completion_ids[rows],
                self.batch.completion_mask[rows],
                g,
            )
        else:  # a split group: each completion carries its own prompt copy (group_size 1)
            mb = PolicyBatch(
                [self.batch.prompt_ids[i // g] for i in range(rows.start, rows.stop)],
                self.batch.completion_ids[rows],
                self.batch.completion_mask[rows],
                1,
            )
        return mb, rows


class GRPOTrainer:
    """Drop-in for ``trl.GRPOTrainer``: same argument names, config fields, reward signature and metric names."""

    def __init__(
        self,
        model,
        reward_funcs,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        peft_config=None,
    ):
        self.args = args = args if args is not None else GRPOConfig()
        self.rank, self.world_size = dist.init_from_env()
        self.is_main = self.rank == 0
        torch.manual_seed(args.seed)
        if isinstance(model, str):
            model, tokenizer = load_model(model)
            processing_class = processing_class or tokenizer
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required when model is a loaded model")
        prepare_tokenizer(processing_class)
        if peft_config is not None:  # train LoRA/PEFT adapters only, as TRL does
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        self.model, self.tokenizer = model, processing_class
        self.device = next(model.parameters()).device
        if args.bf16 and self.device.type != "cuda":
            warnings.warn(f"bf16=True has no effect on {self.device.type}: grpo_fast autocasts to bf16 on CUDA only "
                          "and trains in fp32 here; set bf16=False to silence this")
        self.reward_funcs = resolve_reward_funcs(reward_funcs)
        self.reward_names = [reward_func_name(f) for f in self.reward_funcs]
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(args.reward_weights)} entries but there are "
                f"{len(self.reward_funcs)} reward functions"
            )
        self.train_rows = load_rows(train_dataset)
        self.eval_rows = load_rows(eval_dataset) if eval_dataset is not None else None
        self.encode = PromptEncoder(processing_class, args.max_prompt_length)
        self.sampler = SharedPrefixSampler(model, processing_class)
        self.loss_options = LossOptions.from_config(args)
        self.entropy_control = EntropyControl.from_config(args)
        self.ref_model = None
        if args.beta != 0.0 and not self.is_peft:  # a frozen copy; none when beta == 0 or with PEFT
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if args.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.callbacks = list(callbacks or [])
        self.sharded = bool(args.fsdp) and self.world_size > 1
        if args.fsdp and self.world_size == 1:
            warnings.warn("fsdp='full_shard' in a single process: nothing to shard; training unsharded")
        if self.sharded:  # FSDP2; see grpo_fast/distributed.py for what changes
            if self.is_peft:
                raise ValueError("fsdp='full_shard' with PEFT adapters is not supported; train LoRA adapters data "
                                 "parallel (fsdp=None), where only the adapters carry optimizer state")
            dist.shard_model(model)
            if self.ref_model is not None:
                dist.shard_model(self.ref_model, trainable=False)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        from transformers import get_scheduler

        self.max_steps = args.max_steps if args.max_steps > 0 else self._steps_from_epochs()
        self.scheduler = get_scheduler(
            args.lr_scheduler_type,
            self.optimizer,
            args.resolve_interval("warmup_steps", self.max_steps) or 0,
            self.max_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
        self.intervals = {
            name: args.resolve_interval(name, self.max_steps) for name in ("logging_steps", "save_steps", "eval_steps")
        }
        self.order = PromptOrder(len(self.train_rows), args.seed)
        local = args.generation_batch_size // self.world_size  # generation_batch_size counts all ranks, as in TRL
        if local % args.num_generations:
            raise ValueError(
                f"each rank samples whole groups: generation_batch_size / world_size = {local} must be a multiple of "
                f"num_generations = {args.num_generations}"
            )
        self.prompts_per_rank = local // args.num_generations
        if args.skip_zero_std_groups and self.world_size > 1:
            raise ValueError("skip_zero_std_groups (dynamic sampling) runs in one process only; set it to False")
        self.step = 0  # optimizer steps
        self.micro_step = 0  # minibatches processed
        self.generation = 0
        self.rollout: Rollout | None = None  # the generation batch being consumed (saved in mid-way checkpoints)
        self.consecutive_skips = 0
        self._nonfinite_loss = False
        self._step_loss = torch.zeros(())
        self.log = MetricsLog(args.output_dir, args.report_to, enabled=self.is_main)
        self._pending: dict[str, list[float]] = defaultdict(list)

    # ---------------------------------------------------------------- set-up helpers
    @contextlib.contextmanager
    def _reference(self):
        """The reference policy: the frozen copy, or — with PEFT — the same model with its adapters disabled (no
        second copy of the weights)."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.model.disable_adapter():
                yield self.model

    def _autocast(self):
        """bf16 autocast over every forward of the model (sampler, policy, reference) on CUDA, so the sampler
        decodes in the training forward's precision; parameters, gradients and optimizer states stay fp32. One
        context spans a whole ``generate`` call, so autocast casts each trainable weight once per call, not per
        decode step. Elsewhere a no-op: the CPU trains in fp32 (see ``__init__``'s warning)."""
        if self.args.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _steps_from_epochs(self) -> int:
        """max_steps = -1: as many optimizer steps as num_train_epochs passes over the prompts take (TRL's count)."""
        args = self.args
        prompts_per_step = args.generation_batch_size // args.num_generations / args.steps_per_generation
        prompts_per_step *= args.gradient_accumulation_steps / args.num_iterations
        return max(1, math.ceil(args.num_train_epochs * len(self.train_rows) / prompts_per_step))

    @property
    def entropy_coef(self) -> float:
        """TRL's attribute: the entropy bonus coefficient now (moved by adaptive control)."""
        return self.entropy_control.coef

    @entropy_coef.setter
    def entropy_coef(self, value: float) -> None:
        self.entropy_control.coef = value

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    # ---------------------------------------------------------------- rollout
    def _sample(self, rows: list[dict], greedy: bool = False, group_size: int | None = None, first_index: int = 0):
        """Samples G completions per row. Each prompt's randomness is seeded by its global index in the prompt
        stream (``first_index`` + its place in ``rows``), so completions do not depend on batch composition or on
        how many ranks share the run."""
        args = self.args
        prompt_ids = [self.encode(r["prompt"]) for r in rows]
        with dist.gathered_for_generation(self.model), self._autocast():
            out = self.sampler.generate(
                prompt_ids,
                group_size=group_size or args.num_generations,
                max_new_tokens=args.max_completion_length,
                temperature=0.0 if greedy else args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                min_p=args.min_p,
                repetition_penalty=args.repetition_penalty,
                stop=args.stop,
                seed=[args.seed * 1_000_003 + first_index + i for i in range(len(rows))],
            )
        return prompt_ids, out

    def _score(self, rows: list[dict], out, group_size: int) -> tuple[torch.Tensor, dict[str, float]]:
        rewards, counters = score(self.reward_funcs, self.reward_names, rows, out, group_size,
                                  self.args.reward_timeout, self.step)
        return rewards.to(self.device), counters

    def _rollout(self) -> tuple[Rollout, dict]:
        args = self.args
        g = args.num_generations
        b = self.prompts_per_rank
        t0 = time.perf_counter()
        # every rank draws the same global prompt order and keeps its slice: whole groups per rank
        first = self.order.position + self.rank * b  # global index of this rank's first prompt
        order = self.order.take(b * self.world_size)
        rows = [self.train_rows[i] for i in order[self.rank * b : (self.rank + 1) * b]]
        prompt_ids, out = self._sample(rows, first_index=first)
        t1 = time.perf_counter()
        rewards, counters = self._score(rows, out, g)
        if args.skip_zero_std_groups:
            rows, prompt_ids, out, rewards, counters["skipped_zero_std_groups"] = self._dynamic_sampling(
                rows, prompt_ids, out, rewards
            )
        t2 = time.perf_counter()
        mask = out.completion_mask.to(self.device)
        truncated = torch.tensor([r == "length" for r in out.finish_reasons], device=self.device)
        if args.mask_truncated_completions:
            mask = mask * (~truncated).unsqueeze(1).to(mask.dtype)
        weights = torch.tensor(args.reward_weights, device=self.device) if args.reward_weights else None
        # rewards are gathered before normalization, so "batch" scaling and the reward metrics are global
        n_local = rewards.shape[0]
        advantages, stats = group_advantages(
            dist.all_gather_rows(rewards),
            g,
            weights=weights,
            scale=args.scale_rewards,
            multi_objective_aggregation=args.multi_objective_aggregation,
            estimator=args.estimator,
        )
        advantages = advantages[self.rank * n_local : (self.rank + 1) * n_local]
        batch = PolicyBatch(prompt_ids, out.completion_ids.to(self.device), mask, g)
        ref_logp = None
        if args.beta != 0.0:
            with torch.no_grad(), self._reference() as ref_model, self._autocast():
                ref_logp, _ = completion_logprobs(
                    ref_model, batch, self.pad_id, args.temperature, False, args.shared_prefix_update
                )
        num_items = dist.all_reduce_sum(mask.sum().float())  # the global token count dapo/cispo/vespo divide by
        rollout = Rollout(batch, advantages, out.logprobs.to(self.device), ref_logp, num_items)
        lengths = out.completion_mask.sum(1).float()
        term = lengths[~truncated.cpu()]
        metrics = {
            **stats.metrics(self.reward_names),
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": truncated.float().mean(),
            "completions/mean_terminated_length": term.mean() if term.numel() else math.nan,
            "completions/distinct_frac": distinct_fraction(out.texts, g),
            "timing/sampling_s": t1 - t0,
            "timing/reward_s": t2 - t1,
            "num_tokens": float(sum(len(p) for p in prompt_ids) * g + lengths.sum().item()),
            **counters,
        }
        self.generation += 1
        return rollout, metrics

    def _dynamic_sampling(self, rows, prompt_ids, out, rewards, max_rounds: int = 4):
        """DAPO's dynamic sampling: groups whose rewards are all equal carry no signal; drop them and sample more
        prompts until the batch is full again (at most ``max_rounds`` extra rounds, then zero-std groups fill the
        rest). Returns the new batch and how many groups were dropped. One process only."""
        g, b = self.args.num_generations, len(rows)
        weights = torch.tensor(self.args.reward_weights or [1.0] * rewards.shape[1], device=rewards.device)
        keep, pool, dropped = [], [], 0
        for round_ in range(max_rounds + 1):
            total = (rewards * weights).nansum(1).masked_fill(rewards.isnan().all(1), float("nan")).view(-1, g)
            for j in range(len(rows)):
                valid = total[j][~total[j].isnan()]
                entry = (rows[j], prompt_ids[j], out, j, rewards[j * g : (j + 1) * g])
                if valid.numel() >= 2 and valid.std() > 1e-6 * valid.abs().max().clamp(min=1.0):
                    keep.append(entry)
                else:
                    pool.append(entry)
                    dropped += 1
            if len(keep) >= b or round_ == max_rounds:
                break
            first = self.order.position
            rows = [self.train_rows[i] for i in self.order.take(b - len(keep))]
            prompt_ids, out = self._sample(rows, first_index=first)
            rewards, _ = self._score(rows, out, g)
        chosen = (keep + pool)[:b]
        return (
            [e[0] for e in chosen],
            [e[1] for e in chosen],
            _concat_groups([(e[2], e[3]) for e in chosen], g, self.pad_id),
            torch.cat([e[4] for e in chosen]),
            float(dropped),
        )

    # ---------------------------------------------------------------- update
    def _minibatch_loss(self, rollout: Rollout, k: int, first: bool) -> tuple[torch.Tensor, dict]:
        args = self.args
        mb, rows = rollout.minibatch(k, args.steps_per_generation)
        logp, entropy = completion_logprobs(
            self.model, mb, self.pad_id, args.temperature, True, args.shared_prefix_update
        )
        off_policy = args.needs_old_logprobs
        old_logp = None
        metrics: dict[str, float] = {}
        if off_policy:
            if args.recompute_old_logprobs:
                with torch.no_grad():
                    old_logp, _ = completion_logprobs(
                        self.model, mb, self.pad_id, args.temperature, False, args.shared_prefix_update
                    )
            else:
                old_logp = rollout.sampling_logp[rows]
        if first and args.log_sampling_logprob_gap:
            gap = (logp.detach() - rollout.sampling_logp[rows]).abs()[mb.completion_mask.bool()]
            if gap.numel():
                metrics["sampling/sampling_logp_difference/mean"] = gap.mean()
                metrics["sampling/sampling_logp_difference/max"] = gap.max()
        entropy_mask = None
        if args.top_entropy_quantile < 1.0:
            entropy_mask = high_entropy_mask(entropy.detach(), mb.completion_mask, args.top_entropy_quantile)
        loss, loss_metrics = grpo_loss(
            logp,
            old_logp,
            None if rollout.ref_logp is None else rollout.ref_logp[rows],
            rollout.advantages[rows],
            mb.completion_mask,
            self.loss_options,
            num_items_in_batch=rollout.num_items,
            entropy=entropy.detach(),
            entropy_mask=entropy_mask,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            steps_per_generation=args.steps_per_generation,
            num_processes=self.world_size,
        )
        control = self.entropy_control
        if control.enabled:
            # TRL logs the policy term before its accumulation scaling (dapo, cispo, vespo: as backpropagated)
            unscaled = args.loss_type not in ("dapo", "cispo", "vespo")
            metrics["policy_loss"] = loss.detach() * (args.gradient_accumulation_steps if unscaled else 1)
            m = mb.completion_mask if entropy_mask is None else mb.completion_mask * entropy_mask
            loss = loss - control.applied() * control.bonus(entropy, m, args.gradient_accumulation_steps)
        metrics.update(loss_metrics)
        return loss, metrics

    def _optimizer_step(self) -> dict:
        args = self.args
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else float("inf")
        if not self.sharded:  # FSDP2 has reduce-scattered (averaged) the gradients already
            dist.average_gradients(params)
        grad_norm = dist.full_tensor(torch.nn.utils.clip_grad_norm_(params, clip))  # the same on every rank
        bad = dist.any_rank(self._nonfinite_loss, self.device) or not torch.isfinite(grad_norm)
        self._nonfinite_loss = False
        if bad:
            self.optimizer.zero_grad(set_to_none=True)  # the optimizer state is untouched
            self.consecutive_skips += 1
            if self.consecutive_skips >= args.max_consecutive_skipped_steps:
                raise RuntimeError(
                    f"{self.consecutive_skips} consecutive optimizer steps had a non-finite gradient; stopping. "
                    "Likely causes: learning_rate too high, non-finite rewards reaching the loss, or a bf16 overflow"
                )
            return {"grad_norm": math.nan, "skipped_steps": 1.0}
        self.consecutive_skips = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm, "skipped_steps": 0.0}

    # ---------------------------------------------------------------- the loop
    def train(self, resume_from_checkpoint: bool | str | None = None) -> list[dict]:
        """Runs until ``max_steps`` optimizer steps; returns the logged rows. A generation batch serves
        ``steps_per_generation × num_iterations`` minibatches; every ``gradient_accumulation_steps`` of them make
        one optimizer step (TRL's schedule)."""
        args = self.args
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
        prompt_tokens = max(len(self.encode(r["prompt"])) for r in self.train_rows[:64])
        self.memory_estimate = preflight(self.model, args, prompt_tokens, self.ref_model is not None)
        self.model.train()
        progress = progress_bar(self.max_steps, self.step, enabled=self.is_main)
        try:
            self._loop(progress)
        except torch.cuda.OutOfMemoryError as e:
            raise RuntimeError(OOM_HINT.format(phase="training")) from e
        finally:
            progress.close()
        self.log.plot()
        self.log.close()
        return self.log.history

    def _loop(self, progress) -> None:
        args = self.args
        per_generation = args.steps_per_generation * args.num_iterations
        t_update = time.perf_counter()
        while self.step < self.max_steps:
            if self.micro_step % per_generation == 0 or self.rollout is None:
                self.rollout, gen_metrics = self._rollout()
                self._record(gen_metrics)
                t_update = time.perf_counter()
            k = self.micro_step % args.steps_per_generation
            with self._autocast():  # the forwards and the loss; backward runs outside, as autocast recommends
                loss, metrics = self._minibatch_loss(self.rollout, k, first=self.micro_step % per_generation == 0)
            self._step_loss += loss.detach()
            if torch.isfinite(loss):
                loss.backward()
            else:  # the whole optimizer step this minibatch belongs to is skipped
                self._nonfinite_loss = True
            self._record(metrics)
            self.micro_step += 1
            if self.micro_step % args.gradient_accumulation_steps:
                continue
            self._record({"loss": self._step_loss})  # what was backpropagated this optimizer step
            self._step_loss = torch.zeros(())
            if self.entropy_control.enabled:
                self.entropy_control.step()
                self._record({"entropy_coef": self.entropy_control.coef})
            self._record(self._optimizer_step())
            self.step += 1
            self._record({"learning_rate": self.scheduler.get_last_lr()[0]})
            self._record({"timing/update_s": time.perf_counter() - t_update})
            t_update = time.perf_counter()
            self._after_step(progress)

    def _record(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self._pending[k].append(float(v))

    def _after_step(self, progress) -> None:
        log_every, save_every, eval_every = (self.intervals[k] for k in ("logging_steps", "save_steps", "eval_steps"))
        if (log_every and self.step % log_every == 0) or self.step == self.max_steps:
            logs = dist.mean_over_ranks({k: _nanmean(v) for k, v in self._pending.items()}, self.device)
            times = [logs.get(f"timing/{k}_s", 0.0) or 0.0 for k in ("sampling", "reward", "update")]
            if sum(times) > 0 and logs.get("num_tokens"):
                logs["tokens_per_s"] = logs["num_tokens"] / sum(times)
            self._pending.clear()
            self.log.log(self.step, logs)
            progress.set_postfix({k: f"{logs[k]:.3f}" for k in ("reward", "loss") if logs.get(k) is not None})
            self._callback("on_log", logs=logs)
        if eval_every and self.eval_rows is not None and self.step % eval_every == 0:
            self.log.log(self.step, self.evaluate())
        if save_every and self.step % save_every == 0:
            self.save_checkpoint()
        self._callback("on_step_end")
        progress.update(1)

    def _callback(self, event: str, **kwargs) -> None:
        """transformers' TrainerCallback protocol: ``cb.<event>(args, state, control, trainer=..., **kwargs)`` with
        a TrainerState holding global_step, max_steps and log_history, so TRL users' callbacks work unchanged; a
        callback setting ``control.should_training_stop`` ends the run after this step."""
        if not self.callbacks:
            return
        from transformers import TrainerControl, TrainerState

        state = TrainerState(global_step=self.step, max_steps=self.max_steps, log_history=self.log.history,
                             is_world_process_zero=self.is_main)
        control = TrainerControl()
        for cb in self.callbacks:
            if hasattr(cb, event):
                getattr(cb, event)(self.args, state, control, trainer=self, **kwargs)
        if control.should_training_stop:
            self.max_steps = self.step

    @torch.no_grad()
    def evaluate(self, rows: list[dict] | None = None, batch_prompts: int = 16) -> dict[str, float]:
        """Greedy accuracy: the mean of each reward function over one greedy completion per held-out prompt."""
        rows = rows if rows is not None else self.eval_rows
        if rows is None:
            raise ValueError("evaluate() needs eval rows: pass eval_dataset to the trainer or rows= here")
        limit = self.args.eval_num_prompts
        rows = rows[:limit] if limit else rows
        scores = []
        for i in range(0, len(rows), batch_prompts):
            chunk = rows[i : i + batch_prompts]
            _, out = self._sample(chunk, greedy=True, group_size=1)
            scores.append(self._score(chunk, out, 1)[0])
        rewards = torch.cat(scores)  # [n, R]
        metrics = {
            f"eval_rewards/{name}/mean": torch.nanmean(rewards[:, i]).item() for i, name in enumerate(self.reward_names)
        }
        metrics["eval_reward"] = torch.nanmean(rewards.nansum(1)).item()
        return metrics

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        return {
            "global_step": self.step,
            "micro_step": self.micro_step,
            "generation": self.generation,
            "data_position": self.order.position,
            "consecutive_skips": self.consecutive_skips,
            "world_size": self.world_size,
            **self.entropy_control.state(),
            "config": self.args.to_dict(),
        }

    def save_checkpoint(self) -> Path:
        """Rank 0 writes (the weights are replicated, or gathered from the FSDP2 shards); every rank waits for it."""
        per_generation = self.args.steps_per_generation * self.args.num_iterations
        mid_generation = self.rollout is not None and self.micro_step % per_generation != 0
        path = Path(self.args.output_dir) / f"checkpoint-{self.step}"
        model_state = optimizer_state = None
        if self.sharded:  # every rank takes part in gathering the full state dicts; rank 0 writes them
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.model, options=full)
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        if self.is_main:
            # a mid-generation checkpoint keeps the generation batch so a resume continues it exactly; with several
            # ranks each holds its own, and a resume regenerates it instead (as TRL always does)
            extra = {"rollout.pt": self.rollout} if mid_generation and self.world_size == 1 else None
            path = save_checkpoint(
                self.args.output_dir, self.step, self.model, self.tokenizer, self.optimizer, self.scheduler,
                self._state(), self.args.save_total_limit, extra=extra, model_state=model_state,
                optimizer_state=optimizer_state,
            )
        dist.barrier()
        return path

    def _resume(self, where: bool | str) -> None:
        path = latest_checkpoint(self.args.output_dir) if where is True else Path(where)
        if path is None:
            warnings.warn(f"resume_from_checkpoint=True but {self.args.output_dir} has no checkpoint; starting fresh")
            return
        from safetensors.torch import load_model as load_safetensors

        state = load_training_state(path, self.optimizer, self.scheduler, self.model, self.sharded)
        old = dict(state["config"])
        now = self.args.to_dict()
        # the per-rank batch may change with the number of ranks; the global batch may not
        old["per_device_train_batch_size"] *= state.get("world_size", 1)
        now["per_device_train_batch_size"] *= self.world_size
        changed = {
            k: (old.get(k), v)
            for k, v in now.items()
            if k in self.args.math_fields() and _plain(old.get(k)) != _plain(v)
        }
        if changed:
            raise ValueError(
                f"cannot resume from {path}: these fields change the math and differ from the checkpoint's: "
                + ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changed.items())
            )
        if self.is_peft:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(str(path / "adapter_model.safetensors")))
        elif self.sharded:  # every rank reads the full weights; each keeps its shard
            from safetensors.torch import load_file
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            weights = load_file(str(next(path.glob("model*.safetensors"))))
            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            load_safetensors(self.model, str(next(path.glob("model*.safetensors"))), strict=False)
        self.step = state["global_step"]
        self.micro_step = state["micro_step"]
        self.rollout = torch.load(path / "rollout.pt", weights_only=False) if (path / "rollout.pt").exists() else None
        self.generation = state["generation"]
        self.order.position = state["data_position"]
        self.consecutive_skips = state["consecutive_skips"]
        self.entropy_control.load(state)


def _concat_groups(groups: list, g: int, pad_id: int) -> SampleOutput:
    """One SampleOutput from groups picked out of several (``(output, group index)`` pairs), padded to one L."""
    L = max(out.completion_ids.shape[1] for out, _ in groups)

    def rows_of(t, j, fill):
        part = t[j * g : (j + 1) * g]
        return torch.nn.functional.pad(part, (0, L - part.shape[1]), value=fill)

    return SampleOutput(
        completion_ids=torch.cat([rows_of(out.completion_ids, j, pad_id) for out, j in groups]),
        completion_mask=torch.cat([rows_of(out.completion_mask, j, 0) for out, j in groups]),
        logprobs=torch.cat([rows_of(out.logprobs, j, 0.0) for out, j in groups]),
        texts=[t for out, j in groups for t in out.texts[j * g : (j + 1) * g]],
        finish_reasons=[r for out, j in groups for r in out.finish_reasons[j * g : (j + 1) * g]],
        prompt_ids=[out.prompt_ids[j] for out, j in groups],
    )


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def distinct_fraction(texts: list[str], group_size: int) -> float:
    groups = [texts[i : i + group_size] for i in range(0, len(texts), group_size)]
    return sum(len(set(g)) / len(g) for g in groups) / max(len(groups), 1)


def _nanmean(values: list[float]) -> float | None:
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else None
