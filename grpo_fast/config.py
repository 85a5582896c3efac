"""GRPOConfig: every option of a grpo_fast run, under TRL 1.16's names and defaults.

GRPO fields carry TRL 1.16 `GRPOConfig`'s names and defaults; the training basics carry `transformers.TrainingArguments`
names with TRL's overridden defaults (learning_rate 1e-6, logging_steps 10, bf16 on, gradient_checkpointing on).
Batch sizes count completions and a "step" is an optimizer step, as in TRL.

A TRL user's config keeps working: the constructor and `from_dict` accept every TRL `GRPOConfig` /
`TrainingArguments` name. A name we do not support that would change the math is refused by name with the reason
(only when set to something other than its TRL default); a name that only affects reporting, launching or speed is
accepted and ignored (`IGNORED_FIELDS` says why); any other name raises with the closest valid name.

Fields that are ours, not TRL's: max_prompt_length, recompute_old_logprobs, shared_prefix_update,
skip_zero_std_groups, reward_timeout, max_consecutive_skipped_steps, estimator, stop, log_sampling_logprob_gap,
eval_num_prompts. Deviations from TRL: `epsilon_high=None` resolves to `epsilon` here (TRL resolves it in the trainer);
`generation_batch_size` and `steps_per_generation` may both be given when they agree (TRL's own `to_dict()` output
has both); `save_steps` / `eval_steps` of None or 0 turn checkpoints / evaluation off (TRL's save_strategy /
eval_strategy "no" map onto these); `report_to` drives only tensorboard and wandb; the world size is torchrun's
WORLD_SIZE. A math field (`math_fields()`) is one whose change makes a resume refuse.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import enum
import functools
import importlib.util
import json
import math
import operator
import os
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from grpo_fast.kernels.grpo_loss import IS_LEVELS, LOSS_TYPES

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
CHOICES: dict[str, tuple[str, ...]] = {
    "loss_type": LOSS_TYPES,
    "importance_sampling_level": IS_LEVELS,
    "scale_rewards": ("group", "batch", "none"),
    "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
    "estimator": ("grpo", "rloo"),
    "lr_scheduler_type": LR_SCHEDULERS,
}
REPORTERS = ("tensorboard", "wandb")
# transformers integrations we do not drive: accepted in report_to with a warning, then dropped
_OTHER_REPORTERS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "kubeflow", "mlflow",
                    "neptune", "swanlab", "trackio")

# TRL / TrainingArguments names we do not support and that would change the math: refused unless the value is
# one of the accepted ones (TRL's default, or an equivalent).
REFUSED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_vllm": ((False,), "grpo_fast samples with its own shared-prefix sampler on the training model; there is no "
                 "vLLM engine, hence no vLLM importance-sampling correction"),
    "sync_ref_model": ((False,), "TR-DPO reference-model syncing is not implemented; the reference stays the "
                       "initial model"),
    "off_policy_mask_threshold": ((None,), "DeepSeek-V3.2 off-policy sequence masking is not implemented"),
    "router_aux_loss_coef": ((None, 0.0), "the Mixture-of-Experts load-balancing loss is not added"),
    "cast_lm_head_to_fp32": ((False,), "the LM head keeps the model's dtype (the fused log-prob kernel accumulates "
                             "the logits in fp32 anyway)"),
    "generation_kwargs": ((None, {}), "the sampler takes only temperature, top_p, top_k, min_p, repetition_penalty "
                          "and stop"),
    "fp16": ((False,), "fp16 mixed precision is not supported: it needs loss scaling (a GradScaler) that "
             "grpo_fast's update does not implement; use bf16 (autocast on CUDA, no scaling needed)"),
    "optim": (("adamw_torch", "adamw_torch_fused"), "grpo_fast optimizes with torch.optim.AdamW"),
    "optim_args": ((None, ""), "grpo_fast optimizes with torch.optim.AdamW"),
    "optim_target_modules": ((None,), "grpo_fast optimizes with torch.optim.AdamW over all trainable parameters"),
    "neftune_noise_alpha": ((None,), "NEFTune embedding noise is not implemented"),
    "auto_find_batch_size": ((False,), "shrinking the batch on out-of-memory breaks whole prompt groups (TRL refuses "
                             "it too); lower per_device_train_batch_size instead"),
    "average_tokens_across_devices": ((True,), "loss normalization always counts tokens across all ranks"),
}

_WHY_IGNORED = {
    "reporting": "only affects logging or reporting",
    "eval": "grpo_fast evaluates with eval_steps and eval_num_prompts",
    "checkpoint": "grpo_fast writes its own safetensors checkpoints (save_steps, save_total_limit)",
    "hub": "grpo_fast does not push to the Hugging Face Hub",
    "launch": "grpo_fast is launched with torchrun (data parallel over prompts); set the launch mode there",
    "speed": "only affects speed or memory; grpo_fast's own kernels and sampler take its place",
    "data": "only affects data loading; every dataset column reaches the reward functions",
    "vllm": "vLLM is not used (use_vllm is refused)",
    "unused": "not used by GRPO (TRL's GRPOTrainer ignores it too, or it only applies to a refused option)",
}
_IGNORED_GROUPS = {
    "reporting": ("logging_strategy", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter", "log_level",
                  "log_level_replica", "disable_tqdm", "run_name", "project", "trackio_space_id",
                  "trackio_bucket_id", "trackio_static_space_id", "include_num_input_tokens_seen",
                  "skip_memory_metrics", "debug", "log_completions", "log_multimodal", "num_completions_to_print",
                  "log_unique_prompts", "log_completions_hub_repo"),
    "eval": ("eval_strategy", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only", "eval_on_start",
             "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics",
             "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "do_train", "do_eval", "do_predict",
             "load_best_model_at_end", "metric_for_best_model", "greater_is_better"),
    "checkpoint": ("save_strategy", "save_only_model", "save_on_each_node", "enable_jit_checkpoint",
                   "restore_callback_states_from_checkpoint", "ignore_data_skip"),
    "hub": ("push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push",
            "hub_revision"),
    "launch": ("use_cpu", "accelerator_config", "parallelism_config", "ddp_find_unused_parameters",
               "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout",
               "fsdp_config", "deepspeed", "local_rank", "full_determinism", "ds3_gather_for_generation"),
    "speed": ("tf32", "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs", "torch_compile",
              "torch_compile_backend", "torch_compile_mode", "use_liger_kernel", "liger_kernel_config", "use_cache",
              "torch_empty_cache_steps", "pad_to_multiple_of", "cache_implementation",
              "use_transformers_continuous_batching", "transformers_continuous_batching_config",
              "use_transformers_paged"),
    "data": ("data_seed", "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory",
             "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
             "dataloader_in_order", "remove_unused_columns", "label_names", "train_sampling_strategy",
             "length_column_name"),
    "vllm": ("vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex",
             "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_group_port",
             "vllm_gpu_memory_utilization", "vllm_max_model_length", "vllm_tensor_parallel_size",
             "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
             "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap"),
    "unused": ("label_smoothing_factor", "ref_model_mixup_alpha", "ref_model_sync_steps",
               "max_tool_calling_iterations"),
}
IGNORED_FIELDS: dict[str, str] = {name: _WHY_IGNORED[g] for g, names in _IGNORED_GROUPS.items() for name in names}
# Ignored names whose truthy value asks for something the user should know is not happening.
_WARN_IF_SET = ("parallelism_config", "fsdp_config", "deepspeed", "torch_compile", "tf32", "full_determinism")
_ALIASES = {"activation_checkpointing": "gradient_checkpointing"}  # transformers 5 renamed it; TRL uses the old name


def _f(default: Any, help: str, *, math: bool = False, **bounds: float) -> Any:
    """A field with its --help text, whether it changes the optimization (`math`: a resume refuses a change) and its
    bounds (`ge`, `gt`, `le`, `lt`; None passes where the type allows it)."""
    meta = {"help": help, "math": math, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class _Fields:
    # Training basics: transformers.TrainingArguments names, TRL's defaults.
    output_dir: str = _f("trainer_output", "Where checkpoints, logs and plots go.")
    learning_rate: float = _f(1e-6, "Initial AdamW learning rate.", math=True, ge=0)
    per_device_train_batch_size: int = _f(8, "Completions per device per micro-step (as in TRL).", math=True, ge=1)
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.", math=True, ge=1)
    num_train_epochs: float = _f(3.0, "Passes over the prompts; max_steps > 0 overrides it.", gt=0)
    max_steps: int = _f(-1, "Optimizer steps to run; -1 = derive from num_train_epochs.")
    max_grad_norm: float | None = _f(1.0, "Gradient-norm clip; None or 0 = no clipping.", math=True, ge=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", math=True, ge=0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", math=True, ge=0, lt=1)
    adam_beta2: float = _f(0.999, "AdamW beta2.", math=True, ge=0, lt=1)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", math=True, gt=0)
    warmup_steps: int | float = _f(0, "Linear warm-up steps; < 1 = fraction of the total steps.", math=True, ge=0)
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule (transformers.get_scheduler name).", math=True)
    lr_scheduler_kwargs: dict[str, Any] | None = _f(None, "Extra keyword arguments of the schedule (JSON).", math=True)
    seed: int = _f(42, "Seed of sampling, shuffling and initialization.")
    logging_steps: int | float = _f(10, "Log every N optimizer steps; < 1 = fraction of the total steps.", gt=0)
    save_steps: int | float | None = _f(500, "Checkpoint every N optimizer steps; < 1 = fraction; 0/None = never.",
                                        ge=0)
    save_total_limit: int | None = _f(None, "Keep at most this many checkpoints; None = keep all.", ge=1)
    eval_steps: int | float | None = _f(None, "Evaluate every N optimizer steps; < 1 = fraction; 0/None = never.",
                                        ge=0)
    bf16: bool | None = _f(None, "bf16 autocast on CUDA (fp32 master weights; the CPU trains in fp32); None = on "
                           "(TRL's default).", math=True)
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward to save memory.")
    fsdp: str | None = _f(None, "'full_shard': shard weights, gradients and optimizer states over the torchrun ranks "
                          "with FSDP2 (one unit per decoder layer + the root); None = replicate (data parallel).")
    report_to: list[str] | str = _f("none", "Metric sinks: tensorboard, wandb (if installed), all or none.")
    resume_from_checkpoint: str | None = _f(None, "Checkpoint folder to resume from.")
    # Model and data (TRL names)
    model_init_kwargs: dict[str, Any] | None = _f(None, "Keyword arguments of from_pretrained (JSON).", math=True)
    trust_remote_code: bool = _f(False, "Allow models and tokenizers that ship Python code.")
    disable_dropout: bool = _f(False, "Set every dropout probability of the model to 0.", math=True)
    shuffle_dataset: bool = _f(True, "Shuffle the training prompts.")
    chat_template_kwargs: dict[str, Any] | None = _f(None, "Keyword arguments of apply_chat_template (JSON).",
                                                     math=True)
    max_prompt_length: int | None = _f(512, "Ours: prompts are left-truncated to this many tokens, with a warning; "
                                       "None = no limit.", math=True, ge=1)
    # Generation (TRL names)
    num_generations: int = _f(8, "Completions per prompt (the group size G); advantages compare them.", math=True,
                              ge=2)
    num_generations_eval: int | None = _f(None, "Completions per prompt in evaluation; None = num_generations.", ge=1)
    max_completion_length: int | None = _f(512, "Maximum completion tokens.", math=True, ge=1)
    generation_batch_size: int | None = _f(None, "Completions per generation round (all ranks); None = derived.",
                                           math=True, ge=1)
    steps_per_generation: int | None = _f(None, "Micro-steps per generation round; None = "
                                          "gradient_accumulation_steps.", math=True, ge=1)
    temperature: float = _f(1.0, "Sampling temperature (also divides the training logits).", math=True, gt=0)
    top_p: float = _f(1.0, "Nucleus sampling mass.", math=True, gt=0, le=1)
    top_k: int = _f(0, "Top-k sampling; 0 = off.", math=True, ge=0)
    min_p: float | None = _f(None, "Min-p sampling; None = off.", math=True, ge=0, le=1)
    repetition_penalty: float = _f(1.0, "Repetition penalty; 1 = off.", math=True, gt=0)
    stop: list[str] | None = _f(None, "Ours: strings that end a completion.", math=True)
    # Loss (TRL names)
    beta: float = _f(0.0, "KL coefficient; 0 = no reference model.", math=True, ge=0)
    num_iterations: int = _f(1, "Optimization passes over each generation round (mu).", math=True, ge=1)
    epsilon: float = _f(0.2, "Lower clipping epsilon.", math=True, ge=0)
    epsilon_high: float | None = _f(None, "Upper clipping epsilon; None = epsilon.", math=True, ge=0)
    delta: float | None = _f(None, "Two-sided GRPO upper bound of the ratio; None = off.", math=True, gt=1)
    sapo_temperature_neg: float = _f(1.05, "SAPO gate temperature, non-positive advantages.", math=True, gt=0)
    sapo_temperature_pos: float = _f(1.0, "SAPO gate temperature, positive advantages.", math=True, gt=0)
    vespo_k_pos: float = _f(2.0, "VESPO power, positive advantages.", math=True, ge=0)
    vespo_lambda_pos: float = _f(3.0, "VESPO decay, positive advantages.", math=True, ge=0)
    vespo_k_neg: float = _f(3.0, "VESPO power, negative advantages.", math=True, ge=0)
    vespo_lambda_neg: float = _f(2.0, "VESPO decay, negative advantages.", math=True, ge=0)
    importance_sampling_level: str = _f("token", "Importance ratio per token or per sequence (GSPO).", math=True)
    reward_weights: list[float] | None = _f(None, "Weight of each reward function; None = all 1.", math=True)
    multi_objective_aggregation: str = _f("sum_then_normalize", "How several reward functions combine.", math=True)
    scale_rewards: str = _f("group", "Advantage scaling (True/False = group/none).", math=True)
    loss_type: str = _f("dapo", "Loss aggregation / formulation.", math=True)
    mask_truncated_completions: bool = _f(False, "Exclude truncated completions from the loss.", math=True)
    top_entropy_quantile: float = _f(1.0, "Keep the top-rho entropy quantile of tokens in the loss.", math=True,
                                     ge=0, le=1)
    entropy_coef: float = _f(0.0, "Entropy bonus coefficient.", math=True, ge=0)
    use_adaptive_entropy: bool = _f(False, "Adapt entropy_coef toward entropy_target (Skywork-OR1).", math=True)
    entropy_coef_min: float = _f(0.0, "Lower bound of the adaptive entropy coefficient.", math=True, ge=0)
    entropy_coef_max: float = _f(1.0, "Upper bound of the adaptive entropy coefficient.", math=True, ge=0)
    entropy_coef_delta: float = _f(0.005, "Step of the adaptive entropy coefficient.", math=True, gt=0)
    entropy_target: float = _f(0.2, "Target mean entropy (nats) of adaptive entropy control.", math=True, ge=0)
    use_bias_correction_kl: bool = _f(True, "Multiply the KL term by the importance ratio.", math=True)
    # Ours
    estimator: str = _f("grpo", "Ours: advantage baseline, group mean (grpo) or leave-one-out (rloo).", math=True)
    recompute_old_logprobs: bool = _f(False, "Ours: when completions serve several optimizer steps, recompute the "
                                      "old log-probs with a forward pass (TRL) instead of using the sampler's.",
                                      math=True)
    shared_prefix_update: bool = _f(True, "Ours: the training forward processes each prompt once per group.")
    skip_zero_std_groups: bool = _f(False, "Ours: drop groups whose rewards are all equal and resample to keep the "
                                    "batch full (DAPO dynamic sampling).", math=True)
    reward_timeout: float | None = _f(60.0, "Ours: seconds allowed per reward-function call; None = no limit.", gt=0)
    max_consecutive_skipped_steps: int = _f(10, "Ours: stop after this many optimizer steps skipped in a row.", ge=0)
    log_sampling_logprob_gap: bool = _f(True, "Ours: log the gap between sampler and training log-probs.")
    eval_num_prompts: int | None = _f(None, "Ours: prompts per evaluation; None = the whole eval set.", ge=1)

    def __post_init__(self) -> None:  # the generated __init__ calls it only if it exists here; GRPOConfig's runs
        pass


_HINTS = typing.get_type_hints(_Fields)
_OWN = frozenset(f.name for f in dataclasses.fields(_Fields))
_DERIVED = ("bf16", "epsilon_high", "generation_batch_size", "steps_per_generation")
_MATH_FIELDS = tuple(f.name for f in dataclasses.fields(_Fields) if f.metadata["math"])
_OPS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _warn(message: str) -> None:
    """warnings.warn attributed to the first caller outside this module (and the generated dataclass __init__)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename in (__file__, "<string>"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _invalid(name: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: {valid}.")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _matches(value: Any, tp: Any) -> bool:
    """Whether `value` fits the annotation `tp` (the subset of types the config uses)."""
    if isinstance(tp, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is list:
        (elem,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, elem) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return _is_num(value)
    if tp is int:
        return _is_num(value) and isinstance(value, int)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same kind (True is not 1; 1 is 1.0)."""
    return (type(a) is type(b) or _is_num(a) and _is_num(b)) and a == b


def _split_names(values: dict[str, Any], own: frozenset[str]) -> dict[str, Any]:
    """Keep our fields, refuse unsupported math-changing TRL names, drop ignored ones, reject unknown names."""
    kept: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        name = _ALIASES.get(name, name) if name not in own else name
        if name in own:
            if name in kept and not _same(kept[name], value):
                raise ValueError(f"{key}={value!r} conflicts with {name}={kept[name]!r}; give only one of them.")
            kept[name] = value
        elif name in REFUSED_FIELDS:
            accepted, reason = REFUSED_FIELDS[name]
            if not any(_same(value, a) for a in accepted):
                raise ValueError(f"{name}={value!r} is not supported by grpo_fast: {reason}. Remove it or set it to "
                                 f"{accepted[0]!r}.")
        elif name in IGNORED_FIELDS:
            if name in _WARN_IF_SET and value:
                _warn(f"{name}={value!r} is ignored: {IGNORED_FIELDS[name]}.")
        else:
            known = sorted(own | set(REFUSED_FIELDS) | set(IGNORED_FIELDS) | set(_ALIASES))
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "; see GRPOConfig's fields."
            raise ValueError(f"unknown config field {key!r}{hint}")
    return kept


class GRPOConfig(_Fields):
    """Options of a grpo_fast GRPO run (a dataclass; keyword arguments only).

    Accepts every TRL 1.16 `GRPOConfig` / `TrainingArguments` name: see the module docstring, `REFUSED_FIELDS`
    and `IGNORED_FIELDS`. After construction the derived values are resolved as TRL resolves them:
    `steps_per_generation` defaults to `gradient_accumulation_steps`, `generation_batch_size` to
    `per_device_train_batch_size * world_size * steps_per_generation`, `epsilon_high` to `epsilon`, `bf16` to True,
    `scale_rewards` True/False to "group"/"none", `report_to` to a list. The world size is torchrun's `WORLD_SIZE`.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs = _split_names(kwargs, _OWN)
        # What the user gave for the derived fields, so `replace` re-derives instead of keeping stale values.
        self._given = {n: kwargs.get(n) for n in _DERIVED}
        super().__init__(**kwargs)

    def __post_init__(self) -> None:
        self._coerce()
        self._check_types()
        self._check_bounds()
        self._resolve()
        self._validate()
        self._warn_combinations()

    def _coerce(self) -> None:
        """Accept the spellings TRL accepts: JSON strings for dicts, booleans for scale_rewards, a bare report_to."""
        for f in dataclasses.fields(_Fields):  # transformers' str enums (SchedulerType ...) become plain strings
            if isinstance(getattr(self, f.name), enum.Enum):
                setattr(self, f.name, getattr(self, f.name).value)
        for name in ("model_init_kwargs", "chat_template_kwargs", "lr_scheduler_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as e:
                    raise _invalid(name, value, f"must be a dict or a JSON object string ({e})") from None
        if isinstance(self.scale_rewards, bool) or str(self.scale_rewards).lower() in ("true", "false"):
            self.scale_rewards = "group" if str(self.scale_rewards).lower() == "true" else "none"
        if self.report_to is None or isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in (None, "none") else [self.report_to]
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.fsdp, (list, tuple)):  # transformers' list of FSDPOption
            self.fsdp = " ".join(str(getattr(o, "value", o)) for o in self.fsdp)
        if isinstance(self.fsdp, str) and not self.fsdp.strip():
            self.fsdp = None
        for name in ("reward_weights", "stop", "report_to"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))

    def _check_types(self) -> None:
        for f in dataclasses.fields(_Fields):
            value = getattr(self, f.name)
            if not _matches(value, _HINTS[f.name]):
                raise _invalid(f.name, value, f"must be of type {_type_name(_HINTS[f.name])}")

    def _check_bounds(self) -> None:
        for f in dataclasses.fields(_Fields):
            value, bounds = getattr(self, f.name), f.metadata["bounds"]
            if not bounds or value is None:  # None passed the type check, so the field allows it
                continue
            if not (math.isfinite(value) and all(_OPS[op][1](value, b) for op, b in bounds.items())):
                arms = typing.get_args(_HINTS[f.name]) or (_HINTS[f.name],)
                kind = "an integer" if int in arms and float not in arms else "a finite number"
                valid = " and ".join(f"{_OPS[op][0]} {b}" for op, b in bounds.items())
                raise _invalid(f.name, value, f"must be {kind} {valid}" + (" or None" if type(None) in arms else ""))

    def _resolve(self) -> None:
        """TRL's derived values: bf16 on, epsilon_high = epsilon, generation_batch_size <-> steps_per_generation."""
        if self.bf16 is None:
            self.bf16 = True
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]
        self.save_steps = self.save_steps or None  # 0 = off, like None
        self.eval_steps = self.eval_steps or None
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        per_round = self.per_device_train_batch_size * self.world_size  # completions per micro-step, all ranks
        gen, spg = self.generation_batch_size, self.steps_per_generation
        if gen is None and spg is None:
            spg = self.gradient_accumulation_steps
            gen = per_round * spg
        elif spg is None:
            if gen % per_round != 0:
                raise _invalid("generation_batch_size", gen, f"must be divisible by the global micro-batch "
                               f"per_device_train_batch_size * world_size = {per_round}")
            spg = gen // per_round
        elif gen is None:
            gen = per_round * spg
        elif gen != per_round * spg:
            raise _invalid("steps_per_generation", spg, f"must match generation_batch_size={gen} "
                           f"(per_device_train_batch_size * world_size * steps_per_generation = {per_round * spg}); "
                           "give only one of them")
        self.generation_batch_size, self.steps_per_generation = gen, spg

    def _validate(self) -> None:
        """What the types and bounds do not say."""
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                close = difflib.get_close_matches(str(getattr(self, name)), choices, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise _invalid(name, getattr(self, name), f"must be one of {', '.join(choices)}{hint}")
        if not self.output_dir:
            raise _invalid("output_dir", self.output_dir, "must be a non-empty path")
        if not (self.max_steps > 0 or self.max_steps == -1):
            raise _invalid("max_steps", self.max_steps, "must be a positive number of optimizer steps or -1 (use "
                           "num_train_epochs)")
        for name in ("warmup_steps", "logging_steps", "save_steps", "eval_steps"):
            value = getattr(self, name)
            if value is not None and value >= 1 and value != int(value):
                raise _invalid(name, value, "must be a whole number of steps, or a fraction < 1 of the total steps")
        if self.stop is not None and not all(self.stop):
            raise _invalid("stop", self.stop, "must be a list of non-empty strings or None")
        if self.reward_weights is not None and not (self.reward_weights
                                                    and all(math.isfinite(w) for w in self.reward_weights)):
            raise _invalid("reward_weights", self.reward_weights, "must be a non-empty list of finite numbers or None")
        if self.entropy_coef_max < self.entropy_coef_min:
            raise _invalid("entropy_coef_max", self.entropy_coef_max, f"must be >= entropy_coef_min "
                           f"({self.entropy_coef_min})")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise _invalid("max_completion_length", None, "must be set with loss_type='dr_grpo' (its normalizing "
                           "constant)")
        if self.fsdp is not None:
            tokens = set(self.fsdp.split())
            if "full_shard" not in tokens or tokens - {"full_shard", "auto_wrap"}:
                raise _invalid("fsdp", self.fsdp, "must be 'full_shard' (FSDP2 full sharding; 'auto_wrap' may be "
                               "added, it is what happens anyway) or None/'' for off; shard_grad_op, hybrid_shard "
                               "and offload are not supported")
            self.fsdp = "full_shard"
        self._validate_report_to()
        self._validate_batch()

    def _validate_batch(self) -> None:
        gen, g = self.generation_batch_size, self.num_generations
        if gen % g == 0:
            return
        per_round = self.per_device_train_batch_size * self.world_size
        divisors = [d for d in range(2, gen + 1) if gen % d == 0]
        step = g // math.gcd(g, self.world_size * self.steps_per_generation)  # valid per-device sizes are multiples
        below = (self.per_device_train_batch_size // step) * step
        sizes = [s for s in (below, below + step) if s >= 1]
        raise _invalid("num_generations", g, f"must divide generation_batch_size = {gen} (per_device_train_batch_size "
                       f"{self.per_device_train_batch_size} x world_size {self.world_size} x steps_per_generation "
                       f"{gen // per_round}) so that every prompt group is whole; valid num_generations for this "
                       f"batch: {', '.join(map(str, divisors)) or 'none'}; or keep num_generations={g} and set "
                       f"per_device_train_batch_size to {' or '.join(map(str, sizes))}")

    def _validate_report_to(self) -> None:
        reporters: list[str] = []
        for name in self.report_to:
            if name == "all":
                reporters += [r for r in REPORTERS if _installed(r)]
            elif name == "none":
                continue
            elif name in REPORTERS:
                if not _installed(name):
                    raise _invalid("report_to", self.report_to, f"must name installed reporters; {name!r} is not "
                                   f"installed (pip install {name})")
                reporters.append(name)
            elif name in _OTHER_REPORTERS:
                _warn(f"report_to={name!r} is ignored: grpo_fast reports to {', '.join(REPORTERS)} only")
            else:
                raise _invalid("report_to", self.report_to, f"must hold {', '.join(REPORTERS)}, all or none "
                               f"({name!r} is unknown)")
        self.report_to = list(dict.fromkeys(reporters))

    def _warn_combinations(self) -> None:
        """The combinations TRL 1.16's GRPOTrainer warns about."""
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            _warn("loss_type='luspo' is meant for importance_sampling_level='sequence' (the LUSPO paper's "
                          "setup).")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            _warn("loss_type='vespo' computes sequence-level weights itself: importance_sampling_level should "
                          "be 'token' (the default).")
        if self.importance_sampling_level == "sequence" and self.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            _warn(f"importance_sampling_level='sequence' with loss_type={self.loss_type!r} sums per-token "
                          "contributions, weighting each sequence by its length; the GSPO paper's setup is "
                          "loss_type='grpo'.")

    @property
    def world_size(self) -> int:
        """Number of data-parallel ranks (torchrun's WORLD_SIZE; 1 when not launched by torchrun)."""
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def effective_batch_size(self) -> int:
        """Completions per optimizer step, all ranks: per_device_train_batch_size * gradient_accumulation_steps *
        world_size."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def prompts_per_generation(self) -> int:
        """Distinct prompts per generation round, all ranks."""
        return self.generation_batch_size // self.num_generations

    @property
    def needs_old_logprobs(self) -> bool:
        """Whether completions serve several optimizer steps, so the ratio needs old log-probs (TRL's condition:
        gradient_accumulation_steps is not a multiple of steps_per_generation * num_iterations)."""
        return self.gradient_accumulation_steps % (self.steps_per_generation * self.num_iterations) != 0

    def resolve_interval(self, name: str, total_steps: int) -> int | None:
        """logging_steps, save_steps, eval_steps or warmup_steps in optimizer steps (a fraction < 1 is of
        `total_steps`, rounded up, as transformers does); None when the interval is off."""
        value = getattr(self, name)
        if value is None:
            return None
        return int(value) if value >= 1 else math.ceil(total_steps * value)

    def to_dict(self) -> dict[str, Any]:
        """Every field with its resolved value (JSON-serializable); `from_dict` takes it back."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(_Fields)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GRPOConfig:
        """Build from a dict of field names (ours, TRL's or TrainingArguments'; '-' or '_'), e.g. a YAML file or a
        TRL `GRPOConfig.to_dict()`. TRL's strategy switches map onto ours: save_strategy / eval_strategy "no" turn
        checkpoints / evaluation off."""
        d = dict(d)
        keys = {k.replace("-", "_"): k for k in d}
        for strategy, steps in (("save_strategy", "save_steps"), ("eval_strategy", "eval_steps")):
            value = d.get(keys.get(strategy))
            if getattr(value, "value", value) == "no":  # a plain string or transformers' IntervalStrategy.NO
                d.pop(keys.get(steps), None)
                d[steps] = None
        return cls(**d)

    def replace(self, **changes: Any) -> GRPOConfig:
        """A copy with `changes`, re-deriving the derived fields the user did not set (unlike dataclasses.replace,
        which would keep the old derived values)."""
        values = self.to_dict()
        values.update({n: v for n, v in self._given.items() if n not in changes})
        values.update(changes)
        return type(self)(**values)

    @staticmethod
    def math_fields() -> tuple[str, ...]:
        """Fields whose change alters the optimization: resuming a checkpoint with a different value is refused."""
        return _MATH_FIELDS

    def changed_math_fields(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """{name: (saved, now)} for each math field that differs from a saved `to_dict()` (absent names skipped)."""
        now = self.to_dict()
        return {n: (saved[n], now[n]) for n in _MATH_FIELDS if n in saved and not _same(saved[n], now[n])}


def _installed(package: str) -> bool:
    modules = ("tensorboard", "tensorboardX") if package == "tensorboard" else (package,)
    return any(importlib.util.find_spec(m) is not None for m in modules)


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _converter(tp: Any) -> Any:
    """A function parsing one command-line word into a value of annotation `tp`."""
    arms = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    optional = type(None) in arms
    arms = tuple(a for a in arms if a is not type(None))
    if any(typing.get_origin(a) is dict or a is dict for a in arms):
        base = json.loads
    elif bool in arms:
        base = _parse_bool
    elif int in arms and float in arms:
        base = _number
    elif int in arms:
        base = int
    elif float in arms:
        base = float
    else:
        base = str

    def convert(text: str) -> Any:
        if optional and text.strip().lower() in ("none", "null"):
            return None
        return base(text)

    convert.__name__ = getattr(base, "__name__", "value")
    return convert


class _ListAction(argparse.Action):
    """Comma-separated and/or repeated values (`--stop a,b --stop c`); a backslash keeps a comma (`\\,`); "none"
    alone gives None."""

    def __init__(self, *args: Any, convert: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.convert = convert

    def __call__(self, parser, namespace, values, option_string=None):
        if values.strip().lower() in ("none", "null"):
            setattr(namespace, self.dest, None)
            return
        parts = [p.replace("\0", ",") for p in values.replace("\\,", "\0").split(",") if p != ""]
        current = getattr(namespace, self.dest, None)  # earlier occurrences of the flag; a default is replaced
        current = list(current) if isinstance(current, list) and current is not self.default else []
        try:
            items = [self.convert(p) for p in parts]
        except ValueError as e:
            raise argparse.ArgumentError(self, f"invalid list item in {values!r}: {e}") from None
        setattr(namespace, self.dest, current + items)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per GRPOConfig field (`--learning_rate` and `--learning-rate`). Booleans take true/false (a bare
    flag means true), lists are comma-separated or repeated, optional values accept "none", dicts take JSON. Flags
    left out stay out of the namespace, so a YAML file or the defaults fill them (see `config_from_args`)."""
    group = parser.add_argument_group("GRPOConfig")
    for f in dataclasses.fields(_Fields):
        tp = _HINTS[f.name]
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        valid = [f"one of {', '.join(CHOICES[f.name])}"] if f.name in CHOICES else []
        valid += [f"{_OPS[op][0]} {b}" for op, b in f.metadata["bounds"].items()]
        help_text = f"{f.metadata['help']} (default: {default!r}{'; ' if valid else ''}{' and '.join(valid)})"
        help_text = help_text.replace("%", "%%")
        arms = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
        list_arm = next((a for a in arms if typing.get_origin(a) is list), None)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if list_arm is not None:
            convert = _converter(typing.get_args(list_arm)[0])
            kwargs.update(action=functools.partial(_ListAction, convert=convert), metavar="A,B")
        elif bool in arms:
            kwargs.update(type=_converter(tp), nargs="?", const=True, metavar="true|false")
        else:
            kwargs.update(type=_converter(tp))
        group.add_argument(*flags, **kwargs)
    return parser


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (PyYAML) or JSON mapping of config names (JSON is used when the file ends in .json or PyYAML is
    not importable)."""
    with open(path) as fh:
        text = fh.read()
    if str(path).endswith(".json") or importlib.util.find_spec("yaml") is None:
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field names to values")
    return data


def config_from_args(namespace: argparse.Namespace, yaml_path: str | os.PathLike | None = None) -> GRPOConfig:
    """Build a GRPOConfig from defaults, then the file at `yaml_path` (YAML or JSON; any TRL name accepted), then the
    flags given on the command line (they win). Namespace entries that are neither config fields nor TRL names (the
    CLI's own flags) are left alone."""
    values = load_config_file(yaml_path) if yaml_path is not None else {}
    # TRL-only names may sit in the namespace too (a CLI that turns a file's keys into parser defaults): keep them,
    # so that a refused one is still refused
    known = _OWN | set(REFUSED_FIELDS) | set(IGNORED_FIELDS) | set(_ALIASES)
    values.update({k: v for k, v in vars(namespace).items() if k in known})
    return GRPOConfig.from_dict(values)
