"""How many torch threads a training process uses (``threads`` in the run config).

    threads=N        N threads in this process (and in the rollout worker, when there is one)
    threads unset    the cores this process may use (``os.sched_getaffinity``) minus the cores other
                     processes keep busy at start (sampled from /proc/stat over 0.2 s), split between
                     the trainer and the rollout worker when rollout.staleness >= 1; at least 1.

OpenMP keeps its default wait policy (idle threads spin for a while): measured on the development
machine, ``OMP_WAIT_POLICY=PASSIVE`` made the idle default run 45% slower with two threads (0.89 against
0.61 s per step), and under load this policy already runs one thread per free core, where the wait policy
does not matter. Load that starts after the run has started is not seen: set ``threads=1`` then.

A run records the count it chose (``threads`` in status.json and in its checkpoints), and a resumed run
keeps it, so that its numbers are those of the uninterrupted run (CPU reductions depend on the thread count).
Measured on the development machine, idle and with one and two busy processes:
benchmarks/thread_policy.py (table in benchmarks/README.md).
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

SAMPLE_S = 0.2


def _cpu_times(cpus: set[int]) -> tuple[float, float]:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat."""
    busy = total = 0.0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            v = [float(x) for x in vals]
            idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
            busy += sum(v[:8]) - idle
            total += sum(v[:8])
    return busy, total


def busy_cores(cpus: set[int], sample_s: float = SAMPLE_S) -> float:
    """How many of ``cpus`` other processes keep busy, measured over ``sample_s`` seconds while this
    process waits (0 where /proc/stat cannot be read)."""
    try:
        b0, t0 = _cpu_times(cpus)
        time.sleep(sample_s)
        b1, t1 = _cpu_times(cpus)
    except (OSError, ValueError):
        return 0.0
    return len(cpus) * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def default_threads(processes: int = 1) -> int:
    """The policy for ``threads`` unset (module docstring): free cores at start, per process."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    free = len(cpus) - round(busy_cores(cpus))
    return max(1, free // max(processes, 1))


def apply_thread_policy(threads: Optional[int], processes: int = 1, resumed: Optional[int] = None) -> int:
    """Set this process's torch thread count and return it: ``threads`` if given, else the count a resumed
    run chose before (``resumed``), else :func:`default_threads` for ``processes`` processes."""
    n = threads or resumed or default_threads(processes)
    torch.set_num_threads(n)
    return n
