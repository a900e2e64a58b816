"""Rewards a randomly initialised test model can earn, so that trainer tests see real gradients.

The arithmetic task's own reward needs ``\\boxed{``, the right number and ``}`` among ~2.5k tokens:
a random model never earns it, every advantage is 0 and no weight moves. These rewards vary
between the samples of a group from the first step, and a policy can learn to raise them.
Used as ``task.reward=helpers:number_reward`` (tests/ is on sys.path under pytest).
"""
from __future__ import annotations


def number_reward(example, response: str) -> float:
    """The share of the response's words that are numbers (the built-in vocabulary holds 1000 of them)."""
    words = response.split()
    return sum(w.isdigit() for w in words) / len(words) if words else 0.0


def interrupt_at(monkeypatch, at: int) -> None:
    """Make ``Trainer.step`` raise KeyboardInterrupt at 0-based step ``at`` (a Ctrl-C there);
    ``monkeypatch.undo()`` restores it."""
    from drpo.training.trainer import Trainer

    real = Trainer.step

    def step(self, i):
        if i == at:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(Trainer, "step", step)
