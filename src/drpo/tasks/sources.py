"""Prompt sources: deterministic in (seed, step), so a resumed run (or a rollout worker) sees the same data.

    ArithmeticPrompts  the built-in task: batch ``step`` is drawn with an RNG seeded by (seed, step)
    JsonlPrompts       a jsonl dataset: one seeded permutation per epoch, batch ``step`` is the
                       ``step``-th slice of the concatenated epochs
"""
from __future__ import annotations

import random
from typing import Protocol, Sequence

from drpo.tasks.base import Example
from drpo.tasks.config import TaskConfig
from drpo.utils.errors import InputError
from drpo.utils.seeding import SALT_DATA_ORDER, SALT_TRAIN_PROMPTS, step_seed


class PromptSource(Protocol):
    def train_batch(self, step: int, n: int) -> list[Example]: ...
    def heldout(self, n: int) -> list[Example]: ...
    def examples_to_check(self, batch: int, heldout: int) -> list[Example]: ...


class ArithmeticPrompts:
    def __init__(self, difficulty: int, seed: int) -> None:
        from drpo.tasks.arithmetic import ArithmeticTask

        self.task = ArithmeticTask(difficulty=difficulty, seed=seed)
        self.seed = seed

    def train_batch(self, step: int, n: int) -> list[Example]:
        return self.task.train_examples(n, rng=random.Random(step_seed(self.seed, step, SALT_TRAIN_PROMPTS)))

    def heldout(self, n: int) -> list[Example]:
        return self.task.heldout(n)

    def examples_to_check(self, batch: int, heldout: int) -> list[Example]:
        """What a run checks before it starts (prompt lengths): the first batch and ``heldout`` held-out
        prompts (the task makes them as it goes; these show a prompt limit that is too low)."""
        return self.train_batch(0, batch) + self.heldout(heldout)


class JsonlPrompts:
    def __init__(self, train: Sequence[Example], heldout: Sequence[Example], seed: int) -> None:
        if not train:
            raise InputError("the training dataset is empty")
        self.train, self._heldout, self.seed = list(train), list(heldout), seed
        self._orders: dict[int, list[int]] = {}

    def train_batch(self, step: int, n: int) -> list[Example]:
        out, L = [], len(self.train)
        for j in range(step * n, (step + 1) * n):
            epoch, i = divmod(j, L)
            out.append(self.train[self._order(epoch)[i]])
        return out

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.train)))
            random.Random(step_seed(self.seed, epoch, SALT_DATA_ORDER)).shuffle(order)
            self._orders = {epoch: order}  # only the current epoch is kept
        return self._orders[epoch]

    def heldout(self, n: int) -> list[Example]:
        return self._heldout[:n]

    def examples_to_check(self, batch: int, heldout: int) -> list[Example]:
        """Every example of the dataset, and ``heldout`` held-out ones: all are known up front."""
        return self.train + self.heldout(heldout)


def make_prompts(task: TaskConfig, seed: int) -> PromptSource:
    if task.name == "arithmetic":
        return ArithmeticPrompts(task.difficulty, seed)
    from drpo.tasks.datasets import load_jsonl

    kw = dict(question_field=task.question_field, answer_field=task.answer_field, template=task.template)
    train = load_jsonl(task.path, **kw)
    heldout = load_jsonl(task.eval_path, **kw) if task.eval_path else []
    return JsonlPrompts(train, heldout, seed)
