"""Configuration of the task: where prompts come from, and which reward scores the answers."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from drpo.utils.config import StrictConfig


class TaskConfig(StrictConfig):
    """The built-in arithmetic task, or a jsonl file; ``reward`` names a registered reward
    (``drpo.rewards.REWARDS``, e.g. ``math``) or an import path ``package.module:function``."""

    name: Literal["arithmetic", "jsonl"] = "arithmetic"
    difficulty: int = Field(1, ge=1)
    path: Optional[str] = None
    question_field: str = "problem"
    answer_field: str = "answer"
    template: str = "{question}"
    eval_path: Optional[str] = None
    chat_template: bool = False
    # longest prompt allowed, in tokens; None: the model's positions minus rollout.max_new_tokens
    max_prompt_tokens: Optional[int] = Field(None, ge=1)
    reward: str = "math"
    # seconds one reward call may take before the run stops with RewardTimeout; 0 or None: no limit.
    # Generous: an ordinary reward takes milliseconds (the built-in math reward bounds itself)
    reward_timeout: Optional[float] = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _jsonl_needs_path(self) -> "TaskConfig":
        if self.name == "jsonl" and not self.path:
            raise ValueError("task.path is required when task.name is 'jsonl'")
        return self
