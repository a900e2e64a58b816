"""verl reward function for the DRPO recipe: 1.0 when the last \\boxed{} answer is right.

verl loads it with ``reward.custom_reward_function.path=examples/verl/reward.py``
(``reward.custom_reward_function.name=compute_score``, the default).
"""
from __future__ import annotations

from typing import Any, Optional

import drpo


def compute_score(data_source: str, solution_str: str, ground_truth: str,
                  extra_info: Optional[dict[str, Any]] = None) -> float:
    """math-verify check of ``solution_str``'s final ``\\boxed{}`` against ``ground_truth``."""
    return 1.0 if drpo.verify(solution_str, str(ground_truth)) else 0.0
