"""The GRPO loss's options: one frozen, validated ``LossOptions`` (TRL 1.16's names and defaults), built once per
run from the config and carried to ``grpo_loss``, ``grpo_loss_ref`` and ``linear_grpo_loss``; ``resolve_options``
turns those ops' keyword API into one. Per-batch quantities (num_items_in_batch, gradient_accumulation_steps,
steps_per_generation, num_processes, entropy, entropy_mask) stay call arguments of the ops.
"""

from __future__ import annotations

import dataclasses
import math

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IS_LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The loss's configuration, with TRL 1.16's option names and defaults (see ``grpo_loss`` for the math). Built
    once per run (``LossOptions.from_config(args)``) and passed to ``grpo_loss``, ``grpo_loss_ref`` and
    ``linear_grpo_loss``; per-batch quantities (num_items_in_batch, gradient_accumulation_steps, ...) stay call
    arguments. ``epsilon_high=None`` means ``epsilon``; ``max_completion_length`` is dr_grpo's normalizer."""

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    importance_sampling_level: str = "token"
    max_completion_length: int | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")  # fmt: skip
        mcl = self.max_completion_length
        if self.loss_type == "dr_grpo" and (mcl is None or not mcl > 0):
            raise ValueError(f"max_completion_length (a positive int) is required for loss_type='dr_grpo', got {mcl}")
        for name in ("epsilon", "epsilon_high"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.delta is not None and not self.delta > 0:
            raise ValueError(f"delta must be None or > 0, got {self.delta}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not math.isfinite(self.beta):
            raise ValueError(f"beta must be a finite float, got {self.beta}")

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def from_config(cls, config) -> LossOptions:
        """The fields ``config`` carries under these names (grpo_fast's or TRL's GRPOConfig); others keep defaults."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)})


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LossOptions))


def resolve_options(options: LossOptions | None, keywords: dict, where: str = "grpo_loss") -> LossOptions:
    """``options`` (default: TRL's defaults) with keyword overrides: the ops' keyword API builds one LossOptions."""
    unknown = sorted(set(keywords) - set(_OPTION_NAMES))
    if unknown:
        raise TypeError(f"{where} got unexpected keyword arguments {unknown}; loss options are {list(_OPTION_NAMES)}")
    if options is None:
        return LossOptions(**keywords)
    if not isinstance(options, LossOptions):
        raise TypeError(f"options must be a LossOptions or None, got {type(options).__name__}")
    return dataclasses.replace(options, **keywords) if keywords else options
