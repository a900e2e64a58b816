"""The process's memory policy (drpo.utils.memory): freed tensors are reused without page faults."""
from __future__ import annotations

import resource

import pytest
import torch


def _faults_of_a_64mib_tensor_in_steady_state(rounds: int = 3) -> int:
    """Page faults taken by writing a fresh 64 MiB tensor, in the last of ``rounds`` allocate-write-free rounds
    (the first may grow the heap: a freed block with a neighbour in use can be too tight for an aligned request)."""
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(16 << 20)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        del x
    return faults


def test_keep_freed_memory_reuses_freed_tensors_without_page_faults():
    """glibc serves 64 MiB (above its largest dynamic mmap threshold, 32 MiB) with a fresh mmap by default:
    ~16,000 page faults each time such a tensor is made; with the policy the freed block is reused."""
    from drpo.utils.memory import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("no glibc mallopt here")
    assert _faults_of_a_64mib_tensor_in_steady_state() < 1000
