"""What the trust region did, per batch: the metrics every objective reports.

The gradient weight of token t is defined against the plain IS policy gradient:

    g_t = d L / d log pi_t            (exact, from autograd on the objective itself)
    w_t = g_t / (-A_t r_t)            (1 = plain r A gradient, 0 = switched off, < 0 = corrective)

so it is correct by construction for every objective, including users' own.
Buckets split tokens by behaviour probability mu: < 0.01, [0.01, 0.1), [0.1, 0.5), >= 0.5.
"""
from __future__ import annotations

from typing import Optional

import torch

from drpo.objectives.registry import TokenInputs

MU_TAIL = 0.01  # the long tail: sampled tokens with mu below this (the paper reports their share)
MU_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("mu<0.01", 0.0, MU_TAIL),
    ("mu<0.1", 0.01, 0.1),
    ("mu<0.5", 0.1, 0.5),
    ("mu>=0.5", 0.5, 1.01),
)


def _masked_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    mf = m.float()
    return (v * mf).sum() / mf.sum().clamp(min=1.0)


def trust_region_metrics(
    x: TokenInputs,
    grad: torch.Tensor,
    inactive: Optional[torch.Tensor],
    boundary: float,
) -> dict[str, float]:
    """Scalar metrics for one batch. ``grad`` is d(sum L)/d log pi per token (B, T);
    ``boundary`` the |pi - mu| threshold used for the beyond-the-boundary fractions."""
    m = x.mask
    A, r = x.advantages, x.ratio.detach()
    shift = (x.prob - x.behavior_prob).detach()
    plain = -A * r  # the plain IS policy-gradient weight; tokens where it is 0 carry no signal
    has_signal = m & (plain != 0)
    denom = torch.where(has_signal, plain, torch.ones_like(r))
    weight = torch.where(has_signal, grad / denom, torch.zeros_like(r))
    inactive = torch.zeros_like(m) if inactive is None else inactive & m
    k3 = r - 1.0 - x.log_ratio.detach()
    beyond_pos = shift > boundary
    beyond_neg = shift < -boundary
    neg = weight < 0

    names: list[str] = []
    values: list[torch.Tensor] = []

    def add(name: str, v: torch.Tensor) -> None:
        names.append(name)
        values.append(v.float())

    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    add("ratio_mean", _masked_mean(r, m))
    add("ratio_max", torch.where(m, r, zero).max())
    add("ratio_min", torch.where(m, r, torch.full_like(r, float("inf"))).min())
    add("kl_k3", _masked_mean(k3, m))
    add("abs_shift_mean", _masked_mean(shift.abs(), m))
    add("abs_shift_max", torch.where(m, shift.abs(), zero).max())
    add("beyond_pos_frac", _masked_mean(beyond_pos.float(), m))
    add("beyond_neg_frac", _masked_mean(beyond_neg.float(), m))
    add("inactive_frac", _masked_mean(inactive.float(), m))
    add("neg_weight_frac", _masked_mean(neg.float(), has_signal))
    add("weight_mean", _masked_mean(weight, has_signal))
    add("weight_min", torch.where(has_signal, weight, torch.full_like(r, float("inf"))).min())
    for name, lo, hi in MU_BUCKETS:
        b = m & (x.behavior_prob >= lo) & (x.behavior_prob < hi)
        bs = b & has_signal
        add(f"{name}/token_frac", b.float().sum() / m.float().sum().clamp(min=1.0))
        add(f"{name}/abs_shift_mean", _masked_mean(shift.abs(), b))
        add(f"{name}/abs_ratio_dev_mean", _masked_mean((r - 1.0).abs(), b))
        add(f"{name}/beyond_frac", _masked_mean((beyond_pos | beyond_neg).float(), b))
        add(f"{name}/inactive_frac", _masked_mean(inactive.float(), b))
        add(f"{name}/neg_weight_frac", _masked_mean(neg.float(), bs))
        add(f"{name}/weight_mean", _masked_mean(weight, bs))
    out = dict(zip(names, torch.stack(values).tolist()))
    if not bool(has_signal.any()):
        out["weight_min"] = 0.0
    return out
