"""Rewards that misbehave: every call fails, a call never returns, a non-number, sys.exit.

Each fault gives one typed error or one recorded first error that the trainer can stop with
(see drpo.rewards.base: RewardError, RewardTimeout, RewardFailureGuard)."""
from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
import torch

from drpo.rewards.base import (
    DEFAULT_REWARD_TIMEOUT_S, AllRewardsFailed, RewardError, RewardFailureGuard, RewardTimeout, score_batch,
)
from drpo.rollout.collect import Collector
from drpo.rollout.engine import RolloutBatch
from drpo.tasks.base import Example
from drpo.tasks.config import TaskConfig


def _examples(n: int) -> list[Example]:
    return [Example(prompt=f"q{i}", answer=str(i), id=f"id{i}") for i in range(n)]


# ---------------------------------------------------------------- A1: every call fails

def always_raises(example: Example, response: str) -> float:
    raise ZeroDivisionError("division by zero")


def returns_none(example: Example, response: str) -> float:
    return None  # type: ignore[return-value]  (a forgotten `return`)


def returns_nan(example: Example, response: str) -> float:
    return float("nan")


@pytest.mark.parametrize(("fn", "needle"), [
    (always_raises, "ZeroDivisionError: division by zero"),
    (returns_none, "TypeError: returned None, not a number"),
    (returns_nan, "ValueError: reward is not finite: nan"),
])
def test_the_first_error_is_recorded(fn, needle):
    rewards, stats = score_batch(fn, _examples(4), ["a", "b", "c", "d"])
    assert rewards == [0.0] * 4 and (stats.n, stats.n_errors) == (4, 4)
    assert stats.first_error == f"reward function {fn.__name__} failed on item 0 (id='id0'): {needle}"


def test_a_healthy_batch_records_no_error():
    _, stats = score_batch(lambda e, r: 0.5, _examples(3), ["a", "b", "c"])
    assert stats.first_error is None and stats.n_errors == 0


def test_the_guard_stops_after_consecutive_all_failed_steps():
    guard = RewardFailureGuard(patience=3)
    _, bad = score_batch(always_raises, _examples(2), ["a", "b"])
    _, ok = score_batch(lambda e, r: 1.0, _examples(2), ["a", "b"])
    for stats in (bad, bad, ok, bad, bad):  # one healthy step resets the count
        guard.update(stats.n, stats.n_errors, stats.first_error)
    with pytest.raises(AllRewardsFailed, match=r"^every reward call failed in 3 consecutive steps \(2 of 2 in the "
                                               r"last\); first error: reward function always_raises failed on item 0 "
                                               r"\(id='id0'\): ZeroDivisionError: division by zero; fix the reward"):
        guard.update(bad.n, bad.n_errors, bad.first_error)
    with pytest.raises(ValueError, match="patience"):
        RewardFailureGuard(patience=0)


class _FakeEngine:
    """Two responses per prompt, token ids that the fake codec decodes to 'r<id>'."""

    def generate(self, prompts, sampling, gen) -> RolloutBatch:
        n = 2 * len(prompts)
        ids = torch.arange(n).unsqueeze(1)
        return RolloutBatch(prompt_ids=ids, prompt_mask=torch.ones_like(ids), response_ids=ids,
                            response_mask=torch.ones_like(ids), behavior_log_prob=torch.zeros(n, 1),
                            prompt_index=torch.arange(len(prompts)).repeat_interleave(2))


class _FakeCodec:
    def encode(self, prompt: str, name: str = "") -> list[int]:
        return [1]

    def encode_example(self, example: Example) -> list[int]:
        return [1]

    def decode(self, response_ids, response_mask) -> list[str]:
        return [f"r{int(i)}" for i in response_ids[:, 0]]


class _Prompts:
    def train_batch(self, step: int, n: int) -> list[Example]:
        return _examples(n)

    def heldout(self, n: int) -> list[Example]:
        return []


