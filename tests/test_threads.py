"""The thread policy (drpo.training.threads): the user's count, a resumed run's count, else the free cores."""
from __future__ import annotations

import pytest
import torch

from drpo.training import threads as policy


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _machine(monkeypatch, cpus: int, busy: float) -> None:
    monkeypatch.setattr(policy.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(policy, "busy_cores", lambda cpus_, sample_s=policy.SAMPLE_S: busy)


@pytest.mark.parametrize("cpus, busy, processes, expected", [
    (2, 0.0, 1, 2),   # idle: every core
    (2, 0.9, 1, 1),   # one busy process: the free core
    (2, 2.0, 1, 1),   # all taken: still one thread
    (2, 0.0, 2, 1),   # trainer + rollout worker share the cores
    (8, 2.2, 2, 3),   # 6 free cores, 2 processes
    (4, 0.4, 1, 4),   # a little load rounds to no busy core
])
def test_default_threads_are_the_free_cores_per_process(monkeypatch, cpus, busy, processes, expected):
    _machine(monkeypatch, cpus, busy)
    assert policy.default_threads(processes) == expected


def test_apply_thread_policy_prefers_the_users_count_then_the_resumed_one(monkeypatch, restore_threads):
    _machine(monkeypatch, cpus=2, busy=0.9)  # the default would be 1
    assert policy.apply_thread_policy(3) == 3 and torch.get_num_threads() == 3
    assert policy.apply_thread_policy(None, resumed=2) == 2 and torch.get_num_threads() == 2
    assert policy.apply_thread_policy(3, resumed=2) == 3
    assert policy.apply_thread_policy(None) == 1 and torch.get_num_threads() == 1


def test_busy_cores_is_the_busy_share_of_the_sampled_jiffies(monkeypatch):
    samples = iter([(100.0, 1000.0), (250.0, 1200.0)])  # 150 of 200 jiffies busy on 2 cpus: 1.5 cores
    monkeypatch.setattr(policy, "_cpu_times", lambda cpus: next(samples))
    assert policy.busy_cores({0, 1}, sample_s=0) == pytest.approx(1.5)


def test_busy_cores_reads_this_machines_proc_stat():
    """On Linux the real /proc/stat parses, and the answer is a share of the cores (0 where it is unreadable)."""
    cpus = policy.os.sched_getaffinity(0) if hasattr(policy.os, "sched_getaffinity") else {0}
    assert 0.0 <= policy.busy_cores(cpus, sample_s=0.05) <= len(cpus)
