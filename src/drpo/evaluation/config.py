"""Configuration of the periodic held-out evaluation during training."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from drpo.utils.config import StrictConfig


class EvalConfig(StrictConfig):
    """Every ``every`` steps (0: never), avg@``samples`` on ``prompts`` held-out prompts, sampled by
    the rollout engine at ``temperature`` with a fixed seed (successive evaluations differ only by
    the weights)."""

    every: int = Field(25, ge=0)
    prompts: int = Field(256, ge=1)
    samples: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: Optional[int] = Field(None, ge=1)
