"""verl plug-in: drpo's objectives as verl policy losses (``policy_loss.loss_mode``).

Loading. ``pip install -e '.[verl]'`` declares the entry point ``drpo`` in the group
``verl.plugins``; ``import verl`` loads every entry point of that group (verl 0.9.1,
``verl/__init__.py``, unless ``VERL_USE_EXTERNAL_PLUGINS=none``). verl only *loads* the entry
point, it does not call it, so importing this module registers the losses; :func:`register` is
idempotent and can also be called by hand.

Names. Our own methods keep their names (``drpo``, ``drpo_*``, ``mask_drpo``, ``spo``); the
baselines get a ``drpo_`` prefix (``drpo_ppo``, ``drpo_grpo``, ``drpo_dapo``, ``drpo_cispo``,
``drpo_gspo``, ``drpo_pg_is``, ``drpo_dppo``, ``drpo_dppo_tv``, ``drpo_dppo_kl``), so they never
shadow verl's ``vanilla``/``cispo``/``gspo``/``dppo_tv``/``dppo_kl``. DPPO's Top-K variants are
not registered: verl does not hand the loss the top-K log-probs they need.

Hyperparameters. verl builds ``actor.policy_loss`` with hydra from its ``_target_``; point it
at :class:`DRPOPolicyLossConfig`, whose ``drpo_params`` dict is passed to
:func:`drpo.policy_loss` (unknown names are an error that lists the known ones)::

    actor_rollout_ref.actor.policy_loss._target_=drpo.integrations.verl.DRPOPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=drpo
    +actor_rollout_ref.actor.policy_loss.drpo_params.delta=12.5

Aggregation uses verl's ``actor.loss_agg_mode`` and ``config.global_batch_info`` exactly like
verl's ``agg_loss``: the loss is ``aggregate(L, counts=global counts) * dp_size``, so
micro-batches and data-parallel ranks normalise as verl's own losses do.

Metrics: drpo's trust-region metrics under ``actor/drpo/<name>``; the loss itself is verl's
``actor/pg_loss`` (summed over micro-batches by verl, as the global normalisation requires).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss
from verl.workers.config import PolicyLossConfig

import drpo
from drpo.objectives import get_objective
from drpo.objectives.api import DEFAULT_REPORT_BOUNDARY

METRIC_PREFIX = "actor/drpo/"
# Our methods: registered in verl under their own names (verl has none of them).
OWN_METHODS = ("drpo", "drpo_k3", "drpo_kl", "drpo_no_adv", "drpo_small_delta", "mask_drpo", "spo")
# Baselines: registered as "drpo_<name>" so that verl's losses of the same name stay verl's.
BASELINES = ("pg_is", "ppo", "grpo", "dapo", "cispo", "gspo", "dppo", "dppo_tv", "dppo_kl")


@dataclass
class DRPOPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus drpo's settings.

    drpo_params:          the objective's parameters (``delta``, ``epsilon``, ``clip_low``, ...;
                          see ``drpo.objectives.get_objective(name).param_defaults``).
    drpo_report_boundary: |pi - mu| threshold of the ``beyond_*`` metrics.
    drpo_metrics:         False skips our trust-region metrics (saves one elementwise backward).
    """

    drpo_params: dict = field(default_factory=dict)
    drpo_report_boundary: float = DEFAULT_REPORT_BOUNDARY
    drpo_metrics: bool = True


def verl_loss_name(objective: str) -> str:
    """The ``loss_mode`` under which drpo objective ``objective`` is registered in verl."""
    if objective in OWN_METHODS:
        return objective
    if objective in BASELINES:
        return f"drpo_{objective}"
    raise ValueError(f"objective {objective!r} is not exposed to verl; exposed: {OWN_METHODS + BASELINES}")


def objective_for_loss_mode(loss_mode: str) -> Optional[str]:
    """The drpo objective behind verl ``loss_mode`` (inverse of :func:`verl_loss_name`), or None."""
    for objective in OWN_METHODS + BASELINES:
        if verl_loss_name(objective) == loss_mode:
            return objective
    return None


