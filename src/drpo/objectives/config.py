"""Configuration of the policy objective: a registered name, its parameters, the aggregation."""
from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from drpo.objectives.aggregation import AGG_MODES
from drpo.objectives.registry import get_objective
from drpo.utils.config import StrictConfig


class ObjectiveConfig(StrictConfig):
    """``name`` is any registered objective or preset (``drpo objectives`` lists them); ``params``
    are checked when the config is loaded -- names, types and values -- before anything runs."""

    name: str = "drpo"
    params: dict[str, Any] = Field(default_factory=dict)
    agg_mode: str = "token-mean"

    @model_validator(mode="after")
    def _known(self) -> "ObjectiveConfig":
        get_objective(self.name).validate(self.params)  # unknown objective/param, bad type or value
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"unknown agg_mode {self.agg_mode!r}; known: {list(AGG_MODES)}")
        return self
