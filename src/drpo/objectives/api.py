"""``policy_loss``: every objective behind one call.

    loss, metrics = drpo.policy_loss("drpo", log_prob, behavior_log_prob, advantages, mask, delta=12.5)

The steps, in order:
1. check the inputs (shapes, finiteness at unmasked positions, a non-empty mask, parameters);
2. compute in float32 whatever the input dtype; sanitise masked positions so that padding garbage
   (NaN, inf) contributes exactly zero loss and zero gradient; clamp log r to +-LOG_RATIO_CLAMP;
3. the objective's per-token loss L (registry), times rollout-correction weights if asked;
4. aggregate L over tokens (``agg_mode``, optionally with global counts);
5. metrics: what the trust region did (gradient weights from autograd, |pi - mu|, buckets by mu).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from drpo.objectives.aggregation import aggregate
from drpo.objectives.metrics import trust_region_metrics
from drpo.objectives.registry import LOG_RATIO_CLAMP, BoundObjective, Objective, TokenInputs, get_objective
from drpo.objectives.rollout_correction import RolloutCorrection, correction_weights

# Log-probs computed in low precision can round to slightly above 0; beyond this it is a bug upstream.
_LOGPROB_TOL = 1e-2
DEFAULT_REPORT_BOUNDARY = 0.15


class NonFiniteInput(ValueError):
    """An input holds NaN or inf at an unmasked position (a trainer treats it as divergence)."""


def _finite_where(t: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(t.detach()) & mask
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise NonFiniteInput(f"{name} has NaN or inf at an unmasked position (first at index {idx})")


def _check_logprob(t: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    _finite_where(t, mask, name)
    too_big = (t.detach().float() > _LOGPROB_TOL) & mask
    if bool(too_big.any()):
        raise ValueError(
            f"{name} holds values > 0 at unmasked positions (max {float(t.detach().float()[mask].max()):.4g}); "
            "pass log-probabilities, not probabilities or logits"
        )


def build_inputs(
    log_prob: torch.Tensor,
    behavior_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    **topk: Optional[torch.Tensor],
) -> TokenInputs:
    """Validate and convert raw inputs into sanitised float32 :class:`TokenInputs`."""
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be (batch, length), got shape {tuple(log_prob.shape)}")
    shape = log_prob.shape
    for name, t in (("behavior_log_prob", behavior_log_prob), ("mask", mask)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like log_prob")
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        advantages = advantages[:, None].expand(shape)
    elif advantages.shape != shape:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected {tuple(shape)} or ({shape[0]},)"
        )
    if mask.dtype != torch.bool:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(f"mask must hold only 0 and 1 (or be bool), found {mask[bad].flatten()[0].item()!r} "
                             f"at index {tuple(int(i) for i in bad.nonzero()[0])}")
    mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError("mask is all zero: no response token to train on")
    _check_logprob(log_prob, mask, "log_prob")
    _check_logprob(behavior_log_prob, mask, "behavior_log_prob")
    _finite_where(advantages, mask, "advantages")

    zero = torch.zeros((), dtype=torch.float32, device=log_prob.device)
    lp = torch.where(mask, log_prob.float(), zero).clamp(max=0.0)
    blp = torch.where(mask, behavior_log_prob.detach().float(), zero).clamp(max=0.0)
    adv = torch.where(mask, advantages.detach().float(), zero)
    log_ratio = torch.clamp(lp - blp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return TokenInputs(
        log_prob=lp,
        behavior_log_prob=blp,
        log_ratio=log_ratio,
        ratio=torch.exp(log_ratio),
        prob=torch.exp(lp),
        behavior_prob=torch.exp(blp),
        advantages=adv,
        mask=mask,
        **topk,
    )


def _with_log_prob(x: TokenInputs, lp: torch.Tensor) -> TokenInputs:
    """The same inputs with log pi replaced by ``lp`` (used to differentiate per token)."""
    log_ratio = torch.clamp(lp - x.behavior_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return TokenInputs(
        log_prob=lp, behavior_log_prob=x.behavior_log_prob, log_ratio=log_ratio, ratio=torch.exp(log_ratio),
        prob=torch.exp(lp), behavior_prob=x.behavior_prob, advantages=x.advantages, mask=x.mask,
        topk_log_prob=x.topk_log_prob, behavior_topk_log_prob=x.behavior_topk_log_prob,
        topk_ids=x.topk_ids, sampled_ids=x.sampled_ids,
    )


def per_token_grad(obj: Objective, x: TokenInputs, params: dict[str, Any],
                   weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d(sum_t L_t)/d log pi_t for every token: the exact per-token gradient of the objective."""
    with torch.enable_grad():
        leaf = x.log_prob.detach().requires_grad_(True)
        loss = obj.fn(_with_log_prob(x, leaf), **params).loss
        if weights is not None:
            loss = loss * weights
        total = torch.where(x.mask, loss, torch.zeros_like(loss)).sum()
        (g,) = torch.autograd.grad(total, leaf, allow_unused=True)
    return torch.zeros_like(leaf) if g is None else g


