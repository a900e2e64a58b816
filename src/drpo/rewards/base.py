"""Reward functions: the interface for users' own rewards, the built-in math reward, batch scoring.

A reward function maps ``(example, response_text)`` to a float. Plug in your own by passing the
function itself, or a spec string (the trainer's ``task.reward``): a registered name (``"math"``, or
one added with :func:`register_reward`) or an import path (``"package.module:function"``).
"""
from __future__ import annotations

import importlib
import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from drpo.rewards.verify import verify
from drpo.tasks.base import Example

RewardFn = Callable[[Example, str], float]


class RewardError(RuntimeError):
    """The reward function is broken (not a single bad answer): the run cannot go on."""

logger = logging.getLogger(__name__)
LOGGED_ERRORS = 3  # errors logged in full per batch; the rest are only counted


def math_reward(example: Example, response: str) -> float:
    """1.0 if the last ``\\boxed{}`` answer of ``response`` matches ``example.answer``, else 0.0."""
    return 1.0 if verify(response, example.answer) else 0.0


REWARDS: dict[str, RewardFn] = {"math": math_reward}


def register_reward(name: str):
    """Decorator registering a reward function under ``name`` (then ``task.reward=<name>``).
    The rollout worker process of an asynchronous run imports rewards afresh: register yours in a
    module it imports, or give the import path instead."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return deco


@dataclass(frozen=True)
class RewardStats:
    """Summary of one scored batch. ``n_errors`` counts calls that raised (scored 0.0)."""

    n: int
    n_errors: int
    mean: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def score_batch(
    fn: RewardFn, examples: Sequence[Example], responses: Sequence[str]
) -> tuple[list[float], RewardStats]:
    """Score ``responses[i]`` against ``examples[i]`` with ``fn``.

    A call that raises scores 0.0 and is counted in ``RewardStats.n_errors``; the first
    ``LOGGED_ERRORS`` are logged with their type and message, the rest summarised in one line.
    A non-finite or non-numeric reward counts as an error too.
    """
    if len(examples) != len(responses):
        raise ValueError(
            f"examples and responses differ in length: {len(examples)} vs {len(responses)}"
        )
    rewards: list[float] = []
    n_errors = 0
    for i, (example, response) in enumerate(zip(examples, responses)):
        try:
            reward = float(fn(example, response))
            if not math.isfinite(reward):
                raise ValueError(f"reward is not finite: {reward}")
        except Exception as error:  # one bad call must not stop training
            n_errors += 1
            if n_errors <= LOGGED_ERRORS:
                logger.warning(
                    "reward %s failed on item %d (id=%r): %s: %s",
                    getattr(fn, "__name__", repr(fn)), i, example.id, type(error).__name__, error,
                )
            reward = 0.0
        rewards.append(reward)
    if n_errors > LOGGED_ERRORS:
        logger.warning(
            "reward %s failed on %d of %d items (%d not shown); they scored 0.0",
            getattr(fn, "__name__", repr(fn)), n_errors, len(rewards), n_errors - LOGGED_ERRORS,
        )
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    return rewards, RewardStats(n=len(rewards), n_errors=n_errors, mean=mean)


def get_reward(spec: str | RewardFn) -> RewardFn:
    """Resolve a reward: a callable is returned as is; a string is a name in ``REWARDS``
    (``"math"``) or an import path ``"package.module:function"``."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"reward spec must be a name, 'module:function' or a callable, got {spec!r}"
        )
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown reward {spec!r}; known: {sorted(REWARDS)}, or give 'package.module:function'"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward path {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"reward {spec!r}: cannot import module {module_name!r} ({error})"
        ) from error
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn
