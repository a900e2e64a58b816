"""An adaptive delta for DRPO (the paper's future work): ``objective.params.delta=auto``.

Step rule (PPO's adaptive KL penalty, Schulman et al. 2017, turned around for delta, since DRPO's
penalty coefficient is |A| / delta): after each step, with D the divergence measured over the step's
tokens (default: the token-mean k3 estimate of KL(mu || pi) over all its minibatches) and D* the target,

    D > 1.5 D*   ->  delta <- max(delta / 2, low)      (moved too far: tighten)
    D < D* / 1.5 ->  delta <- min(2 delta, high)       (room to move: loosen)
    otherwise        delta unchanged

starting from ``init``. The defaults are fixed a priori, not tuned on this project's runs: D* = 0.01 is
PPO's d_targ, ``init`` = ``high`` = 12.5 is the paper's delta (so in calm training the controller is
DRPO at delta 12.5, and it tightens only when the policy moves fast), ``low`` = 0.05 is a third of
DPPO's 0.15.

Per-token rule (``delta_per_token`` of the drpo objective, usable with a fixed delta too):
``bernoulli_std`` scales each token's delta by its Bernoulli standard deviation relative to mu = 0.5,
delta_t = delta * 2 sqrt(mu (1 - mu)): a shift |pi - mu| = delta_t is the same number of standard
deviations of the token's indicator for every token (the TV analogue of a chi-square trust region).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from drpo.utils.config import StrictConfig

PER_TOKEN_RULES = ("none", "bernoulli_std")


class AdaptiveDeltaConfig(StrictConfig):
    """The step rule's settings (used when ``objective.params.delta`` is ``auto``)."""

    target: float = Field(0.01, gt=0)
    measure: Literal["kl_k3", "abs_shift_mean"] = "kl_k3"
    init: float = Field(12.5, gt=0)
    low: float = Field(0.05, gt=0)
    high: float = Field(12.5, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AdaptiveDeltaConfig":
        if not self.low <= self.init <= self.high:
            raise ValueError(f"need low <= init <= high, got {self.low}, {self.init}, {self.high}")
        return self


def adapt_delta(delta: float, measured: float, cfg: AdaptiveDeltaConfig) -> float:
    """One step of the rule above: the delta for the next step."""
    if measured > 1.5 * cfg.target:
        return max(delta / 2.0, cfg.low)
    if measured < cfg.target / 1.5:
        return min(delta * 2.0, cfg.high)
    return delta


def token_delta(delta: float, mu: torch.Tensor, rule: str) -> torch.Tensor | float:
    """Per-token delta for ``rule`` ('none': delta itself; 'bernoulli_std': delta * 2 sqrt(mu (1 - mu)))."""
    if rule == "none":
        return delta
    if rule == "bernoulli_std":
        return delta * 2.0 * torch.sqrt((mu * (1.0 - mu)).clamp(min=1e-12))
    raise ValueError(f"unknown per-token delta rule {rule!r}; known: {list(PER_TOKEN_RULES)}")
