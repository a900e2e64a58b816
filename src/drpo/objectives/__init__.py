"""Token-level policy objectives behind one interface (:func:`policy_loss`) and a registry.

Importing this package registers the built-in objectives:
pg_is, ppo (grpo, dapo), cispo, gspo, spo, dppo (dppo_tv, dppo_kl, dppo_topk_tv, dppo_topk_kl),
drpo (drpo_small_delta, drpo_no_adv, mask_drpo, drpo_kl, drpo_k3).
"""
from drpo.objectives import divergence, ratio_based  # noqa: F401  (registers the objectives)
from drpo.objectives.adaptive import adapt_delta
from drpo.objectives.aggregation import AGG_MODES, aggregate
from drpo.objectives.api import NonFiniteInput, policy_loss
from drpo.objectives.registry import (
    BoundObjective,
    ObjectiveOutput,
    TokenInputs,
    get_objective,
    list_objectives,
    register_objective,
    register_preset,
)
from drpo.objectives.rollout_correction import RolloutCorrection

__all__ = [
    "AGG_MODES", "aggregate", "policy_loss", "NonFiniteInput", "ObjectiveOutput", "TokenInputs", "get_objective",
    "list_objectives", "register_objective", "register_preset", "RolloutCorrection", "BoundObjective", "adapt_delta",
]
