"""Rollout correction between the trainer's old policy and the rollout engine's mu.

When a user anchors the trust region on a recomputed old policy pi_old (``behavior_log_prob`` =
log pi_old) instead of the rollout engine's mu, the samples still came from mu. The importance
weight that corrects for it is

    rho_t = pi_old(y_t) / mu(y_t)                       (token level)
    rho_i = prod_t rho_t = exp(sum_t log rho_t)         (sequence level)

and composes multiplicatively with any objective's per-token loss (detached: no gradient):

    TIS (truncate):  L_t <- min(rho, upper) * L_t
    MIS (mask):      L_t <- 1[lower <= rho <= upper] * L_t     (IcePop's band: lower=0.5, upper=2)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from drpo.objectives.registry import LOG_RATIO_CLAMP

LEVELS = ("token", "sequence")
MODES = ("truncate", "mask")


@dataclass(frozen=True)
class RolloutCorrection:
    """level: 'token' or 'sequence'. mode: 'truncate' (TIS) or 'mask' (MIS / IcePop band).
    upper: truncation cap or upper band edge. lower: lower band edge (mask mode only)."""

    level: str = "token"
    mode: str = "truncate"
    upper: float = 2.0
    lower: Optional[float] = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"rollout correction: unknown level {self.level!r}; known: {list(LEVELS)}")
        if self.mode not in MODES:
            raise ValueError(f"rollout correction: unknown mode {self.mode!r}; known: {list(MODES)}")
        if not self.upper > 0:
            raise ValueError(f"rollout correction: upper must be > 0, got {self.upper}")
        if self.lower is not None:
            if self.mode != "mask":
                raise ValueError("rollout correction: lower applies to mode='mask' only")
            if not 0 <= self.lower < self.upper:
                raise ValueError(f"rollout correction: need 0 <= lower < upper, got {self.lower}, {self.upper}")

    @classmethod
    def tis(cls, upper: float = 2.0, level: str = "token") -> "RolloutCorrection":
        return cls(level=level, mode="truncate", upper=upper)

    @classmethod
    def icepop(cls, lower: float = 0.5, upper: float = 2.0, level: str = "token") -> "RolloutCorrection":
        return cls(level=level, mode="mask", upper=upper, lower=lower)


def correction_weights(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    mask: torch.Tensor,
    rc: RolloutCorrection,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Detached per-token weights (B, T) for ``rc`` and their metrics."""
    log_rho = torch.where(mask, old_log_prob.float() - rollout_log_prob.float(), 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if rc.level == "sequence":
        log_rho = log_rho.sum(-1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).expand_as(log_rho)
    rho = torch.exp(log_rho).detach()
    if rc.mode == "truncate":
        w = torch.clamp(rho, max=rc.upper)
        dropped = torch.zeros_like(mask)
    else:
        lower = 0.0 if rc.lower is None else rc.lower
        keep = (rho >= lower) & (rho <= rc.upper)
        w = keep.float()
        dropped = ~keep & mask
    n = mask.float().sum().clamp(min=1.0)
    metrics = {
        "rollout_corr/rho_mean": float((rho * mask).sum() / n),
        "rollout_corr/rho_max": float(torch.where(mask, rho, 0.0).max()),
        "rollout_corr/truncated_frac": float(((rho > rc.upper) & mask).float().sum() / n),
        "rollout_corr/masked_frac": float(dropped.float().sum() / n),
    }
    return torch.where(mask, w, 0.0), metrics
