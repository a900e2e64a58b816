"""Run configuration: YAML files plus ``key.sub=value`` overrides, validated with pydantic.

Unknown keys, wrong types and impossible values are errors that name the key, e.g.
``config error at 'train.minibatches': 48 sequences per step do not split into 5 minibatches``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Strict):
    """Where prompts come from: the built-in arithmetic task, or a jsonl file."""

    name: Literal["arithmetic", "jsonl"] = "arithmetic"
    difficulty: int = Field(1, ge=1)
    path: Optional[str] = None
    question_field: str = "problem"
    answer_field: str = "answer"
    template: str = "{question}"
    eval_path: Optional[str] = None
    chat_template: bool = False
    max_prompt_tokens: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _jsonl_needs_path(self) -> "TaskConfig":
        if self.name == "jsonl" and not self.path:
            raise ValueError("task.path is required when task.name is 'jsonl'")
        return self


class ObjectiveConfig(_Strict):
    name: str = "drpo"
    params: dict[str, Any] = Field(default_factory=dict)
    agg_mode: str = "token-mean"

    @model_validator(mode="after")
    def _known(self) -> "ObjectiveConfig":
        from drpo.objectives import AGG_MODES, get_objective

        get_objective(self.name).resolve_params(self.params)  # unknown objective/param -> ValueError
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"unknown agg_mode {self.agg_mode!r}; known: {list(AGG_MODES)}")
        return self


class RolloutConfig(_Strict):
    engine: Literal["hf", "vllm"] = "hf"
    precision: Literal["fp32", "bf16", "fp8"] = "fp8"
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(16, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=1)
    logprobs_topk: int = Field(0, ge=0)
    max_batch: int = Field(256, ge=1)


class TrainConfig(_Strict):
    steps: int = Field(150, ge=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    schedule: Literal["constant", "warmup", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    minibatches: int = Field(4, ge=1, description="optimiser steps per rollout batch (staleness K)")
    epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(128, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    anchor: Literal["rollout", "old_policy"] = "rollout"
    rollout_correction: Optional[dict[str, Any]] = None
    advantage: Literal["grpo", "rloo"] = "grpo"
    std_normalize: bool = False
    filter_zero_adv_groups: bool = False
    # reward of a response cut at rollout.max_new_tokens without EOS (DAPO's overlong handling);
    # None keeps the verifier's reward for it
    overlong_reward: Optional[float] = None
    chunk_size: int = Field(1024, ge=1)


class EvalConfig(_Strict):
    every: int = Field(25, ge=0)
    prompts: int = Field(256, ge=1)
    samples: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: Optional[int] = None


class RunConfig(_Strict):
    seed: int = 0
    model: str = "builtin"
    out: Optional[str] = None  # default: runs/<objective>-<date-time>
    device: str = "cpu"
    threads: Optional[int] = None
    save_every: int = Field(50, ge=0)
    log_every: int = Field(1, ge=1)
    tensorboard: bool = True
    progress: bool = True
    task: TaskConfig = Field(default_factory=TaskConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        seqs = self.rollout.prompts_per_step * self.rollout.group_size
        if seqs % self.train.minibatches:
            raise ValueError(
                f"train.minibatches: {seqs} sequences per step (rollout.prompts_per_step x group_size) "
                f"do not split into {self.train.minibatches} minibatches"
            )
        if self.rollout.group_size < 2:
            raise ValueError(
                f"rollout.group_size: group advantages ({self.train.advantage}) need at least 2 samples "
                f"per prompt, got {self.rollout.group_size}"
            )
        if self.train.anchor == "rollout" and self.train.rollout_correction:
            raise ValueError("train.rollout_correction: needs train.anchor='old_policy' "
                             "(anchored on the rollout mu there is nothing to correct)")
        if self.train.rollout_correction:
            from drpo.objectives import RolloutCorrection

            RolloutCorrection(**self.train.rollout_correction)
        if "topk" in str(self.objective.params.get("divergence", "")) or "topk" in self.objective.name:
            if self.rollout.logprobs_topk < 1:
                raise ValueError("rollout.logprobs_topk: DPPO Top-K needs the engine's top-K (set it >= 1)")
        return self


class ConfigError(ValueError):
    """A configuration problem, with the dotted key it concerns."""


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"config error at '{key}': {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value parsed as YAML, so 1e-4, true, [1, 2] keep their types)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def _set(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        nxt = d.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config error at '{'.'.join(keys)}': {k!r} is not a section")
        d = nxt
    d[keys[-1]] = value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from an optional YAML file and ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded or {}
    for item in overrides or []:
        keys, value = parse_override(item)
        _set(data, keys, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
    except ValueError as e:  # raised inside a validator that is not a pydantic error
        raise ConfigError(f"config error: {e}") from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
