"""Ratio-based objectives: the IS surrogate, PPO (GRPO/DAPO presets), CISPO and GSPO.

Notation (per sampled token t of sequence i): r = pi/mu, A = advantage, sg = stop-gradient.
Each function returns the per-token loss L = -J to minimise; d L / d log pi is the per-token
gradient the tests pin.
"""
from __future__ import annotations

from typing import Optional

import torch

from drpo.objectives.registry import ObjectiveOutput, TokenInputs, register_objective, register_preset, require

# verl's core_algos clamps GSPO's sequence log-ratio at 10 ("for numerical stability": s <= e^10);
# the same clamp keeps our GSPO loss equal to verl's (tests/test_integration_verl.py)
GSPO_LOG_RATIO_MAX = 10.0


@register_objective("pg_is")
def pg_is(x: TokenInputs) -> ObjectiveOutput:
    """Unregularised importance-sampled surrogate:  J = r * A,  dJ/dlog pi = r * A."""
    return ObjectiveOutput(loss=-x.advantages * x.ratio)


@register_objective("ppo")
def ppo(
    x: TokenInputs,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: Optional[float] = None,
) -> ObjectiveOutput:
    """PPO clipped surrogate (Schulman et al. 2017), clip-higher (DAPO) and dual-clip (Ye et al. 2020).

        L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
        dual-clip, for A < 0 only:  L = min(L, -A * clip_c)

    Gradient d L / d log pi = -A r where the unclipped branch is active, 0 where clipped:
    i.e. for A > 0 when r > 1 + clip_high, for A < 0 when r < 1 - clip_low, and (dual-clip)
    for A < 0 when r > clip_c.
    """
    require(0.0 < clip_low < 1.0, f"ppo: clip_low must be in (0, 1), got {clip_low}")
    require(clip_high > 0.0, f"ppo: clip_high must be > 0, got {clip_high}")
    require(clip_c is None or clip_c > 1.0, f"ppo: clip_c must be > 1 (dual-clip), got {clip_c}")
    A, r = x.advantages, x.ratio
    unclipped = -A * r
    clipped = -A * torch.clamp(r, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    inactive = clipped > unclipped
    if clip_c is not None:
        dual = -A * clip_c
        dual_active = (A < 0) & (dual < loss)
        loss = torch.where(dual_active, dual, loss)
        inactive = inactive | dual_active
    return ObjectiveOutput(loss=loss, inactive=inactive)


register_preset("grpo", "ppo", doc="GRPO: PPO clip 0.2/0.2 (group advantages come from the trainer).",
                clip_low=0.2, clip_high=0.2)
register_preset("dapo", "ppo", doc="DAPO clip-higher: PPO with clip 0.2/0.28.",
                clip_low=0.2, clip_high=0.28)


@register_objective("cispo")
def cispo(
    x: TokenInputs, *, clip_low: Optional[float] = None, clip_high: float = 4.0
) -> ObjectiveOutput:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the IS weight, never drop the token.

        J = sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * log pi
        dJ/dlog pi = clip(r, ...) * A

    MiniMax-M1 sets no lower bound (``clip_low=None``) and tunes only the upper one; the default
    upper bound r <= 5 equals TRL's ``epsilon_high=5.0`` for CISPO.
    """
    require(clip_low is None or 0.0 < clip_low <= 1.0, f"cispo: clip_low must be in (0, 1], got {clip_low}")
    require(clip_high > 0.0, f"cispo: clip_high must be > 0, got {clip_high}")
    low = 0.0 if clip_low is None else 1.0 - clip_low
    w = torch.clamp(x.ratio, low, 1.0 + clip_high).detach()
    truncated = (w != x.ratio) & x.mask
    clip_frac = truncated.sum().item() / max(int(x.mask.sum()), 1)
    return ObjectiveOutput(loss=-w * x.advantages * x.log_prob, metrics={"is_truncated_frac": clip_frac})


@register_objective("gspo")
def gspo(x: TokenInputs, *, clip_low: float = 3e-4, clip_high: float = 4e-4) -> ObjectiveOutput:
    """GSPO (Qwen, arXiv 2507.18071), token form with the sequence-level ratio.

        s_i   = exp( mean_t log r_{i,t} )                          (length-normalised sequence ratio)
        s_i,t = sg(s_i) * pi_t / sg(pi_t)                          (same value, per-token gradient)
        L     = max(-A s_i,t, -A clip(s_i,t, 1 - clip_low, 1 + clip_high))

    Gradient d L / d log pi_t = -A s_i where unclipped (the whole sequence clips together).
    The paper aggregates with ``seq-mean-token-mean``; pass ``agg_mode`` accordingly.
    Defaults are the paper's 3e-4 / 4e-4.
    """
    require(0.0 < clip_low < 1.0, f"gspo: clip_low must be in (0, 1), got {clip_low}")
    require(clip_high > 0.0, f"gspo: clip_high must be > 0, got {clip_high}")
    m = x.mask.float()
    n = m.sum(-1, keepdim=True).clamp(min=1.0)
    log_s = (x.log_ratio * m).sum(-1, keepdim=True) / n
    log_s_t = torch.clamp(x.log_prob - x.log_prob.detach() + log_s.detach(), max=GSPO_LOG_RATIO_MAX)
    s_t = torch.exp(log_s_t)
    A = x.advantages
    unclipped = -A * s_t
    clipped = -A * torch.clamp(s_t, 1.0 - clip_low, 1.0 + clip_high)
    return ObjectiveOutput(loss=torch.maximum(unclipped, clipped), inactive=clipped > unclipped)
