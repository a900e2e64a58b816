"""The base of every layer's configuration: pydantic models that reject unknown keys.

Each layer owns its config class (``drpo.tasks.config.TaskConfig``,
``drpo.rollout.config.RolloutConfig``, ...); ``drpo.training.config.RunConfig`` composes them.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from drpo.utils.errors import UserError


class StrictConfig(BaseModel):
    """Unknown keys are errors, and so are NaN / inf floats; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ConfigError(UserError, ValueError):
    """A configuration problem, with the dotted key it concerns."""
