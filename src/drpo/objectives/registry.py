"""The objective registry: one uniform signature per policy objective.

Every objective is a pure function

    fn(x: TokenInputs, **params) -> ObjectiveOutput

that returns the per-token loss ``L[b, t]`` (to minimise) and, where the objective switches a
token off, the boolean tensor of switched-off tokens. Aggregation over tokens, input checks,
rollout correction and metrics are shared and live in :mod:`drpo.objectives.api`.

Users add their own objective with the same decorator the library uses::

    @register_objective("my_pg")
    def my_pg(x: TokenInputs, *, beta: float = 0.1) -> ObjectiveOutput:
        return ObjectiveOutput(loss=-x.advantages * x.ratio + beta * (x.ratio - 1) ** 2)

A *preset* is a registered name that calls another objective with other defaults
(``grpo`` = ``ppo`` with 0.2/0.2, ``dapo`` = ``ppo`` with 0.2/0.28, ...).
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Optional

import torch
from pydantic import ConfigDict, TypeAdapter, ValidationError

from drpo.utils.registry import Registry

LOG_RATIO_CLAMP = 20.0  # |log r| is clamped here everywhere (ratio, rollout correction): exp stays finite


def require(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``cond``: how objectives check their parameters."""
    if not cond:
        raise ValueError(msg)


@dataclass
class TokenInputs:
    """Per-token inputs shared by every objective, all float32 and shaped (B, T).

    Masked positions are sanitised (log-probs 0, advantage 0) so that padding garbage cannot
    leak NaN/inf into the loss or its gradient.

    log_prob          log pi(y_t)      -- differentiable, the trainer's current policy
    behavior_log_prob log mu(y_t)      -- the anchor (rollout engine, or recomputed old policy)
    log_ratio         log r = clamp(log pi - log mu, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio             r = pi / mu
    prob, behavior_prob  pi(y_t), mu(y_t)
    advantages        A, broadcast to (B, T)
    mask              bool, True on response tokens
    topk_*            optional DPPO Top-K inputs (see :func:`drpo.objectives.divergence.dppo`)
    """

    log_prob: torch.Tensor
    behavior_log_prob: torch.Tensor
    log_ratio: torch.Tensor
    ratio: torch.Tensor
    prob: torch.Tensor
    behavior_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    topk_log_prob: Optional[torch.Tensor] = None
    behavior_topk_log_prob: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    sampled_ids: Optional[torch.Tensor] = None


@dataclass
class ObjectiveOutput:
    """loss: per-token loss (B, T) to minimise. inactive: tokens the objective switched off
    (clipped or masked: zero gradient by construction), or None if it never does.
    metrics: extra objective-specific floats (e.g. ``penalty_mean``)."""

    loss: torch.Tensor
    inactive: Optional[torch.Tensor] = None
    metrics: dict[str, float] = field(default_factory=dict)


ObjectiveFn = Callable[..., ObjectiveOutput]