def policy_loss(
    objective: str | BoundObjective,
    log_prob: torch.Tensor,
    behavior_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    agg_mode: str = "token-mean",
    global_token_count: Optional[float] = None,
    global_seq_count: Optional[float] = None,
    horizon: Optional[float] = None,
    rollout_log_prob: Optional[torch.Tensor] = None,
    rollout_correction: Optional[RolloutCorrection] = None,
    topk_log_prob: Optional[torch.Tensor] = None,
    behavior_topk_log_prob: Optional[torch.Tensor] = None,
    topk_ids: Optional[torch.Tensor] = None,
    sampled_ids: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    compute_metrics: bool = True,
    report_boundary: float = DEFAULT_REPORT_BOUNDARY,
    **params: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss (to minimise) of ``objective`` and a dict of float metrics.

    Args:
        objective: a registered objective or preset (:func:`drpo.list_objectives`), whose
            ``**params`` are resolved and checked on this call; or one bound once with its parameters
            (``get_objective("drpo").bind(delta=12.5)``), as a trainer does, and then no ``**params``.
        log_prob: (B, T) log pi of the sampled tokens, differentiable; any float dtype.
        behavior_log_prob: (B, T) log mu of the same tokens: the trust region's anchor (the rollout
            engine's log-probs, or a recomputed old policy's when using rollout correction).
        advantages: (B, T), or (B,) broadcast over tokens.
        mask: (B, T), 1/True on response tokens. Masked positions may hold anything.
        agg_mode: see :mod:`drpo.objectives.aggregation`.
        global_token_count / global_seq_count: normalisers over the whole optimiser step (all
            micro-batches, all ranks), so that accumulated micro-batch gradients equal the full batch.
        horizon: the constant of ``seq-mean-token-sum-norm`` (defaults to T).
        rollout_log_prob, rollout_correction: correct for mu != pi_old when anchoring on pi_old
            (:class:`RolloutCorrection`: token/sequence TIS or MIS/IcePop).
        topk_log_prob, behavior_topk_log_prob, topk_ids, sampled_ids: (B, T, K)/(B, T) inputs
            of DPPO's Top-K divergences.
        token_weights: optional (B, T) detached per-token weights multiplying the per-token loss
            (e.g. a framework's precomputed rollout importance weights), like rollout correction.
        compute_metrics: False skips the metrics (one extra elementwise backward).
        report_boundary: the |pi - mu| threshold of the ``beyond_*`` metrics (same for all
            objectives, so runs compare).
        **params: the objective's parameters (``delta``, ``clip_low``, ...). Unknown names are an error.
    """
    if isinstance(objective, BoundObjective):
        if params:
            raise ValueError(f"policy_loss: objective {objective.name!r} is already bound to its parameters; "
                             f"got more: {sorted(params)}")
        bound = objective
    else:
        obj = get_objective(objective)
        bound = BoundObjective(obj, obj.resolve_params(params))
    obj, p = bound.objective, bound.params
    if (rollout_correction is None) != (rollout_log_prob is None):
        raise ValueError("rollout_correction and rollout_log_prob must be given together")
    x = build_inputs(
        log_prob, behavior_log_prob, advantages, mask,
        topk_log_prob=topk_log_prob, behavior_topk_log_prob=behavior_topk_log_prob,
        topk_ids=topk_ids, sampled_ids=sampled_ids,
    )
    out = obj.fn(x, **p)
    loss_mat = out.loss
    rc_weights, rc_metrics = None, {}
    if rollout_correction is not None:
        if rollout_log_prob.shape != log_prob.shape:
            raise ValueError(f"rollout_log_prob has shape {tuple(rollout_log_prob.shape)}, "
                             f"expected {tuple(log_prob.shape)}")
        _check_logprob(rollout_log_prob, x.mask, "rollout_log_prob")
        rc_weights, rc_metrics = correction_weights(x.behavior_log_prob, rollout_log_prob, x.mask,
                                                    rollout_correction)
        loss_mat = loss_mat * rc_weights
    if token_weights is not None:
        if token_weights.shape != log_prob.shape:
            raise ValueError(f"token_weights has shape {tuple(token_weights.shape)}, expected {tuple(log_prob.shape)}")
        _finite_where(token_weights, x.mask, "token_weights")
        tw = torch.where(x.mask, token_weights.detach().float(), 0.0)
        loss_mat = loss_mat * tw
        rc_weights = tw if rc_weights is None else rc_weights * tw
    loss = aggregate(loss_mat, x.mask, agg_mode, global_token_count=global_token_count,
                     global_seq_count=global_seq_count, horizon=horizon)
    if not compute_metrics:
        return loss, {}
    grad = per_token_grad(obj, x, p, rc_weights)
    metrics = trust_region_metrics(x, grad, out.inactive, report_boundary)
    metrics.update(out.metrics)
    metrics.update(rc_metrics)
    metrics["loss"] = float(loss.detach())
    return loss, metrics
