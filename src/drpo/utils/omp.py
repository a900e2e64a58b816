"""OpenMP's wait policy, set before torch loads its OpenMP runtime.

By default an idle OpenMP thread spin-waits for the next parallel region. On a machine where another
process keeps a core busy, torch's threads then spin against that process and against each other: the
default ``drpo train`` (two threads) took 2.8-4.4 s per step beside one busy process, against 0.62-0.67 s
idle (benchmarks/thread_policy.py). ``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep instead.

libgomp reads the variable once, when it is loaded (with ``import torch``), so :func:`prefer_passive_wait`
runs at the top of ``drpo/__init__.py``, before anything imports torch -- in the CLI, in the rollout
worker and in every run process of a grid (they all import drpo first). A value the user set wins; if
torch was imported before drpo, nothing can change and nothing is changed.
"""
from __future__ import annotations

import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_wait() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user set it or torch is already loaded; True if it did."""
    if WAIT_POLICY in os.environ or "torch" in sys.modules:
        return False
    os.environ[WAIT_POLICY] = "PASSIVE"
    return True
