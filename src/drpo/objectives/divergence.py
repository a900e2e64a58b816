"""Divergence-based trust regions: DPPO (hard mask), SPO (ratio penalty) and DRPO (soft penalty).

Notation per sampled token: pi = exp(log_prob), mu = exp(behavior_log_prob), r = pi/mu,
A = advantage, delta = trust-region size, sg = stop-gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from drpo.objectives.adaptive import PER_TOKEN_RULES, token_delta
from drpo.objectives.metrics import masked_mean
from drpo.objectives.registry import ObjectiveOutput, TokenInputs, register_objective, register_preset, require

DPPO_DIVERGENCES = ("binary_tv", "binary_kl", "topk_tv", "topk_kl")
DRPO_DIVERGENCES = ("tv", "binary_kl", "k3")
_EPS = 1e-8


def _binary_kl(mu: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(mu) || Bernoulli(pi)) = mu log(mu/pi) + (1-mu) log((1-mu)/(1-pi)), as verl computes it."""
    return mu * (torch.log(mu + _EPS) - torch.log(pi + _EPS)) + (1 - mu) * torch.log(
        (1.0 - mu + _EPS) / (1.0 - pi + _EPS)
    )


def harmful_shift(x: TokenInputs) -> torch.Tensor:
    """True where the token moved away from mu in the direction its advantage pushes:
    pi > mu with A > 0, or pi < mu with A < 0 (a move back toward mu is never harmful)."""
    return ((x.advantages > 0) & (x.prob > x.behavior_prob)) | (
        (x.advantages < 0) & (x.prob < x.behavior_prob)
    )


def outside_binary_tv(x: TokenInputs, delta: float) -> torch.Tensor:
    """True beyond DPPO's Binary-TV boundary on the harmful side: sign(A) * (pi - mu) > delta."""
    shift = x.prob - x.behavior_prob
    return ((x.advantages > 0) & (shift > delta)) | ((x.advantages < 0) & (shift < -delta))


