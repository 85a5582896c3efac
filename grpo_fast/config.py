"""GRPOConfig: TRL 1.16's ``trl.GRPOConfig`` (every field, name, default and check is TRL's and transformers') plus the
few options of grpo_fast's own parts, and a check of the loss and sampling values TRL accepts at construction and
fails on later (or never): each is refused here by name with its valid values.

Ours, each read by ``grpo_fast.GRPOTrainer``:
- ``use_shared_prefix_sampler``: generation by the shared-prefix KV-cache sampler (each prompt prefilled once for its
  group); False, or an input it cannot serve, uses TRL's own generation;
- ``use_shared_prefix_update``: the training forward runs each prompt once per group (and minibatches shuffle whole
  groups); False: TRL's padded rows and row shuffle;
- ``reward_timeout`` and ``reward_errors``: a reward function that hangs or raises costs its rewards (unscored,
  counted in ``rewards/<name>/failures``), not the run;
- ``max_consecutive_skipped_steps``: an optimizer step with a non-finite gradient is skipped (``skipped_steps``);
  this many in a row stop training with an error;
- ``plot``: ``metrics.png`` (reward and entropy per logged step) in ``output_dir`` at the end of training;
- ``skip_zero_std_groups`` and ``max_resample_rounds``: DAPO's dynamic sampling, groups whose rewards are all equal
  replaced by fresh prompts' groups (grpo_fast/dynamic_sampling.py).

One default differs from TRL's: ``bf16`` left unset on a machine without CUDA resolves to False (fp32), because on
most CPUs bf16 is emulated and slower than fp32, and fp32 is what the CPU numerics are tested in; ``bf16=True`` is
honoured (on a CPU with AMX tiles it is the faster choice: ``native_bf16``; the CLI's ``bf16: auto`` picks it there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from grpo_fast.sampler import check_sampling_options

try:
    from trl import GRPOConfig as _TRLGRPOConfig
except ImportError as e:  # pragma: no cover
    raise ImportError("grpo_fast.GRPOConfig needs trl: pip install 'trl>=1.16,<1.17'") from e

REWARD_ERRORS = ("unscored", "raise")


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: a CUDA GPU with bf16 support, or a CPU with AMX tiles (there
    bf16 GEMMs run several times faster than fp32 ones; on other CPUs bf16 is emulated, slower than fp32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx and amx())


@dataclass
class GRPOConfig(_TRLGRPOConfig):
    """``trl.GRPOConfig`` with grpo_fast's options (see the module docstring)."""

    use_shared_prefix_sampler: bool = field(
        default=True,
        metadata={"help": "grpo_fast: generate with the shared-prefix KV-cache sampler (each prompt prefilled once "
                          "per group). Inputs it cannot serve fall back to TRL's generation with a warning."},
    )
    use_shared_prefix_update: bool = field(
        default=True,
        metadata={"help": "grpo_fast: the log-prob forward runs each prompt once per group, and minibatches shuffle "
                          "whole groups instead of rows."},
    )
    reward_timeout: float | None = field(
        default=None,
        metadata={"help": "grpo_fast: seconds allowed per call of a reward function (not a reward model); a call "
                          "past it is abandoned and its rewards are unscored. None: no limit."},
    )
    reward_errors: str = field(
        default="unscored",
        metadata={"help": "grpo_fast: what an exception or a time-out in a reward function does: 'unscored' (its "
                          "rewards are NaN for this batch, with a warning) or 'raise' (TRL's behaviour).",
                  "choices": list(REWARD_ERRORS)},
    )
    max_consecutive_skipped_steps: int = field(
        default=10,
        metadata={"help": "grpo_fast: an optimizer step whose gradient is not finite is skipped; after this many in "
                          "a row training stops with an error."},
    )
    plot: bool = field(
        default=True,
        metadata={"help": "grpo_fast: write metrics.png (reward and entropy per logged step) to output_dir at the end "
                          "of training (needs matplotlib)."},
    )
    skip_zero_std_groups: bool = field(
        default=False,
        metadata={"help": "grpo_fast: DAPO's dynamic sampling. Groups whose rewards are all equal (no advantage "
                          "signal) are replaced by groups of fresh train prompts, for at most max_resample_rounds "
                          "rounds; groups still zero-std after that stay. Train mode only."},
    )
    max_resample_rounds: int = field(
        default=3,
        metadata={"help": "grpo_fast: with skip_zero_std_groups, how many rounds of fresh prompts at most replace the "
                          "zero-std groups of one generation batch."},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16 and not torch.cuda.is_available():
            self.bf16 = False  # see the module docstring
        if self.reward_errors not in REWARD_ERRORS:
            raise ValueError(f"reward_errors must be one of {', '.join(REWARD_ERRORS)}; got {self.reward_errors!r}")
        if self.reward_timeout is not None and not self.reward_timeout > 0:
            raise ValueError(f"reward_timeout must be None or a number of seconds > 0; got {self.reward_timeout!r}")
        _check_int(self, "max_consecutive_skipped_steps", 0)
        _check_int(self, "max_resample_rounds", 0)
        super().__post_init__()
        self._check_trl_values()

    def _check_trl_values(self) -> None:
        """TRL checks few values at construction; a bad loss or sampling option would fail steps later, or not at
        all. Each is refused here by name, with its valid values."""
        from grpo_fast.kernels.loss_options import LossOptions

        LossOptions.from_config(self)
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite float > 0 (it divides the logits); got {t!r}")
        if not self.beta >= 0:
            raise ValueError(f"beta (the KL coefficient) must be >= 0; got {self.beta!r}")
        _check_int(self, "max_completion_length", 1)
        check_sampling_options(self.num_generations, self.max_completion_length, self.temperature, self.top_p,
                               self.top_k, self.min_p, self.repetition_penalty, None, None)


def _check_int(config, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


#: grpo_fast's own fields and their defaults, for a trainer given TRL's own config
OWN_DEFAULTS = {name: f.default for name, f in GRPOConfig.__dataclass_fields__.items()
                if name not in _TRLGRPOConfig.__dataclass_fields__}


def own_option(args, name: str):
    """``args.<name>`` for grpo_fast's own options, or its default when ``args`` is TRL's config."""
    return getattr(args, name, OWN_DEFAULTS[name])
