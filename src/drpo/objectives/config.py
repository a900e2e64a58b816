"""Configuration of the policy objective: a registered name, its parameters, the aggregation."""
from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from drpo.objectives.adaptive import AdaptiveDeltaConfig
from drpo.objectives.aggregation import AGG_MODES
from drpo.objectives.registry import BoundObjective, get_objective
from drpo.utils.config import StrictConfig

AUTO = "auto"


class ObjectiveConfig(StrictConfig):
    """``name`` is any registered objective or preset (``drpo objectives`` lists them); ``params``
    are checked when the config is loaded -- names, types and values -- before anything runs.
    ``params.delta: auto`` adapts delta every step with the rule of ``adaptive``
    (:mod:`drpo.objectives.adaptive`)."""

    name: str = "drpo"
    params: dict[str, Any] = Field(default_factory=dict)
    agg_mode: str = "token-mean"
    adaptive: AdaptiveDeltaConfig = Field(default_factory=AdaptiveDeltaConfig)

    @property
    def adaptive_delta(self) -> bool:
        return self.params.get("delta") == AUTO

    def bind(self) -> BoundObjective:
        """The objective with these parameters resolved and validated, once (``delta: auto`` starts at
        ``adaptive.init``; the trainer rebinds it with each step's delta)."""
        params = dict(self.params)
        if self.adaptive_delta:
            params["delta"] = self.adaptive.init
        return get_objective(self.name).bind(**params)

    @model_validator(mode="after")
    def _known(self) -> "ObjectiveConfig":
        obj = get_objective(self.name)
        params = dict(self.params)
        if params.get("delta") == AUTO:
            if "delta" not in obj.param_defaults:
                raise ValueError(f"objective.params.delta=auto: objective {self.name!r} has no delta parameter "
                                 f"(its parameters are {sorted(obj.param_defaults)})")
            params["delta"] = self.adaptive.init
        obj.validate(params)  # unknown objective/param, bad type or value
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"unknown agg_mode {self.agg_mode!r}; known: {list(AGG_MODES)}")
        return self