def _topk_divergence(x: TokenInputs, kind: str) -> torch.Tensor:
    """DPPO Top-K divergence over S = top-K(mu) plus the sampled token, plus the 'rest' bucket.

    TV: 0.5 * (sum_{k in S} |pi_k - mu_k| + |pi_rest - mu_rest|)
    KL: sum_{k in S} mu_k log(mu_k / pi_k) + mu_rest log(mu_rest / pi_rest)
    with pi_rest = 1 - sum_S pi_k. Inputs: the rollout engine's top-K log-probs and ids (as vLLM
    returns them) and the trainer's log-probs at those ids.
    """
    need = {"topk_log_prob": x.topk_log_prob, "behavior_topk_log_prob": x.behavior_topk_log_prob,
            "topk_ids": x.topk_ids, "sampled_ids": x.sampled_ids}
    missing = [k for k, v in need.items() if v is None]
    require(not missing, f"dppo divergence {kind!r} needs the extra inputs {missing}")
    pi_k = torch.exp(x.topk_log_prob.detach().float())
    mu_k = torch.exp(x.behavior_topk_log_prob.float())
    in_topk = (x.topk_ids == x.sampled_ids.unsqueeze(-1)).any(-1)
    extra = (~in_topk).float()  # the sampled token joins S when it is not already in the top-K
    pi_s, mu_s = x.prob.detach(), x.behavior_prob
    pi_rest = (1.0 - pi_k.sum(-1) - extra * pi_s).clamp(min=0.0)
    mu_rest = (1.0 - mu_k.sum(-1) - extra * mu_s).clamp(min=0.0)
    if kind == "topk_tv":
        return 0.5 * ((pi_k - mu_k).abs().sum(-1) + extra * (pi_s - mu_s).abs() + (pi_rest - mu_rest).abs())

    def kl(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return m * (torch.log(m + _EPS) - torch.log(p + _EPS))

    return kl(mu_k, pi_k).sum(-1) + extra * kl(mu_s, pi_s) + kl(mu_rest, pi_rest)


@register_objective("dppo")
def dppo(
    x: TokenInputs,
    *,
    delta: float = 0.15,
    divergence: str = "binary_tv",
    clip_c: Optional[float] = None,
) -> ObjectiveOutput:
    """DPPO (Qi et al., arXiv 2602.04879): the r-weighted policy gradient with a divergence mask.

        D     = divergence between mu and pi at this token (Binary-TV |pi - mu|, Binary-KL,
                or the Top-K TV/KL over the engine's top-K tokens)
        M     = 0 if D > delta and the shift is harmful (pi > mu with A > 0, pi < mu with A < 0),
                1 otherwise: a move back toward mu is never masked
        L     = -M * A * sg(min(r, c) / r) * r        (value -M A min(r, c))
        dL/dlog pi = -M * A * min(r, c)               (c = clip_c, infinite when None)
    """
    require(delta > 0, f"dppo: delta must be > 0, got {delta}")
    require(divergence in DPPO_DIVERGENCES,
           f"dppo: unknown divergence {divergence!r}; known: {list(DPPO_DIVERGENCES)}")
    require(clip_c is None or clip_c > 0, f"dppo: clip_c must be > 0, got {clip_c}")
    with torch.no_grad():
        if divergence == "binary_tv":
            d = (x.prob - x.behavior_prob).abs()
        elif divergence == "binary_kl":
            d = _binary_kl(x.behavior_prob, x.prob)
        else:
            d = _topk_divergence(x, divergence)
        masked = (d > delta) & harmful_shift(x)
    r = x.ratio
    w = torch.ones_like(r) if clip_c is None else (torch.clamp(r, max=clip_c) / r).detach()
    loss = -(~masked).float() * x.advantages * w * r
    return ObjectiveOutput(loss=loss, inactive=masked)


register_preset("dppo_tv", "dppo", doc="DPPO Binary-TV, delta 0.15.", divergence="binary_tv", delta=0.15)
register_preset("dppo_kl", "dppo", doc="DPPO Binary-KL, delta 0.05.", divergence="binary_kl", delta=0.05)
register_preset("dppo_topk_tv", "dppo", doc="DPPO Top-K TV.", divergence="topk_tv", delta=0.15)
register_preset("dppo_topk_kl", "dppo", doc="DPPO Top-K KL.", divergence="topk_kl", delta=0.05)


@register_objective("spo")
def spo(x: TokenInputs, *, epsilon: float = 12.5) -> ObjectiveOutput:
    """SPO (Xie et al., arXiv 2401.16025): a ratio-based quadratic penalty.

        J = r A - |A| (r - 1)^2 / (2 epsilon)
        dJ/dlog pi = r (A - |A| (r - 1) / epsilon)

    SPO's own paper pairs epsilon = 0.2 with PPO's clip; the DRPO paper runs SPO at 12.5 (the same
    number as its delta), which is the default here.
    """
    require(epsilon > 0, f"spo: epsilon must be > 0, got {epsilon}")
    A, r = x.advantages, x.ratio
    penalty = A.abs() * (r - 1.0) ** 2 / (2.0 * epsilon)
    return ObjectiveOutput(loss=-(r * A - penalty), metrics={"penalty_mean": float(masked_mean(penalty.detach(), x.mask))})


@register_objective("drpo")
def drpo(
    x: TokenInputs,
    *,
    delta: float = 12.5,
    adv_weighting: bool = True,
    penalty_coef: float = 1.0,
    ratio_penalty: bool = False,
    mask_only: bool = False,
    divergence: str = "tv",
    delta_per_token: str = "none",
) -> ObjectiveOutput:
    """DRPO (Yao et al. 2026): the policy gradient with a smooth advantage-weighted penalty.

        J = r A - c * D / delta,   c = |A|  (or ``penalty_coef`` when adv_weighting=False)

    with the divergence D of the sampled token (default ``tv``):

        tv         D = mu (r - 1)^2 / 2 = (pi - mu)^2 / (2 mu)
                   dJ/dlog pi = r (A - c (pi - mu) / delta) = r A w,
                   w = 1 - sign(A (r - 1)) |pi - mu| / delta   (for c = |A|):
                   w = 1 at pi = mu, 0 on DPPO's Binary-TV boundary pi - mu = sign(A) delta,
                   negative (corrective) beyond it, and within [1 - 1/delta, 1 + 1/delta].
        binary_kl  D = KL(Bern(mu) || Bern(pi))          dD/dlog pi = (pi - mu) / (1 - pi)
        k3         D = mu (r - 1 - log r)                 dD/dlog pi = mu (r - 1)

    Ablations (the paper's):
        adv_weighting=False   constant coefficient ``penalty_coef`` instead of |A|
        ratio_penalty=True    drop the mu factor: D = (r - 1)^2 / 2 (tv) -- this is SPO with epsilon = delta
        mask_only=True        "mask-DRPO": the penalty acts only beyond the Binary-TV boundary on the
                              harmful side (plain r A inside), i.e. DPPO's mask replaced by DRPO's
                              corrective weight.

    Beyond the paper: ``delta_per_token='bernoulli_std'`` uses delta_t = delta * 2 sqrt(mu (1 - mu)) per
    token (:mod:`drpo.objectives.adaptive`); ``objective.params.delta=auto`` in the trainer adapts
    delta every step.
    """
    require(delta > 0, f"drpo: delta must be > 0, got {delta}")
    require(penalty_coef >= 0, f"drpo: penalty_coef must be >= 0, got {penalty_coef}")
    require(divergence in DRPO_DIVERGENCES,
           f"drpo: unknown divergence {divergence!r}; known: {list(DRPO_DIVERGENCES)}")
    require(not (ratio_penalty and divergence == "binary_kl"),
           "drpo: ratio_penalty applies to the 'tv' and 'k3' divergences, not 'binary_kl'")
    require(delta_per_token in PER_TOKEN_RULES,
            f"drpo: unknown delta_per_token {delta_per_token!r}; known: {list(PER_TOKEN_RULES)}")
    A, r, mu = x.advantages, x.ratio, x.behavior_prob
    delta = token_delta(delta, mu, delta_per_token)
    weight = torch.ones_like(mu) if ratio_penalty else mu
    if divergence == "tv":
        d = weight * (r - 1.0) ** 2 / 2.0
    elif divergence == "k3":
        d = weight * (r - 1.0 - x.log_ratio)
    else:
        d = _binary_kl(mu, x.prob)
    coef = A.abs() if adv_weighting else torch.full_like(A, penalty_coef)
    penalty = coef * d / delta
    if mask_only:
        penalty = penalty * outside_binary_tv(x, delta).float()
    return ObjectiveOutput(loss=-(r * A - penalty), metrics={"penalty_mean": float(masked_mean(penalty.detach(), x.mask))})


register_preset("drpo_small_delta", "drpo", doc="DRPO with DPPO's geometry: delta 0.15.", delta=0.15)
register_preset("drpo_no_adv", "drpo", doc="Ablation: constant penalty coefficient instead of |A|.",
                adv_weighting=False)
register_preset("mask_drpo", "drpo", doc="Ablation: penalty only beyond the Binary-TV boundary (delta 0.15).",
                mask_only=True, delta=0.15)
register_preset("drpo_kl", "drpo", doc="Ablation: binary-KL penalty instead of the TV quadratic.",
                divergence="binary_kl")
register_preset("drpo_k3", "drpo", doc="Ablation: k3 KL-estimator penalty instead of the TV quadratic.",
                divergence="k3")