def _policy_loss_settings(config: Any) -> tuple[dict[str, Any], float, bool]:
    """(objective params, report boundary, compute metrics) from ``config.policy_loss``."""
    pl = getattr(config, "policy_loss", None) or {}
    params = pl.get("drpo_params", None) or {}
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    boundary = pl.get("drpo_report_boundary", DEFAULT_REPORT_BOUNDARY)
    return dict(params), float(boundary), bool(pl.get("drpo_metrics", True))


def _global_counts(config: Any) -> tuple[int, dict[str, Optional[float]]]:
    """(dp_size, policy_loss kwargs) from verl's ``config.global_batch_info``.

    verl's agg_loss computes sum / N_global * dp_size; drpo's aggregate computes
    sum / N_global, so the caller multiplies by dp_size.
    """
    info = dict(getattr(config, "global_batch_info", None) or {})
    dp_size = int(info.get("dp_size", 1) or 1)

    def num(key: str) -> Optional[float]:
        v = info.get(key, None)
        return None if v is None else float(v)

    counts = {
        "global_token_count": num("batch_num_tokens"),
        "global_seq_count": num("global_batch_size"),
        "horizon": num("loss_scale_factor"),
    }
    return dp_size, counts


def _check_counts(agg_mode: str, dp_size: int, counts: dict[str, Optional[float]]) -> None:
    """verl refuses dp_size > 1 without the global normaliser of the mode; so do we."""
    needed = {"token-mean": "global_token_count", "seq-mean-token-sum": "global_seq_count",
              "seq-mean-token-sum-norm": "global_seq_count", "seq-mean-token-mean": "global_seq_count"}
    key = needed.get(agg_mode)
    if dp_size > 1 and key is not None and counts[key] is None:
        raise ValueError(f"loss_agg_mode={agg_mode!r} with dp_size={dp_size} needs the global batch "
                         "counts in config.global_batch_info (verl sets them in ppo_loss)")


def make_verl_loss(objective: str) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """A verl policy-loss function (verl's ``PolicyLossFn`` signature) computing ``objective``."""
    get_objective(objective)  # fail early on a typo

    def loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        params, boundary, compute_metrics = _policy_loss_settings(config)
        dp_size, counts = _global_counts(config)
        _check_counts(loss_agg_mode, dp_size, counts)
        common = dict(agg_mode=loss_agg_mode, compute_metrics=compute_metrics, report_boundary=boundary)
        loss, metrics = drpo.policy_loss(objective, log_prob, old_log_prob, advantages, response_mask,
                                         token_weights=rollout_is_weights, **common, **counts, **params)
        # verl averages policy-loss metrics over micro-batches (AggregationType.MEAN), right for our
        # per-token statistics but not for "loss": each micro-batch's loss is its share of the global
        # sum. verl reports the loss itself, correctly summed, as actor/pg_loss.
        metrics.pop("loss", None)
        return loss * dp_size, {METRIC_PREFIX + k: v for k, v in metrics.items()}

    loss_fn.__name__ = f"drpo_verl_{objective}"
    loss_fn.__doc__ = f"verl policy loss computing drpo objective {objective!r} (see drpo.integrations.verl)."
    loss_fn.drpo_objective = objective  # type: ignore[attr-defined]
    return loss_fn


def register() -> list[str]:
    """Register drpo's objectives in verl's policy-loss registry; returns the verl names.

    Idempotent. Raises if a name is already taken by a loss that is not ours, so a future verl
    loss of the same name is never silently replaced.
    """
    names = []
    for objective in OWN_METHODS + BASELINES:
        name = verl_loss_name(objective)
        existing = POLICY_LOSS_REGISTRY.get(name)
        if existing is not None and getattr(existing, "drpo_objective", None) != objective:
            raise RuntimeError(f"verl already has a policy loss named {name!r}; not overriding it")
        if existing is None:
            register_policy_loss(name)(make_verl_loss(objective))
        names.append(name)
    return names


# verl's plug-in loader imports the entry point without calling it: register on import.
register()
