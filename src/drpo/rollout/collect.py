"""One step's experience: prompts -> engine (samples + its own log mu) -> decoded texts -> rewards.

:class:`Collector` is the whole data side of an RL step. It runs in the trainer's process when
rollouts are synchronous and in the rollout worker process when they are not
(:mod:`drpo.rollout.service`); everything it does is a function of (seed, step) and the engine's
weights, so both places produce the same batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from drpo.models.text import TextCodec
from drpo.rewards.base import DEFAULT_REWARD_TIMEOUT_S, RewardFn, score_batch
from drpo.rollout.engine import RolloutBatch, SamplingParams
from drpo.tasks.base import Example
from drpo.tasks.sources import PromptSource
from drpo.utils.seeding import SALT_SAMPLING, step_seed


@dataclass
class Collected:
    """A scored rollout batch. ``version`` is the number of optimiser updates of the policy that
    generated it (the trainer's step count when its weights were published). ``reward_errors``
    reward calls failed (scored 0.0); ``reward_error`` is the first of them in one line (see
    :class:`drpo.rewards.base.RewardStats`), None when none did."""

    batch: RolloutBatch
    rewards: torch.Tensor          # (N,) float
    reward_errors: int
    step: int
    version: int
    seconds: dict[str, float] = field(default_factory=dict)  # time/rollout, time/reward
    reward_error: Optional[str] = None


class Collector:
    """``reward_timeout``: seconds per reward call (``task.reward_timeout``; None or 0: no limit); a
    call over it raises :class:`drpo.rewards.base.RewardTimeout` out of :meth:`collect`, as does any
    :class:`~drpo.rewards.base.RewardError`."""

    def __init__(self, prompts: PromptSource, codec: TextCodec, sampling: SamplingParams, reward_fn: RewardFn,
                 *, prompts_per_step: int, seed: int,
                 reward_timeout: Optional[float] = DEFAULT_REWARD_TIMEOUT_S) -> None:
        self.prompts, self.codec, self.sampling, self.reward_fn = prompts, codec, sampling, reward_fn
        self.prompts_per_step, self.seed, self.reward_timeout = prompts_per_step, seed, reward_timeout

    def encode(self, ex: Example) -> list[int]:
        return self.codec.encode_example(ex)

    def collect(self, step: int, engine, version: int) -> Collected:
        t0 = time.perf_counter()
        examples = self.prompts.train_batch(step, self.prompts_per_step)
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, SALT_SAMPLING))
        batch = engine.generate([self.encode(e) for e in examples], self.sampling, gen)
        t1 = time.perf_counter()
        texts = self.codec.decode(batch.response_ids, batch.response_mask)
        rewards, stats = score_batch(self.reward_fn, [examples[i] for i in batch.prompt_index.tolist()], texts,
                                     timeout_s=self.reward_timeout)
        t2 = time.perf_counter()
        return Collected(batch, torch.tensor(rewards, dtype=torch.float32), stats.n_errors, step, version,
                         {"time/rollout": t1 - t0, "time/reward": t2 - t1}, reward_error=stats.first_error)

