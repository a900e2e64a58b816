"""Evaluation metrics for sampled answers: pass@k (Chen et al., 2021) and avg@k, and a loop that
samples k completions per prompt and scores them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

from tqdm.auto import tqdm

from drpo.rewards.base import DEFAULT_REWARD_TIMEOUT_S, RewardFn, math_reward, score_batch
from drpo.tasks.base import Example

GenerateFn = Callable[[list[str], int], list[list[str]]]  # prompts, n -> n completions per prompt


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct:
    ``1 - C(n-c, k) / C(n, k)``, computed as a stable product (Chen et al., 2021)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, c, k)):
        raise ValueError(f"n, c, k must be ints, got n={n!r}, c={c!r}, k={k!r}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean accuracy over examples and their k samples (every example has the same k)."""
    if not correct:
        raise ValueError("avg_at_k needs at least one example")
    k = len(correct[0])
    if k == 0 or any(len(row) != k for row in correct):
        lengths = sorted({len(row) for row in correct})
        raise ValueError(f"every example needs the same number (>= 1) of samples; got {lengths}")
    return sum(sum(map(bool, row)) for row in correct) / (k * len(correct))


@dataclass(frozen=True)
class EvalResult:
    """avg@k and pass@k over ``n`` examples, with ``k`` samples each.

    per_example: one dict per example: id, answer, responses, rewards, n_correct.
    A sample is correct when its reward is positive. ``n_reward_errors`` counts reward calls
    that raised (they scored 0.0).
    """

    avg_at_k: float
    pass_at_k: float
    k: int
    n: int
    n_reward_errors: int
    per_example: list[dict[str, Any]] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_generations(completions: Any, n_prompts: int, k: int) -> None:
    if not isinstance(completions, list) or len(completions) != n_prompts:
        got = len(completions) if isinstance(completions, list) else type(completions).__name__
        raise ValueError(f"generate_fn must return a list of {n_prompts} lists, got {got}")
    for i, row in enumerate(completions):
        if not isinstance(row, list) or len(row) != k or not all(isinstance(s, str) for s in row):
            raise ValueError(f"generate_fn result for prompt {i} must be a list of {k} strings")


def evaluate(
    generate_fn: GenerateFn,
    examples: Sequence[Example],
    *,
    k: int,
    reward_fn: RewardFn = math_reward,
    batch_size: int = 64,
    progress: bool = True,
    reward_timeout: Optional[float] = DEFAULT_REWARD_TIMEOUT_S,
) -> EvalResult:
    """Sample ``k`` completions per example (``batch_size`` prompts per ``generate_fn`` call),
    score them with ``reward_fn`` and report avg@k and pass@k. ``reward_timeout``: seconds per
    reward call (None or 0: no limit); :class:`drpo.rewards.base.RewardError` propagates."""
    if not examples:
        raise ValueError("evaluate needs at least one example")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    per_example: list[dict[str, Any]] = []
    n_errors = 0
    with tqdm(total=len(examples), desc=f"eval k={k}", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(examples), batch_size):
            batch = list(examples[start : start + batch_size])
            completions = generate_fn([ex.prompt for ex in batch], k)
            _check_generations(completions, len(batch), k)
            flat_examples = [ex for ex in batch for _ in range(k)]
            flat_responses = [text for row in completions for text in row]
            rewards, stats = score_batch(reward_fn, flat_examples, flat_responses, timeout_s=reward_timeout)
            n_errors += stats.n_errors
            for i, (ex, responses) in enumerate(zip(batch, completions)):
                row_rewards = rewards[i * k : (i + 1) * k]
                per_example.append(
                    {
                        "id": ex.id,
                        "answer": ex.answer,
                        "responses": responses,
                        "rewards": row_rewards,
                        "n_correct": sum(r > 0 for r in row_rewards),
                    }
                )
            bar.update(len(batch))
    correct = [[r > 0 for r in row["rewards"]] for row in per_example]
    return EvalResult(
        avg_at_k=avg_at_k(correct),
        pass_at_k=sum(pass_at_k(k, row["n_correct"], k) for row in per_example) / len(per_example),
        k=k,
        n=len(per_example),
        n_reward_errors=n_errors,
        per_example=per_example,
    )
