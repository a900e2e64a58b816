"""Micro-batches that pad only to their own longest row: RolloutBatch.compact / pad_responses / by_length and the
trainer's log-probs on them (the same numbers as on the padded batch)."""
from __future__ import annotations

import pytest
import torch

from drpo.rollout import RolloutBatch
from drpo.training.logprobs import response_logprobs
from drpo.training.trainer import Trainer
from helpers import small_config

PAD = 0


def _batch(prompt_lens, response_lens, P, R, vocab=50, layers=None, seed=0) -> RolloutBatch:
    """Rows laid out like the engine's: [left-padded prompt | response, right-padded]; routing (when
    ``layers``) is -1 on padding and an expert pair elsewhere."""
    g = torch.Generator().manual_seed(seed)
    N = len(prompt_lens)
    pm, rm = torch.zeros(N, P, dtype=torch.long), torch.zeros(N, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        pm[i, P - p:], rm[i, :r] = 1, 1
    pid = torch.where(pm.bool(), torch.randint(2, vocab, (N, P), generator=g), PAD)
    rid = torch.where(rm.bool(), torch.randint(2, vocab, (N, R), generator=g), PAD)
    routing = None
    if layers:
        valid = torch.cat([pm, rm], 1).bool()[:, :, None, None].expand(N, P + R, layers, 2)
        experts = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(N * (P + R) * layers)])
        routing = torch.where(valid, experts.view(N, P + R, layers, 2), -1)
    return RolloutBatch(prompt_ids=pid, prompt_mask=pm, response_ids=rid, response_mask=rm,
                        behavior_log_prob=-torch.rand(N, R, generator=g) * rm, prompt_index=torch.arange(N),
                        topk_log_prob=-torch.rand(N, R, 3, generator=g), topk_ids=torch.randint(2, vocab, (N, R, 3)),
                        routing=routing)


def test_compact_drops_exactly_the_columns_that_are_padding_in_every_row():
    b = _batch([3, 5], [2, 4], P=8, R=7, layers=2)
    c = b.compact()
    assert c.prompt_ids.shape == (2, 5) and c.response_ids.shape == (2, 4)
    assert torch.equal(c.prompt_ids, b.prompt_ids[:, 3:]) and torch.equal(c.prompt_mask, b.prompt_mask[:, 3:])
    for name in ("response_ids", "response_mask", "behavior_log_prob", "topk_log_prob", "topk_ids"):
        assert torch.equal(getattr(c, name), getattr(b, name)[:, :4]), name
    assert torch.equal(c.routing, b.routing[:, 3:8 + 4]) and torch.equal(c.prompt_index, b.prompt_index)
    # every real token survives: the masks' sums are unchanged
    assert torch.equal(c.prompt_mask.sum(1), b.prompt_mask.sum(1))
    assert torch.equal(c.response_mask.sum(1), b.response_mask.sum(1))
    # and pad_responses is its inverse on the response columns (zeros where compact dropped columns: here, those
    # tensors that are 0 on padding)
    for name in ("response_ids", "response_mask", "behavior_log_prob"):
        assert torch.equal(b.pad_responses(getattr(c, name)), getattr(b, name)), name


def test_compact_keeps_a_batch_that_has_no_padding_column():
    b = _batch([4, 2], [3, 1], P=4, R=3)
    c = b.compact()
    for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "behavior_log_prob", "topk_ids"):
        assert torch.equal(getattr(c, f), getattr(b, f)), f


def test_by_length_orders_rows_by_prompt_length_prompt_and_response_length_stably():
    b = _batch([5, 2, 5, 2, 3, 5], [1, 4, 1, 2, 6, 0], P=6, R=6)
    b.prompt_index = torch.tensor([2, 1, 0, 1, 3, 2])  # rows 1, 3 share a prompt; so do 0, 5
    order = b.by_length(torch.arange(6))
    assert order.tolist() == [3, 1, 4, 2, 5, 0]  # prompt length 2, 3, 5; then prompt; then response length
    # a subset keeps its own ids
    assert b.by_length(torch.tensor([4, 0, 1])).tolist() == [1, 4, 0]
    # the rows of one prompt are adjacent even where other prompts have responses of lengths in between
    b = _batch([4] * 6, [1, 5, 3, 2, 6, 4], P=4, R=6)
    b.prompt_index = torch.tensor([0, 0, 0, 1, 1, 1])
    assert b.by_length(torch.arange(6)).tolist() == [0, 2, 1, 3, 5, 4]
    # without by_prompt (train.share_prompts=false): lengths only, the order the trainer used before sharing
    assert b.by_length(torch.arange(6), by_prompt=False).tolist() == [0, 3, 2, 5, 1, 4]


@pytest.mark.slow  # a Trainer's set-up starts a process
@pytest.mark.parametrize("moe", [False, True])
def test_trainer_logprobs_on_a_compacted_micro_batch_equal_those_on_the_padded_one(
        moe, tiny_model_dir, moe_model_dir, tmp_path):
    """The model runs on the compacted rows; log pi, entropy and top-K log pi are those of the padded batch
    (float tolerance), 0 on the dropped response columns; an MoE's routing is cut with the batch (replay on)."""
    model_dir = moe_model_dir if moe else tiny_model_dir
    extra = ("train.routing_replay=true",) if moe else ()
    tr = Trainer(small_config(model_dir, tmp_path / "run", *extra))
    try:
        V = tr.model.config.vocab_size
        layers = tr.model.config.num_hidden_layers if moe else None
        b = _batch([3, 6, 4], [2, 5, 1], P=9, R=8, vocab=V, layers=layers)
        tr.model.eval()
        with torch.no_grad():
            logp, ent, tk = tr._logprobs(b, with_entropy=True)
            from drpo.models import given_routing

            with given_routing(tr.model, b.routing, replay=True):
                ref, ref_ent, ref_tk = response_logprobs(tr.model, b.prompt_ids, b.prompt_mask, b.response_ids,
                                                         b.response_mask, with_entropy=True, topk_ids=b.topk_ids)
        assert logp.shape == ent.shape == (3, 8) and tk.shape == (3, 8, 3)
        m = b.response_mask.bool()
        torch.testing.assert_close(logp[m], ref[m], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent[m], ref_ent[m], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tk[m], ref_tk[m], rtol=1e-5, atol=1e-5)
        assert (logp[:, 5:] == 0).all() and (ent[:, 5:] == 0).all() and (tk[:, 5:] == 0).all()
    finally:
        tr.rollout.close()
        tr.life.lock.release()
