"""Run configuration: YAML files plus ``key.sub=value`` overrides, validated with pydantic.

The run config composes the configs each layer owns (``task``: :mod:`drpo.tasks.config`,
``objective``: :mod:`drpo.objectives.config`, ``rollout``: :mod:`drpo.rollout.config`, ``eval``:
:mod:`drpo.evaluation.config`) with the trainer's own ``train`` section and the run-wide keys.
Unknown keys, wrong types and impossible values are errors that name the key, e.g.
``config error at 'train.minibatches': 48 sequences per step do not split into 5 minibatches``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from drpo.evaluation.config import EvalConfig
from drpo.objectives.config import ObjectiveConfig
from drpo.objectives.rollout_correction import RolloutCorrection
from drpo.rollout.config import RolloutConfig
from drpo.tasks.config import TaskConfig
from drpo.utils.config import ConfigError, StrictConfig

__all__ = ["ConfigError", "RunConfig", "TrainConfig", "load_config", "dump_config", "parse_override"]


class TrainConfig(StrictConfig):
    steps: int = Field(150, ge=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    schedule: Literal["constant", "warmup", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    minibatches: int = Field(4, ge=1, description="optimiser steps per rollout batch (K)")
    epochs: int = Field(1, ge=1)
    # sequences per forward/backward; a minibatch's rows are ordered by length first, so that each
    # micro-batch pads only to its own longest row (on CPU, 32 measured faster than one of 128)
    micro_batch_size: int = Field(32, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    anchor: Literal["rollout", "old_policy"] = "rollout"
    # with anchor=old_policy: correct for mu != pi_old (drpo.RolloutCorrection: level, mode, upper, lower)
    rollout_correction: Optional[RolloutCorrection] = None
    advantage: str = "grpo"  # a registered estimator (drpo.training.advantages.ADVANTAGES)
    std_normalize: bool = False
    filter_zero_adv_groups: bool = False
    # reward of a response cut at rollout.max_new_tokens without EOS (DAPO's overlong handling);
    # None keeps the verifier's reward for it
    overlong_reward: Optional[float] = None
    chunk_size: int = Field(1024, ge=1)
    # the rows of one prompt share its forward pass (drpo.training.logprobs): the same numbers up to rounding, the
    # prompt's cost paid once per group instead of once per sample; dense models (an MoE runs plainly)
    share_prompts: bool = True
    # AdamW's fused kernel (torch.optim.AdamW(fused=True)): one pass over the weights instead of a loop of ops per
    # tensor (measured 7x faster on a 108M-parameter model, 1 thread); the same update up to float rounding
    fused_optimizer: bool = True
    # MoE models: the trainer's forward uses the experts the rollout engine chose (routing replay)
    routing_replay: bool = False
    # stop a run that collapsed beyond recovery (drpo.training.collapse), status 'collapsed'
    stop_on_collapse: bool = False

    @field_validator("advantage")
    @classmethod
    def _known_advantage(cls, v: str) -> str:
        from drpo.training.advantages import get_advantage

        get_advantage(v)
        return v


# Keys added after runs were made without them, with the value that computes as those runs did: a saved run
# configuration that lacks a key had this behaviour (resuming such a run, drpo.training.resume, reads it so)
LEGACY_DEFAULTS: dict[str, Any] = {"train.share_prompts": False, "train.fused_optimizer": False}


class RunConfig(StrictConfig):
    seed: int = 0
    model: str = "builtin"
    out: Optional[str] = None  # default: runs/<objective>-<date-time>
    device: str = "cpu"
    # torch threads per process (None: the cores that are free at start, split between the trainer and the
    # rollout worker when rollout.staleness >= 1; a resumed run keeps its count: drpo.training.threads)
    threads: Optional[int] = Field(None, ge=1)
    save_every: int = Field(50, ge=0)
    tensorboard: bool = True
    progress: bool = True
    task: TaskConfig = Field(default_factory=TaskConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("device")
    @classmethod
    def _usable_device(cls, v: str) -> str:
        try:
            dev = torch.device(v)
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {v!r}; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {v!r}: CUDA is not available here (torch {torch.__version__}); "
                             "use device=cpu")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device {v!r}: only cpu and cuda are supported")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        from drpo.rewards.base import get_reward

        get_reward(self.task.reward)  # a registered name or an importable 'module:function'
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
        if self.train.anchor == "rollout" and self.train.rollout_correction is not None:
            raise ValueError("train.rollout_correction: needs train.anchor='old_policy' "
                             "(anchored on the rollout mu there is nothing to correct)")
        if self.train.routing_replay and self.rollout.engine != "hf":
            raise ValueError("train.routing_replay: needs the engine's expert choices, which only "
                             "rollout.engine=hf records")
        if "topk" in str(self.objective.params.get("divergence", "")) or "topk" in self.objective.name:
            if self.rollout.logprobs_topk < 1:
                raise ValueError("rollout.logprobs_topk: DPPO Top-K needs the engine's top-K (set it >= 1)")
        return self


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"config error at '{key}': {msg}")
    return "\n".join(lines)


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value parsed as YAML, so 1e-4, true, [1, 2] keep their types)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    value = _yaml(raw, f"override {item!r}") if raw != "" else None
    if isinstance(value, str) and raw.strip()[:1] not in ("'", '"'):  # PyYAML reads 1e-4 (no dot) as a string
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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; a missing, unreadable, non-UTF-8 or non-YAML file is a
    ConfigError that says which."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    loaded = _yaml(text, f"config file {p}")
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return loaded or {}


def validate_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
    except (ValueError, TypeError) as e:  # raised inside a validator that is not a pydantic error
        raise ConfigError(f"config error: {e}") from None


def with_legacy_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A saved run configuration with :data:`LEGACY_DEFAULTS` filled in where it lacks them (a copy)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key, value in LEGACY_DEFAULTS.items():
        *sections, name = key.split(".")
        d = data
        for sec in sections:
            d = d.setdefault(sec, {})
        d.setdefault(name, value)
    return data


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                saved_run: bool = False) -> RunConfig:
    """Build a validated :class:`RunConfig` from an optional YAML file and ``key=value`` overrides. ``saved_run``:
    the file is a run's own config.yaml (resuming it): keys it lacks take their :data:`LEGACY_DEFAULTS`."""
    data = read_config_file(path) if path is not None else {}
    if saved_run:
        data = with_legacy_defaults(data)
    for item in overrides or []:
        keys, value = parse_override(item)
        _set(data, keys, value)
    return validate_config(data)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
