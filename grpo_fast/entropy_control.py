"""The entropy bonus of the GRPO loss and its adaptive coefficient, with TRL 1.16's semantics (``entropy_coef``,
``use_adaptive_entropy``, ``entropy_coef_min`` / ``entropy_coef_max`` / ``entropy_coef_delta``, ``entropy_target``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from grpo_fast import distributed as dist
from grpo_fast.config import GRPOConfig


@dataclass
class EntropyControl:
    """TRL 1.16's entropy bonus and its adaptive coefficient (Skywork-OR1).

    The loss becomes ``L_policy − c·H / gradient_accumulation_steps``, with H the mean per-token entropy over the
    tokens the policy term acts on (the completion mask times the high-entropy mask). Static control applies
    ``c = entropy_coef``. Adaptive control applies ``c = coef`` only when the previous optimizer step's entropy
    ``H_w`` (token-weighted over its whole accumulation window and over all ranks) was ``<= entropy_target``, else
    0; at each optimizer step ``coef ← clamp(coef ± entropy_coef_delta, entropy_coef_min, entropy_coef_max)``,
    + when ``H_w <= entropy_target``. ``H_w`` starts at +inf, so the first window applies no bonus, as in TRL."""

    coef: float
    adaptive: bool = False
    target: float = 0.2
    delta: float = 0.005
    coef_min: float = 0.0
    coef_max: float = 1.0
    last_world_entropy: float = math.inf
    window: torch.Tensor | None = None  # [2] (entropy sum, token count) of the current accumulation window

    def __post_init__(self):
        # fixed for the run, as TRL's _entropy_bonus_enabled: adaptive control stays on at coef 0 to recover
        self.enabled = self.coef != 0.0 or self.adaptive

    @classmethod
    def from_config(cls, args: GRPOConfig) -> EntropyControl:
        return cls(args.entropy_coef, args.use_adaptive_entropy, args.entropy_target, args.entropy_coef_delta,
                   args.entropy_coef_min, args.entropy_coef_max)

    def applied(self) -> float:
        """The coefficient every minibatch of the current accumulation window multiplies H by."""
        if self.adaptive and not self.last_world_entropy <= self.target:
            return 0.0
        return self.coef

    def bonus(self, entropy: torch.Tensor, mask: torch.Tensor, gradient_accumulation_steps: int) -> torch.Tensor:
        """H of one minibatch, scaled for accumulation; ``entropy`` ``[N, L]`` keeps its gradient, ``mask``
        ``[N, L]``. Adds the minibatch to the adaptive controller's window."""
        m = mask.to(entropy.dtype)
        total, count = (entropy * m).sum(), m.sum()
        if self.adaptive:
            stats = torch.stack([total, count]).detach()  # [2]
            self.window = stats if self.window is None else self.window + stats
        return total / count.clamp(min=1.0) / gradient_accumulation_steps

    def step(self) -> None:
        """At an optimizer-step boundary: the window's entropy over all ranks moves the coefficient one step."""
        if not self.adaptive or self.window is None:
            return
        total = dist.all_reduce_sum(self.window)
        world_entropy = (total[0] / total[1].clamp(min=1.0)).item()
        if world_entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_world_entropy = world_entropy
        self.window = None

    def state(self) -> dict:
        return {"entropy_coef": self.coef, "last_world_entropy": self.last_world_entropy}

    def load(self, state: dict) -> None:
        if self.adaptive and "entropy_coef" in state:  # TRL restores the controller in adaptive mode only
            self.coef = state["entropy_coef"]
            self.last_world_entropy = state["last_world_entropy"]
