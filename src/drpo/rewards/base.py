"""Reward functions: the interface for users' own rewards, the built-in math reward, batch scoring.

A reward function maps ``(example, response_text)`` to a float. Plug in your own by passing the
function itself, or a spec string (the trainer's ``task.reward``): a registered name (``"math"``, or
one added with :func:`register_reward`) or an import path (``"package.module:function"``).

The contract, as :func:`score_batch` enforces it:

* return a real number (int, float, bool, a numpy scalar, a 0-d tensor); raise for an item you
  cannot score. A call that raises, or returns None or NaN/inf, scores 0.0 and is counted
  (``RewardStats.n_errors``, the first one kept in ``RewardStats.first_error``); a run in which
  every call fails for a few steps should stop (:class:`RewardFailureGuard`).
* returning anything else (a string, a list, ...) or calling ``sys.exit`` is a programming error:
  :class:`RewardError`, at once.
* each call has ``task.reward_timeout`` seconds (default 60; 0 or None: no limit); a call over it
  is interrupted and raises :class:`RewardTimeout`.
"""
from __future__ import annotations

import decimal
import importlib
import logging
import math
import numbers
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from drpo.rewards.verify import verify
from drpo.tasks.base import Example
from drpo.utils.registry import Registry

RewardFn = Callable[[Example, str], float]

logger = logging.getLogger(__name__)
LOGGED_ERRORS = 3  # errors logged in full per batch; the rest are only counted


def math_reward(example: Example, response: str) -> float:
    """1.0 if the last ``\\boxed{}`` answer of ``response`` matches ``example.answer``, else 0.0."""
    return 1.0 if verify(response, example.answer) else 0.0


REWARDS: Registry[RewardFn] = Registry("reward", hint=", or give 'package.module:function'")
REWARDS.add("math", math_reward)


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a reward function under ``name`` (then ``task.reward=<name>``).
    The rollout worker process of an asynchronous run imports rewards afresh: register yours in a
    module it imports, or give the import path instead."""
    return REWARDS.register(name)


class RewardError(RuntimeError):
    """A reward function broke its contract in a way that must stop the run: it returned something
    that is not a number, called ``sys.exit``, took longer than its limit (:class:`RewardTimeout`),
    or failed on every call of several steps in a row (:class:`AllRewardsFailed`). The message is one
    line naming the function (and the item) and saying what to do."""


class RewardTimeout(RewardError):
    """One reward call took longer than ``task.reward_timeout`` seconds (the call was interrupted)."""


class AllRewardsFailed(RewardError):
    """Every reward call failed in several consecutive steps (see :class:`RewardFailureGuard`)."""


DEFAULT_REWARD_TIMEOUT_S = 60.0  # task.reward_timeout's default: seconds per reward call
DEFAULT_FAILED_STEPS = 3  # consecutive steps with every reward call failed before a run stops


@dataclass(frozen=True)
class RewardStats:
    """Summary of one scored batch. ``n_errors`` counts calls that raised or gave None or a
    non-finite number (they scored 0.0); ``first_error`` is the first of them in one line
    (``reward function F failed on item I (id=...): Type: message``), None when none failed."""

    n: int
    n_errors: int
    mean: float
    first_error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RewardFailureGuard:
    """Stops a run whose reward fails on every call: :meth:`update` once per step raises
    :class:`AllRewardsFailed` (with the first error of the streak) when ``patience`` consecutive
    steps had every reward call fail. A step with at least one good call resets the count."""

    def __init__(self, patience: int = DEFAULT_FAILED_STEPS) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience must be a positive int, got {patience!r}")
        self.patience = patience
        self.streak = 0
        self.first_error: Optional[str] = None

    def update(self, n: int, n_errors: int, first_error: Optional[str]) -> None:
        """Count one step's batch of ``n`` reward calls, ``n_errors`` of which failed."""
        if n == 0 or n_errors < n:
            self.streak, self.first_error = 0, None
            return
        self.streak += 1
        self.first_error = self.first_error or first_error
        if self.streak >= self.patience:
            raise AllRewardsFailed(
                f"every reward call failed in {self.streak} consecutive steps ({n} of {n} in the last); "
                f"first error: {self.first_error or 'unknown'}; fix the reward function (task.reward)")


def reward_name(fn: Callable[..., Any]) -> str:
    """How errors name a reward function: its ``__name__`` (the class name for a callable object)."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def _item(i: int, example: Example) -> str:
    """``item 3 (id='7', data.jsonl line 8)``: the batch position, the id, and the source when known."""
    where = ", ".join(x for x in (f"id={example.id!r}", getattr(example, "source", "")) if x)
    return f"item {i} ({where})"


def _to_number(value: Any) -> Optional[float]:
    """``float(value)`` for a real number -- int, float, bool, numpy scalars, Fraction, Decimal, a
    0-d numpy array or tensor -- else None (a string, a list, a complex, a tensor of several ...)."""
    if isinstance(value, (numbers.Real, decimal.Decimal)):
        return float(value)
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        item = value.item()
        if isinstance(item, numbers.Real):
            return float(item)
    return None


class _Deadline(BaseException):
    """Raised by the SIGALRM handler inside a call that overran its limit. A BaseException, so
    that a reward's own ``except Exception`` does not swallow it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Deadline


