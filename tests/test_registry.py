"""One registry pattern (drpo.utils.registry) behind objectives, rewards and advantage estimators."""
from __future__ import annotations

import pytest

from drpo.objectives.registry import OBJECTIVES
from drpo.rewards.base import REWARDS, math_reward
from drpo.training.advantages import ADVANTAGES, grpo
from drpo.utils.errors import UserError
from drpo.utils.registry import Registry, UnknownName


def test_a_registry_adds_looks_up_and_refuses_a_taken_name():
    reg: Registry[int] = Registry("widget", hint=", or a number")

    @reg.register("b")
    def b():
        return 2

    reg.add("a", 1)
    assert reg["a"] == 1 and reg["b"] is b and "a" in reg and "z" not in reg
    assert list(reg) == reg.names() == ["a", "b"] and len(reg) == 2
    reg.add("a", 1)  # the same thing again
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", 3)
    with pytest.raises(UnknownName, match=r"^unknown widget 'z'; known: \['a', 'b'\], or a number$") as e:
        reg["z"]
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
    assert reg.pop("a") == 1 and reg.names() == ["b"]


def test_objectives_rewards_and_advantages_share_it():
    for reg, name, item in ((REWARDS, "math", math_reward), (ADVANTAGES, "grpo", grpo)):
        assert isinstance(reg, Registry) and reg[name] is item
    assert isinstance(OBJECTIVES, Registry) and OBJECTIVES["drpo"].name == "drpo"
    with pytest.raises(UnknownName, match="unknown advantage estimator 'nope'"):
        ADVANTAGES["nope"]
