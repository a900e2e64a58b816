"""Rewards: the reward-function interface and the built-in math reward.

The answer checker lives in :mod:`drpo.rewards.verify` (``from drpo.rewards.verify import
verify``); it is not re-exported here so that ``drpo.rewards.verify`` stays the module.
"""
from drpo.rewards.base import (
    DEFAULT_REWARD_TIMEOUT_S, REWARDS, AllRewardsFailed, RewardError, RewardFailureGuard, RewardFn, RewardStats,
    RewardTimeout, get_reward, math_reward, register_reward, score_batch,
)

__all__ = ["DEFAULT_REWARD_TIMEOUT_S", "REWARDS", "AllRewardsFailed", "RewardError", "RewardFailureGuard", "RewardFn",
           "RewardStats", "RewardTimeout", "get_reward", "math_reward", "register_reward", "score_batch"]
