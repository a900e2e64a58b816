"""How many torch threads a training process uses (``threads`` in the run config).

    threads=N        N threads in this process (and in the rollout worker, when there is one)
    threads unset    torch's default (every core), or half of them each for the trainer and the
                     rollout worker when rollout.staleness >= 1
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def apply_thread_policy(threads: Optional[int], processes: int = 1) -> int:
    """Set this process's torch thread count for a run whose work is split over ``processes``
    processes; returns it."""
    if threads:
        torch.set_num_threads(threads)
    elif processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // processes))
    return torch.get_num_threads()
