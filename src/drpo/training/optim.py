"""The optimiser and its learning-rate schedule (``train.lr``, ``betas``, ``weight_decay``, ``schedule``,
``warmup_steps``); the schedule counts optimiser steps (K minibatches x epochs per RL step).

    constant  lr
    warmup    lr * min(1, (i + 1) / warmup_steps)
    cosine    the warm-up, then lr * (1 + cos(pi * progress)) / 2 down to 0 at the last optimiser step

Only ``cosine`` is laid out over the run (:data:`OVER_THE_RUN`): its learning rates depend on ``train.steps``, so a
resumed run may not change it (drpo.training.resume).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from drpo.training.config import TrainConfig


OVER_THE_RUN = ("cosine",)  # the schedules whose multipliers depend on the run's length (tests/test_trainer.py checks)


def schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The multiplier of the learning rate at optimiser step ``i`` (module docstring)."""
    def f(i: int) -> float:
        if kind == "constant":
            return 1.0
        w = min(1.0, (i + 1) / warmup) if warmup else 1.0
        if kind == "warmup":
            return w
        progress = min(1.0, max(0, i - warmup) / max(1, total - warmup))
        return w * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(params, t: TrainConfig):
    """AdamW (its fused kernel with ``train.fused_optimizer``) and its LambdaLR schedule over the run's
    ``steps x minibatches x epochs`` optimiser steps."""
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay,
                                  fused=t.fused_optimizer or None)
    total = max(t.steps * t.minibatches * t.epochs, 1)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(t.schedule, t.warmup_steps, total))