@contextmanager
def _alarm(limit: Optional[float]) -> Iterator[bool]:
    """Install the SIGALRM handler for one batch; yields whether calls can be timed.

    Calls are timed with ``signal.setitimer`` in the caller's own thread, so a reward runs exactly
    as without a limit (same thread, same thread-local state); the signal interrupts Python code
    and blocking system calls (sleep, sockets, locks, subprocesses). Only the main thread can
    receive signals: elsewhere calls run without a limit. A reward that sets its own SIGALRM
    (math-verify's ``parse``/``verify`` timeouts) cancels the limit for the rest of that call.
    Any timer set before is restored afterwards (less the time spent)."""
    if limit is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        if limit is not None:
            _warn_once("reward calls off the main thread run without task.reward_timeout (signals only "
                       "reach the main thread)")
        yield False
        return
    before = signal.setitimer(signal.ITIMER_REAL, 0)
    handler = signal.signal(signal.SIGALRM, _on_alarm)
    t0 = time.monotonic()
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
        if before[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, max(before[0] - (time.monotonic() - t0), 1e-3), before[1])


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


# Rewards that bound their own calls: math_reward's verify() gives up on a check after 5 s and on a
# worker start-up (a one-off import) after 120 s; a second, shorter bound would only stop a run
# whose machine is slow once.
_BOUNDED: tuple[RewardFn, ...] = (math_reward,)


def _call(fn: RewardFn, i: int, example: Example, response: str, limit: Optional[float]
          ) -> tuple[float, Optional[Exception]]:
    """One reward call: ``(reward, None)``, or ``(0.0, error)`` for a call that raised or gave None
    or a non-finite number. Raises :class:`RewardError` for what must stop the run: a value that is
    not a number, ``sys.exit``, or a call over ``limit`` seconds (when not None)."""
    try:
        try:
            if limit is not None:
                signal.setitimer(signal.ITIMER_REAL, limit)
            value = fn(example, response)
        finally:
            if limit is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        raise RewardTimeout(
            f"reward function {reward_name(fn)} took longer than {limit:g} s on {_item(i, example)}; make it "
            "faster (or give up and raise), or raise task.reward_timeout (seconds; 0 = no limit)") from None
    except SystemExit as e:
        raise RewardError(
            f"reward function {reward_name(fn)} called sys.exit({e.code!r}) on {_item(i, example)}; a reward "
            "must return a number, or raise an exception for an item it cannot score") from None
    except Exception as error:  # one bad call must not stop training
        return 0.0, error
    if value is None:
        return 0.0, TypeError("returned None, not a number")
    try:
        reward = _to_number(value)
    except (TypeError, ValueError, OverflowError, RuntimeError) as error:  # Decimal("sNaN"), an odd .item()
        return 0.0, error
    if reward is None:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise RewardError(
            f"reward function {reward_name(fn)} returned a {type(value).__name__} ({shown}) on {_item(i, example)}, "
            "not a number; return a float (int, bool, numpy scalar or 0-d tensor also work)")
    if not math.isfinite(reward):
        return 0.0, ValueError(f"reward is not finite: {reward}")
    return reward, None


def score_batch(
    fn: RewardFn, examples: Sequence[Example], responses: Sequence[str], *,
    timeout_s: Optional[float] = DEFAULT_REWARD_TIMEOUT_S,
) -> tuple[list[float], RewardStats]:
    """Score ``responses[i]`` against ``examples[i]`` with ``fn``.

    A call that raises, or returns None or a non-finite number, scores 0.0 and is counted in
    ``RewardStats.n_errors``; the first is kept in ``RewardStats.first_error``, the first
    ``LOGGED_ERRORS`` are logged with their type and message, the rest summarised in one line.

    Raised, because no later call can make up for it (:class:`RewardError`): a value that is not a
    number (a string, a list, ...), a call of ``sys.exit``, and (:class:`RewardTimeout`) a call
    longer than ``timeout_s`` seconds (None or 0: no limit; see :func:`_alarm` for how calls are
    timed). KeyboardInterrupt propagates.
    """
    if len(examples) != len(responses):
        raise ValueError(
            f"examples and responses differ in length: {len(examples)} vs {len(responses)}"
        )
    if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s)
                                      and timeout_s >= 0):
        raise ValueError(f"timeout_s must be a number of seconds >= 0 or None, got {timeout_s!r}")
    limit = None if not timeout_s or any(fn is b for b in _BOUNDED) else float(timeout_s)
    rewards: list[float] = []
    n_errors = 0
    first_error: Optional[str] = None
    with _alarm(limit) as timed:
        for i, (example, response) in enumerate(zip(examples, responses)):
            reward, error = _call(fn, i, example, response, limit if timed else None)
            if error is not None:
                n_errors += 1
                if first_error is None:
                    first_error = (f"reward function {reward_name(fn)} failed on {_item(i, example)}: "
                                   f"{type(error).__name__}: {error}")
                if n_errors <= LOGGED_ERRORS:
                    logger.warning(
                        "reward %s failed on item %d (id=%r): %s: %s",
                        reward_name(fn), i, example.id, type(error).__name__, error,
                    )
            rewards.append(reward)
    if n_errors > LOGGED_ERRORS:
        logger.warning(
            "reward %s failed on %d of %d items (%d not shown); they scored 0.0",
            reward_name(fn), n_errors, len(rewards), n_errors - LOGGED_ERRORS,
        )
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    return rewards, RewardStats(n=len(rewards), n_errors=n_errors, mean=mean, first_error=first_error)


def get_reward(spec: str | RewardFn) -> RewardFn:
    """Resolve a reward: a callable is returned as is; a string is a name in ``REWARDS``
    (``"math"``) or an import path ``"package.module:function"``."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"reward spec must be a name, 'module:function' or a callable, got {spec!r}"
        )
    if spec in REWARDS or ":" not in spec:
        return REWARDS[spec]  # an unknown name: UnknownName, listing the known ones
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
