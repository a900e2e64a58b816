"""The rollout worker's transport (drpo.rollout.service): a published version is one copy of the weights in shared
memory that another mapping reads in place, a message's tensors travel as safetensors (torch.load is never asked),
and the worker's side dispatches typed commands. (The worker process itself: tests/test_trainer.py, test_faults.py.)"""
from __future__ import annotations

import os
import queue

import pytest
import torch

from drpo.rollout import service
from drpo.rollout.collect import Collected
from drpo.rollout.engine import RolloutBatch, SamplingParams
from drpo.rollout.service import Batch, Failed, Generate, Layout, Publish, SharedWeights, Stop, decode, encode


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 5, generator=g), "b.bias": torch.randn(7, generator=g),
            "c.steps": torch.arange(4, dtype=torch.int64), "d.mask": torch.tensor([True, False]),
            "e.half": torch.randn(2, 2, generator=g).to(torch.bfloat16)}


def test_a_published_version_is_one_buffer_that_another_mapping_reads_in_place():
    state = _state()
    layout = Layout.of(state)
    shared, fd = SharedWeights.write(layout, state)
    try:
        other = SharedWeights(layout, os.dup(fd))  # what the worker maps from the descriptor it receives
    finally:
        os.close(fd)
    for name, t in state.items():
        assert shared.tensors[name].dtype == t.dtype and torch.equal(shared.tensors[name], t), name
        assert torch.equal(other.tensors[name], t), name
    # one copy: every tensor is a view of the one mapping (no per-tensor allocation), at an aligned offset
    assert len({t.untyped_storage().data_ptr() for t in shared.tensors.values()}) == 1
    assert all(off % service.ALIGN == 0 for *_, off in layout.entries)
    state["a.weight"].add_(1.0)  # the trainer's next update does not reach the published version
    assert not torch.equal(shared.tensors["a.weight"], state["a.weight"])
    shared.tensors["b.bias"][0] = 42.0  # both mappings are the same memory
    assert other.tensors["b.bias"][0] == 42.0


def test_messages_carry_tensors_as_safetensors_and_never_ask_torch_load(monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was asked"))
    ids = torch.tensor([[1, 2], [3, 4]])
    batch = RolloutBatch(prompt_ids=ids, prompt_mask=torch.ones_like(ids), response_ids=ids[:, :1],
                         response_mask=torch.ones(2, 1, dtype=torch.long), behavior_log_prob=torch.tensor([[-0.5], [-1]]),
                         prompt_index=torch.tensor([0, 1]))
    got = decode(encode(Batch(3, Collected(batch, torch.tensor([1.0, 0.0]), 1, 3, 2, {"time/rollout": 0.5},
                                           reward_error="x"))))
    assert isinstance(got, Batch) and got.step == 3 and got.collected.reward_error == "x"
    for name in ("prompt_ids", "response_ids", "behavior_log_prob", "prompt_index"):
        assert torch.equal(getattr(got.collected.batch, name), getattr(batch, name)), name
    assert got.collected.batch.topk_ids is None and torch.equal(got.collected.rewards, torch.tensor([1.0, 0.0]))
    assert decode(encode(Failed("E: x", "tb"))) == Failed("E: x", "tb")


class _FakeRollout:
    version = 0

    def __init__(self):
        self.generated = []

    def generate(self, prompts, params, seed):
        self.generated.append((prompts, seed))
        return "samples"


def test_the_worker_dispatches_typed_commands():
    sent = []
    worker = service._Worker(spec=None, commands=queue.Queue(), weights=None, send=sent.append)
    worker.rollout, worker.latest = _FakeRollout(), 0
    assert worker.handle(Generate([[1, 2]], SamplingParams(), seed=5)) is True
    assert worker.rollout.generated == [([[1, 2]], 5)] and sent == [service.Generated("samples")]
    assert worker.handle(Stop()) is False
    with pytest.raises(TypeError, match="not a command"):
        worker.handle(("weights", 1, b""))  # the tuples of before are no longer understood
    received = []
    worker.receive = received.append
    assert worker.handle(Publish(4)) is True and received == [4]
