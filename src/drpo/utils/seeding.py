"""Reproducible seeds: every random draw of a run is derived from (run seed, step, purpose)."""
from __future__ import annotations


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, step, purpose)."""
    return (seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**31 - 1)


# the purposes (salts) used by the trainer and the rollout workers; one list, so no two collide
SALT_TRAIN_PROMPTS = 1
SALT_DATA_ORDER = 2
SALT_SAMPLING = 3
SALT_MINIBATCH_ORDER = 4
SALT_EVAL_SAMPLING = 5