def test_collected_carries_the_first_error():
    got = Collector(_Prompts(), _FakeCodec(), None, always_raises, prompts_per_step=3, seed=0).collect(0, _FakeEngine(), 0)
    assert got.reward_errors == 6 == len(got.rewards)
    assert got.reward_error == ("reward function always_raises failed on item 0 (id='id0'): "
                                "ZeroDivisionError: division by zero")
    healthy = Collector(_Prompts(), _FakeCodec(), None, lambda e, r: 1.0, prompts_per_step=3, seed=0)
    got = healthy.collect(0, _FakeEngine(), 0)
    assert got.reward_error is None and got.reward_errors == 0 and got.rewards.tolist() == [1.0] * 6


# ---------------------------------------------------------------- A2: a call that never returns

def test_a_hanging_reward_times_out_naming_function_item_and_limit():
    never = threading.Event()

    def hangs_on_third(example: Example, response: str) -> float:
        if example.id == "id2":
            never.wait()  # blocks in a lock: the limit must still interrupt it
        return 1.0

    t0 = time.perf_counter()
    with pytest.raises(RewardTimeout, match=r"^reward function hangs_on_third took longer than 0.2 s on item 2 "
                                            r"\(id='id2'\); .*task.reward_timeout \(seconds; 0 = no limit\)$"):
        score_batch(hangs_on_third, _examples(4), ["a"] * 4, timeout_s=0.2)
    assert time.perf_counter() - t0 < 5
    assert issubclass(RewardTimeout, RewardError) and issubclass(RewardError, RuntimeError)


@pytest.mark.parametrize("hang", ["loop", "sleep", "swallow"])
def test_every_kind_of_hang_is_interrupted(hang):
    def hangs(example: Example, response: str) -> float:
        if hang == "loop":
            while True:
                pass
        if hang == "sleep":
            time.sleep(3600)
        while True:  # a reward that catches every Exception must not swallow the limit
            try:
                time.sleep(3600)
            except Exception:
                pass

    with pytest.raises(RewardTimeout, match="took longer than 0.1 s on item 0"):
        score_batch(hangs, _examples(1), ["a"], timeout_s=0.1)


def test_the_timeout_is_per_call_not_per_batch_and_the_timer_is_restored():
    import signal

    def slowish(example: Example, response: str) -> float:
        time.sleep(0.05)
        return 1.0

    handler = signal.getsignal(signal.SIGALRM)
    rewards, stats = score_batch(slowish, _examples(8), ["a"] * 8, timeout_s=0.3)  # 0.4 s in all
    assert rewards == [1.0] * 8 and stats.n_errors == 0
    assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with pytest.raises(RewardTimeout):
        score_batch(lambda e, r: time.sleep(1), _examples(1), ["a"], timeout_s=0.05)
    assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_rewards_run_in_the_callers_thread():
    """With or without a limit: thread-local state and signal-based code behave as without drpo."""
    seen = []

    def where(example: Example, response: str) -> float:
        seen.append(threading.current_thread())
        return 1.0

    for limit in (None, 0, 60):
        score_batch(where, _examples(2), ["a", "b"], timeout_s=limit)
    assert seen == [threading.current_thread()] * 6


@pytest.mark.slow
def test_a_reward_using_math_verify_directly_is_unchanged():
    """math-verify's own timeouts set SIGALRM (main thread only): same rewards with and without the limit."""
    from math_verify import parse, verify

    def mv_reward(example: Example, response: str) -> float:
        return float(verify(parse(example.answer), parse(response)))

    exs = [Example(prompt="p", answer=f"${i}$", id=str(i)) for i in range(4)]
    responses = ["$0$", "$2$", "$\\frac{4}{2}$", "$3$"]
    with_limit = score_batch(mv_reward, exs, responses)
    assert with_limit == score_batch(mv_reward, exs, responses, timeout_s=None)
    assert with_limit[0] == [1.0, 0.0, 1.0, 1.0] and with_limit[1].n_errors == 0


def test_reward_timeout_config_key():
    assert TaskConfig().reward_timeout == DEFAULT_REWARD_TIMEOUT_S == 60.0
    assert TaskConfig(reward_timeout=None).reward_timeout is None
    assert TaskConfig(reward_timeout=0).reward_timeout == 0
    with pytest.raises(ValueError):
        TaskConfig(reward_timeout=-1)


