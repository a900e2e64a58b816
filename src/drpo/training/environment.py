"""The run's environment: what a run's numbers depend on besides its configuration and seed, and the process-wide
settings it runs with. The run's lifecycle applies it once per process, records it (``status.json``, every
checkpoint) and, on ``--resume``, compares it with the checkpoint's.

    threads            torch threads of this process (and of the rollout worker): ``threads`` in the config, else
                       the resumed run's, else the free cores at start (:mod:`drpo.training.threads`); CPU
                       reductions, so the numbers, depend on it
    cpu_capability     the CPU kernels torch dispatches to (e.g. AVX2, AVX512): with another set the sums round
                       differently
    keep_freed_memory  the memory policy (:mod:`drpo.utils.memory`) applied; it never changes a number

A resumed run keeps the checkpoint's thread count (``threads`` may not change on resume: drpo.training.resume); one
whose CPU kernels differ from the checkpoint's says so once: from there its numbers part from an uninterrupted run's.
A checkpoint from before a field was recorded holds None for it (nothing to compare).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from drpo.training.threads import apply_thread_policy
from drpo.utils.memory import keep_freed_memory


@dataclass(frozen=True)
class RunEnvironment:
    threads: Optional[int]
    cpu_capability: Optional[str]
    keep_freed_memory: Optional[bool]

    @classmethod
    def apply(cls, threads: Optional[int], *, processes: int, resumed: Optional["RunEnvironment"] = None,
              notify: Callable[[str], None] = print) -> "RunEnvironment":
        """Set this process's threads and memory policy, and return the environment it now has. ``processes``: how
        many processes share the cores (2 with a rollout worker); ``resumed``: the checkpoint's environment."""
        env = cls(threads=apply_thread_policy(threads, processes, resumed.threads if resumed else None),
                  cpu_capability=torch.backends.cpu.get_cpu_capability(), keep_freed_memory=keep_freed_memory())
        for change in env.changes_from(resumed) if resumed else []:
            notify(f"warning: resuming with {change}: from here its numbers differ from an uninterrupted run's")
        return env

    def changes_from(self, before: "RunEnvironment") -> list[str]:
        """What differs from ``before`` in a way that changes the numbers, in words (the memory policy does not; the
        thread count cannot)."""
        out = []
        if before.cpu_capability is not None and before.cpu_capability != self.cpu_capability:
            out.append(f"{self.cpu_capability} CPU kernels, the run began with {before.cpu_capability}")
        return out
