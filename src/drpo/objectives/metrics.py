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
from drpo.utils.constants import MU_TAIL
MU_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("mu<0.01", 0.0, MU_TAIL),
    ("mu<0.1", 0.01, 0.1),
    ("mu<0.5", 0.1, 0.5),
    ("mu>=0.5", 0.5, 1.01),
)
BUCKET_NAMES = tuple(name for name, _, _ in MU_BUCKETS)
# the metrics that measure the rollout/trainer mismatch when read before any update on a batch
MISMATCH_KEYS = ("abs_shift_mean", "abs_shift_max", "ratio_max", "kl_k3", "abs_ratio_dev_mean", "ratio_min",
                 "beyond_pos_frac", "beyond_neg_frac")

# How each metric combines over micro-batches (and over the minibatches of a step): (kind, count)
#   ("mean", c)      the mean weighted by count c in each micro-batch: equals the whole batch's value
#   ("max"/"min", c) the extreme over the micro-batches whose count c is positive
#   ("sum", None)    added up (the counts themselves)
#   ("step_sum", None)  added within an optimiser step, then averaged over steps (the loss: under
#                    global normalisation each micro-batch holds its share of the minibatch loss)
# A metric not listed (an objective's own, e.g. ``penalty_mean``) is ("mean", "tokens").
REDUCTIONS: dict[str, tuple[str, Optional[str]]] = {
    "tokens": ("sum", None), "signal_tokens": ("sum", None), "loss": ("step_sum", None),
    "ratio_mean": ("mean", "tokens"), "ratio_max": ("max", "tokens"), "ratio_min": ("min", "tokens"),
    "kl_k3": ("mean", "tokens"), "abs_shift_mean": ("mean", "tokens"), "abs_shift_max": ("max", "tokens"),
    "abs_ratio_dev_mean": ("mean", "tokens"),
    "beyond_pos_frac": ("mean", "tokens"), "beyond_neg_frac": ("mean", "tokens"),
    "inactive_frac": ("mean", "tokens"), "neg_weight_frac": ("mean", "signal_tokens"),
    "weight_mean": ("mean", "signal_tokens"), "weight_min": ("min", "signal_tokens"),
    "rollout_corr/rho_max": ("max", "tokens"),
}
for _b in BUCKET_NAMES:
    REDUCTIONS.update({
        f"{_b}/tokens": ("sum", None), f"{_b}/signal_tokens": ("sum", None),
        f"{_b}/token_frac": ("mean", "tokens"),
        **{f"{_b}/{k}": ("mean", f"{_b}/tokens")
           for k in ("abs_shift_mean", "abs_ratio_dev_mean", "beyond_frac", "inactive_frac")},
        **{f"{_b}/{k}": ("mean", f"{_b}/signal_tokens") for k in ("neg_weight_frac", "weight_mean")},
    })
DEFAULT_REDUCTION = ("mean", "tokens")


def masked_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum(v * m) / max(sum(m), 1)."""
    mf = m.float()
    return (v * mf).sum() / mf.sum().clamp(min=1.0)


def trust_region_metrics(
    x: TokenInputs,
    grad: torch.Tensor,
    inactive: Optional[torch.Tensor],
    boundary: float,
) -> dict[str, float]:
    """Scalar metrics for one batch. ``grad`` is d(sum L)/d log pi per token (B, T);
    ``boundary`` the |pi - mu| threshold used for the beyond-the-boundary fractions.
    Counts (``tokens``, ``signal_tokens`` and per bucket) come with the means, so that batches
    combine exactly (:data:`REDUCTIONS`)."""
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
    add("tokens", m.float().sum())
    add("signal_tokens", has_signal.float().sum())
    add("ratio_mean", masked_mean(r, m))
    add("ratio_max", torch.where(m, r, zero).max())
    add("ratio_min", torch.where(m, r, torch.full_like(r, float("inf"))).min())
    add("kl_k3", masked_mean(k3, m))
    add("abs_ratio_dev_mean", masked_mean((r - 1.0).abs(), m))
    add("abs_shift_mean", masked_mean(shift.abs(), m))
    add("abs_shift_max", torch.where(m, shift.abs(), zero).max())
    add("beyond_pos_frac", masked_mean(beyond_pos.float(), m))
    add("beyond_neg_frac", masked_mean(beyond_neg.float(), m))
    add("inactive_frac", masked_mean(inactive.float(), m))
    add("neg_weight_frac", masked_mean(neg.float(), has_signal))
    add("weight_mean", masked_mean(weight, has_signal))
    add("weight_min", torch.where(has_signal, weight, torch.full_like(r, float("inf"))).min())
    for name, lo, hi in MU_BUCKETS:
        b = m & (x.behavior_prob >= lo) & (x.behavior_prob < hi)
        bs = b & has_signal
        add(f"{name}/tokens", b.float().sum())
        add(f"{name}/signal_tokens", bs.float().sum())
        add(f"{name}/token_frac", b.float().sum() / m.float().sum().clamp(min=1.0))
        add(f"{name}/abs_shift_mean", masked_mean(shift.abs(), b))
        add(f"{name}/abs_ratio_dev_mean", masked_mean((r - 1.0).abs(), b))
        add(f"{name}/beyond_frac", masked_mean((beyond_pos | beyond_neg).float(), b))
        add(f"{name}/inactive_frac", masked_mean(inactive.float(), b))
        add(f"{name}/neg_weight_frac", masked_mean(neg.float(), bs))
        add(f"{name}/weight_mean", masked_mean(weight, bs))
    out = dict(zip(names, torch.stack(values).tolist()))
    if not bool(has_signal.any()):
        out["weight_min"] = 0.0
    return out
