"""The rows of one prompt share its forward (drpo.training.logprobs.shared_prompt_hidden): log pi, entropy and the
gradients are those of the plain forward, on a tiny dense model (float tolerance)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from drpo.training.logprobs import response_logprobs

PAD = 0


def _groups(prompt_lens, G, response_lens, P, R, vocab, seed=0):
    """G rows per prompt, left-padded prompts of ``prompt_lens``, right-padded responses of ``response_lens``."""
    g = torch.Generator().manual_seed(seed)
    n = len(prompt_lens) * G
    pm, rm = torch.zeros(n, P, dtype=torch.long), torch.zeros(n, R, dtype=torch.long)
    prompts = [torch.randint(2, vocab, (p,), generator=g) for p in prompt_lens]
    pid = torch.full((n, P), PAD)
    for i in range(n):
        p = prompt_lens[i // G]
        pm[i, P - p:], pid[i, P - p:] = 1, prompts[i // G]
        rm[i, :response_lens[i]] = 1
    rid = torch.where(rm.bool(), torch.randint(2, vocab, (n, R), generator=g), PAD)
    return pid, pm, rid, rm, torch.arange(len(prompt_lens)).repeat_interleave(G)


@pytest.mark.parametrize("order", ["grouped", "mixed"])
def test_shared_prompts_give_the_plain_forwards_numbers(tiny_model_dir, order):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float()
    V = model.config.vocab_size
    pid, pm, rid, rm, index = _groups([5, 3, 7], 4, [3, 1, 6, 2, 4, 4, 6, 5, 1, 2, 3, 6], P=8, R=6, vocab=V)
    if order == "mixed":  # rows of one prompt need not be adjacent
        perm = torch.randperm(len(index), generator=torch.Generator().manual_seed(1))
        pid, pm, rid, rm, index = pid[perm], pm[perm], rid[perm], rm[perm], index[perm]
    results = []
    for prompt_index in (None, index):
        model.zero_grad()
        lp, ent, _ = response_logprobs(model, pid, pm, rid, rm, with_entropy=True, temperature=0.7,
                                       prompt_index=prompt_index)
        ((lp * rm).sum() + 0.1 * (ent * rm).sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((lp * rm, ent * rm, grads))
    (lp0, ent0, g0), (lp1, ent1, g1) = results
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5 * float(g0.abs().max()))  # sums in another order
    assert g0.abs().max() > 0  # gradients reach the weights


def test_rows_with_one_index_but_other_prompts_are_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float()
    pid, pm, rid, rm, index = _groups([5, 3], 2, [2, 2, 2, 2], P=6, R=2, vocab=model.config.vocab_size)
    with pytest.raises(ValueError, match="rows with the same index hold different prompts"):
        response_logprobs(model, pid, pm, rid, rm, prompt_index=torch.tensor([0, 0, 0, 1]))