@dataclass(frozen=True)
class Objective:
    """A registered objective: its function, its fixed preset parameters and its docs."""

    name: str
    fn: ObjectiveFn
    preset: dict[str, Any]
    doc: str

    @property
    def param_defaults(self) -> dict[str, Any]:
        """Keyword parameters and their defaults (preset values override the function's)."""
        return dict(self._defaults)

    @cached_property
    def _defaults(self) -> dict[str, Any]:
        sig = inspect.signature(self.fn)
        out = {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind == inspect.Parameter.KEYWORD_ONLY
        }
        out.update(self.preset)
        return out

    @cached_property
    def _param_types(self) -> dict[str, TypeAdapter]:
        hints = typing.get_type_hints(self.fn)
        strict = ConfigDict(strict=True)  # '12.5' is not a float, True is not a number
        return {k: TypeAdapter(hints[k], config=strict) for k in self.param_defaults if k in hints}

    def resolve_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Merge user params over the defaults. Unknown names, and values of the wrong type (by the
        function's annotations), are a ValueError that names the parameter."""
        known = self.param_defaults
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(
                f"objective {self.name!r} got unknown parameter(s) {unknown}; "
                f"its parameters are {sorted(known)}"
            )
        for k, v in params.items():
            if k in self._param_types:
                try:
                    self._param_types[k].validate_python(v)
                except ValidationError:
                    want = typing.get_type_hints(self.fn)[k]
                    raise ValueError(f"objective {self.name!r}: parameter {k!r} must be of type "
                                     f"{getattr(want, '__name__', want)}, got {v!r} "
                                     f"({type(v).__name__})") from None
        return {**known, **params}

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """:meth:`resolve_params`, then one call of the objective on a 1-token dummy input, so that
        its own value checks (``delta > 0``, a known ``divergence``, ...) run before any training."""
        p = self.resolve_params(params)
        self.fn(dummy_inputs(), **p)
        return p

    def bind(self, **params: Any) -> "BoundObjective":
        """This objective with ``params`` resolved over its defaults and validated once (names,
        types, values): what a trainer builds at set-up and passes to every ``policy_loss`` call."""
        return BoundObjective(self, self.validate(params))


@dataclass(frozen=True)
class BoundObjective:
    """An objective with every parameter fixed: ``bound(x)`` = ``objective.fn(x, **params)``.

    ``params`` holds all of them (defaults included), so ``bound.params.get("delta")`` is the delta
    the objective trains with. :meth:`with_params` returns a copy with some changed (validated
    again), e.g. the adaptive delta's value for the next step."""

    objective: Objective
    params: dict[str, Any]

    @property
    def name(self) -> str:
        return self.objective.name

    def __call__(self, x: TokenInputs) -> ObjectiveOutput:
        return self.objective.fn(x, **self.params)

    def with_params(self, **changed: Any) -> "BoundObjective":
        return self.objective.bind(**{**self.params, **changed})


def dummy_inputs() -> TokenInputs:
    """One unmasked token with every optional input present (Top-K of size 1)."""
    one = torch.ones(1, 1)
    lp = torch.full((1, 1), -0.5)
    return TokenInputs(log_prob=lp, behavior_log_prob=lp, log_ratio=0 * one, ratio=one, prob=lp.exp(),
                       behavior_prob=lp.exp(), advantages=one, mask=one.bool(),
                       topk_log_prob=lp[..., None], behavior_topk_log_prob=lp[..., None],
                       topk_ids=torch.zeros(1, 1, 1, dtype=torch.long), sampled_ids=torch.zeros(1, 1, dtype=torch.long))


OBJECTIVES: Registry[Objective] = Registry("objective", same=lambda a, b: a.fn is b.fn)


def register_objective(name: str, **preset: Any) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator registering ``fn`` under ``name`` (optionally with preset parameter values)."""

    def deco(fn: ObjectiveFn) -> ObjectiveFn:
        register_preset(name, fn, **preset)
        return fn

    return deco


def register_preset(name: str, fn: ObjectiveFn | str, doc: str = "", **preset: Any) -> None:
    """Register ``name`` as ``fn`` (or an already registered objective's name) with ``preset``."""
    if isinstance(fn, str):
        base = get_objective(fn)
        fn, preset = base.fn, {**base.preset, **preset}
    obj = Objective(name=name, fn=fn, preset=dict(preset), doc=doc or (fn.__doc__ or "").strip())
    obj.resolve_params({})  # a preset naming a parameter the function lacks fails here
    if name in OBJECTIVES and OBJECTIVES.same(OBJECTIVES[name], obj):
        OBJECTIVES.pop(name)  # the same function again, with this preset
    OBJECTIVES.add(name, obj)


def get_objective(name: str) -> Objective:
    """The registered objective ``name``; :class:`~drpo.utils.registry.UnknownName` (a ValueError) listing the known
    names otherwise."""
    return OBJECTIVES[name]


def list_objectives() -> list[str]:
    """Names of every registered objective and preset, sorted."""
    return OBJECTIVES.names()