def test_the_collector_applies_its_timeout():
    def hangs(example: Example, response: str) -> float:
        time.sleep(2)
        return 1.0

    c = Collector(_Prompts(), _FakeCodec(), None, hangs, prompts_per_step=1, seed=0, reward_timeout=0.1)
    with pytest.raises(RewardTimeout, match="took longer than 0.1 s"):
        c.collect(0, _FakeEngine(), 0)


# ---------------------------------------------------------------- A3: not a number

@pytest.mark.parametrize(("value", "type_name"), [("1.0", "str"), ([1.0], "list"), ({"r": 1}, "dict"),
                                                  (torch.tensor([1.0, 2.0]), "Tensor"), (1j, "complex")])
def test_a_non_number_is_a_fatal_error(value, type_name):
    def returns_it(example: Example, response: str):
        return value

    for limit in (None, 60):
        with pytest.raises(RewardError, match=rf"^reward function returns_it returned a {type_name} \(.*\) on item 0 "
                                              r"\(id='id0'\), not a number"):
            score_batch(returns_it, _examples(2), ["a", "b"], timeout_s=limit)


@pytest.mark.parametrize("value", [1, 0.25, True, np.float32(0.25), np.int64(1), np.bool_(True),
                                   np.array(0.25), torch.tensor(0.25)])
def test_numbers_of_every_kind_are_accepted(value):
    rewards, stats = score_batch(lambda e, r: value, _examples(1), ["a"])
    assert rewards == [float(value)] and stats.n_errors == 0


# ---------------------------------------------------------------- A4: sys.exit and Ctrl-C

def exits(example: Example, response: str) -> float:
    sys.exit(3)


@pytest.mark.parametrize("limit", [None, 60])
def test_sys_exit_in_a_reward_is_a_reward_error(limit):
    with pytest.raises(RewardError, match=r"^reward function exits called sys.exit\(3\) on item 0 \(id='id0'\)"):
        score_batch(exits, _examples(2), ["a", "b"], timeout_s=limit)


@pytest.mark.parametrize("limit", [None, 60])
def test_keyboard_interrupt_still_propagates(limit):
    def interrupted(example: Example, response: str) -> float:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_batch(interrupted, _examples(2), ["a", "b"], timeout_s=limit)


def test_healthy_rewards_are_identical_with_and_without_the_limit():
    from drpo.rewards.base import math_reward

    exs = [Example(prompt="p", answer=str(i % 3)) for i in range(12)]
    responses = [rf"so \boxed{{{i % 2}}}" for i in range(12)]
    assert score_batch(math_reward, exs, responses)[0] == score_batch(math_reward, exs, responses, timeout_s=None)[0]


@pytest.mark.slow
def test_a_run_saved_before_reward_timeout_existed_can_resume():
    from drpo.training.run_io import check_resume_config

    saved = {"task": {"reward": "math"}, "train": {"steps": 4}}
    check_resume_config(saved, {"task": {"reward": "math", "reward_timeout": 60.0}, "train": {"steps": 4}}, 2)
    check_resume_config(saved, {"task": {"reward": "math", "reward_timeout": 5.0}, "train": {"steps": 4}}, 2)


def test_evaluate_passes_its_reward_timeout():
    from drpo.evaluation.metrics import evaluate

    def hangs(example: Example, response: str) -> float:
        time.sleep(2)
        return 1.0

    with pytest.raises(RewardTimeout, match="took longer than 0.1 s"):
        evaluate(lambda prompts, n: [["x"] * n for _ in prompts], _examples(1), k=1, reward_fn=hangs,
                 progress=False, reward_timeout=0.1)


def test_an_unconvertible_number_is_an_item_error():
    import decimal

    rewards, stats = score_batch(lambda e, r: decimal.Decimal("sNaN"), _examples(1), ["a"])
    assert rewards == [0.0] and stats.n_errors == 1 and "ValueError" in stats.first_error
