"""drpo: trust-region control for LLM reinforcement learning.

Public API
----------
- :func:`policy_loss` -- every token-level objective behind one call.
- :func:`register_objective`, :func:`list_objectives` -- the objective registry.
- :func:`verify` -- rule-based math answer checker (``\\boxed{}``) on top of math-verify.
"""
from drpo.objectives import (  # noqa: F401
    RolloutCorrection,
    list_objectives,
    policy_loss,
    register_objective,
)

__version__ = "0.1.0"


def verify(response: str, gold: str) -> bool:
    """True when the last ``\\boxed{}`` answer of ``response`` equals ``gold`` (math-verify)."""
    from drpo.rewards.verify import verify as _verify

    return _verify(response, gold)


__all__ = ["policy_loss", "register_objective", "list_objectives", "RolloutCorrection", "verify"]
