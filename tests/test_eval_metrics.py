"""pass@k / avg@k, the evaluate() loop with a fake generator, and the reward interface."""
import itertools
import json
import logging
import math
import operator

import pytest

from drpo.evaluation.metrics import avg_at_k, evaluate, pass_at_k
from drpo.rewards.base import get_reward, math_reward, score_batch
from drpo.tasks.base import Example


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c of them correct) containing a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_closed_forms():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 0, 100) == 0.0
    assert pass_at_k(200, 150, 100) == 1.0
    assert pass_at_k(1000, 1, 10) == pytest.approx(1 - math.comb(999, 10) / math.comb(1000, 10))


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (5.0, 2, 1)])
def test_pass_at_k_bad_input(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_k():
    assert avg_at_k([[True, False], [False, False], [True, True]]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one"):
        avg_at_k([])
    with pytest.raises(ValueError, match=r"same number .* got \[1, 2\]"):
        avg_at_k([[True], [True, False]])


def _examples(n: int) -> list[Example]:
    return [Example(prompt=f"What is {i}+0?", answer=str(i), id=f"q{i}") for i in range(n)]


def _fake_generate(calls: list[int]):
    """Example i gets (i % 3) correct samples out of n, the rest wrong."""

    def generate(prompts: list[str], n: int) -> list[list[str]]:
        calls.append(len(prompts))
        out = []
        for prompt in prompts:
            i = int(prompt.split()[2].split("+")[0])
            out.append([f"\\boxed{{{i}}}" if j < i % 3 else f"\\boxed{{{i + 1}}}" for j in range(n)])
        return out

    return generate


def test_evaluate_with_fake_generator():
    calls: list[int] = []
    result = evaluate(_fake_generate(calls), _examples(7), k=4, batch_size=3, progress=False)
    assert calls == [3, 3, 1]
    n_correct = [i % 3 for i in range(7)]  # 0,1,2,0,1,2,0
    assert [row["n_correct"] for row in result.per_example] == n_correct
    assert result.avg_at_k == pytest.approx(sum(n_correct) / (7 * 4))
    assert result.pass_at_k == pytest.approx(4 / 7)
    assert (result.k, result.n, result.n_reward_errors) == (4, 7, 0)
    assert json.loads(json.dumps(result.to_dict()))["per_example"][1]["id"] == "q1"


def test_evaluate_counts_reward_errors():
    def flaky_reward(example: Example, response: str) -> float:
        if example.id == "q1":
            raise RuntimeError("grader crashed")
        return 1.0

    result = evaluate(_fake_generate([]), _examples(3), k=2, reward_fn=flaky_reward, progress=False)
    assert result.n_reward_errors == 2
    assert result.avg_at_k == pytest.approx(4 / 6)
    assert result.per_example[1]["rewards"] == [0.0, 0.0]


def test_evaluate_rejects_malformed_generations():
    with pytest.raises(ValueError, match="result for prompt 0 must be a list of 2 strings"):
        evaluate(lambda prompts, n: [["only one"] for _ in prompts], _examples(2), k=2, progress=False)
    with pytest.raises(ValueError, match="must return a list of 2 lists"):
        evaluate(lambda prompts, n: [], _examples(2), k=2, progress=False)
    with pytest.raises(ValueError, match="k must be a positive int"):
        evaluate(_fake_generate([]), _examples(2), k=0, progress=False)


def test_math_reward():
    example = Example(prompt="p", answer="025")
    assert math_reward(example, r"so \boxed{25}") == 1.0
    assert math_reward(example, r"so \boxed{26}") == 0.0


def test_score_batch_logs_first_errors_then_counts(caplog):
    def reward(example: Example, response: str) -> float:
        if response == "bad":
            raise KeyError("missing")
        if response == "nan":
            return float("nan")
        return 0.5

    responses = ["ok", "bad", "nan", "bad", "bad", "bad", "ok"]
    with caplog.at_level(logging.WARNING, logger="drpo.rewards.base"):
        rewards, stats = score_batch(reward, _examples(7), responses)
    assert rewards == [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]
    assert (stats.n, stats.n_errors) == (7, 5)
    assert stats.mean == pytest.approx(1 / 7)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4  # three in full, then one summary
    assert "KeyError: 'missing'" in messages[0] and "ValueError: reward is not finite" in messages[1]
    assert "failed on 5 of 7 items (2 not shown)" in messages[3]


def test_score_batch_length_mismatch():
    with pytest.raises(ValueError, match="differ in length: 2 vs 1"):
        score_batch(math_reward, _examples(2), ["x"])


def test_get_reward():
    assert get_reward("math") is math_reward
    assert get_reward("operator:add") is operator.add
    assert get_reward(math_reward) is math_reward


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", r"unknown reward 'nope'; known: \['math'\]"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("operator:no_such_fn", "has no attribute 'no_such_fn'"),
        ("math:pi", "'pi' is a float, not a function"),
        ("operator:", "must look like 'package.module:function'"),
        ("", "reward spec must be"),
    ],
)
def test_get_reward_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        get_reward(spec)
