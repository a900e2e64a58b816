"""The rollout engine: sampling, masks, mu vs pi per precision."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpo.rollout.engine import HFRolloutEngine, SamplingParams, left_pad, sample_categorical, sampling_logprobs
from drpo.rollout.precision import quantize_fp8_per_channel
from drpo.training.logprobs import response_logprobs


@pytest.fixture(scope="module")
def policy(random_tiny_dir):
    tok = AutoTokenizer.from_pretrained(random_tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(random_tiny_dir, dtype=torch.float32)
    # sharpen the random model a little so that probabilities are not all ~1/V
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in
               ["Q : Maria has 12 apples . A :", "Problem : compute 3 + 4 . Answer :", "Q : 5 - 2 ? A :"]]
    return tok, model, prompts


def _engine(model, tok, precision):
    return HFRolloutEngine(model, precision=precision, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)


def _pi(model, batch, temperature=1.0):
    with torch.no_grad():
        lp, _, _ = response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                     batch.response_mask, temperature=temperature)
    return lp


def test_fp32_engine_mu_equals_trainer_pi(policy):
    tok, model, prompts = policy
    eng = _engine(model, tok, "fp32")
    for temp in (1.0, 0.7):
        b = eng.generate(prompts, SamplingParams(n=4, max_new_tokens=10, temperature=temp), torch.Generator().manual_seed(0))
        m = b.response_mask.bool()
        diff = (b.behavior_log_prob - _pi(model, b, temp)).abs()[m]
        assert diff.max() < 1e-4, diff.max()


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_low_precision_engine_really_differs(policy, precision):
    tok, model, prompts = policy
    b = _engine(model, tok, precision).generate(prompts, SamplingParams(n=4, max_new_tokens=10),
                                                torch.Generator().manual_seed(0))
    m = b.response_mask.bool()
    shift = (b.behavior_log_prob.exp() - _pi(model, b).exp()).abs()[m]
    assert shift.mean() > 1e-5
    assert (b.behavior_log_prob - _pi(model, b)).abs()[m].max() > 1e-4


def test_fp8_mismatch_larger_than_bf16(policy):
    tok, model, prompts = policy
    out = {}
    for p in ("bf16", "fp8"):
        b = _engine(model, tok, p).generate(prompts * 4, SamplingParams(n=4, max_new_tokens=10),
                                            torch.Generator().manual_seed(1))
        m = b.response_mask.bool()
        out[p] = (b.behavior_log_prob - _pi(model, b)).abs()[m].mean()
    assert out["fp8"] > out["bf16"]


def test_fp8_quantisation_grid():
    w = torch.randn(8, 16)
    q = quantize_fp8_per_channel(w)
    scale = w.abs().amax(-1, keepdim=True) / 448.0
    grid = (q / scale).to(torch.float8_e4m3fn).float() * scale
    torch.testing.assert_close(q, grid)
    assert (q - w).abs().max() > 0
    assert ((q - w).abs() / w.abs().clamp(min=1e-3)).median() < 0.07  # e4m3: 3 mantissa bits


def test_sampling_layout_eos_and_masks(policy):
    tok, model, prompts = policy
    eng = _engine(model, tok, "fp32")
    b = eng.generate(prompts, SamplingParams(n=3, max_new_tokens=12), torch.Generator().manual_seed(2))
    assert len(b) == 9 and b.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(len(b)):
        ids, m = b.response_ids[i], b.response_mask[i].bool()
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # contiguous
        eos = (ids[:n] == tok.eos_token_id).nonzero()
        if len(eos):  # stops right at the first EOS
            assert int(eos[0]) == n - 1
        else:
            assert n == 12 or n == b.response_ids.shape[1]
        assert (b.behavior_log_prob[i][~m] == 0).all()
    # prompts right-aligned
    assert (b.prompt_mask[:, -1] == 1).all()


def test_sampling_is_reproducible_with_a_generator(policy):
    tok, model, prompts = policy
    eng = _engine(model, tok, "fp32")
    p = SamplingParams(n=2, max_new_tokens=8)
    a = eng.generate(prompts, p, torch.Generator().manual_seed(5))
    b = eng.generate(prompts, p, torch.Generator().manual_seed(5))
    assert torch.equal(a.response_ids, b.response_ids)


def test_top_k_top_p_distribution():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    lp = sampling_logprobs(logits, SamplingParams(top_k=2))
    assert torch.isinf(lp[0, 2:]).all() and torch.allclose(lp.exp().sum(), torch.tensor(1.0))
    lp = sampling_logprobs(logits, SamplingParams(top_p=0.8))
    probs = torch.softmax(logits, -1)[0]
    kept = int((probs.cumsum(0) - probs <= 0.8).sum())
    assert torch.isfinite(lp[0, :kept]).all() and torch.isinf(lp[0, kept:]).all()
    assert torch.allclose(lp.exp().sum(), torch.tensor(1.0))


def test_topk_logprobs_returned(policy):
    tok, model, prompts = policy
    b = _engine(model, tok, "fp32").generate(prompts, SamplingParams(n=1, max_new_tokens=5, logprobs_topk=3),
                                             torch.Generator().manual_seed(0))
    assert b.topk_ids.shape[-1] == 3 and b.topk_log_prob.shape == b.topk_ids.shape
    assert (b.topk_log_prob[..., 0] >= b.topk_log_prob[..., 1]).all()


def test_bad_sampling_params_are_config_errors_and_the_config_builds_them():
    """Sampling parameters are validated once, where they come in (the config); the config builds them."""
    from drpo.training.config import load_config
    from drpo.utils.config import ConfigError

    for item, key in (("rollout.temperature=0", "rollout.temperature"), ("rollout.top_p=1.5", "rollout.top_p"),
                      ("rollout.top_k=-1", "rollout.top_k")):
        with pytest.raises(ConfigError, match=f"config error at '{key}'"):
            load_config(None, [item])
    cfg = load_config(None, ["rollout.temperature=0.7", "rollout.top_k=5", "rollout.group_size=4"]).rollout
    assert cfg.sampling() == SamplingParams(temperature=0.7, top_k=5, n=4, max_new_tokens=cfg.max_new_tokens)
    with pytest.raises(ValueError, match="unknown rollout precision"):
        HFRolloutEngine(torch.nn.Linear(2, 2), precision="nf4", eos_id=0, pad_id=0)


def test_left_pad():
    ids, m = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and m.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_full_logits_fallback_matches_the_chunked_path(policy, monkeypatch):
    """Heads that are not a plain linear map (soft-capping, logit scale) are scored from the model's
    own logits; on a plain head both paths must give the same log pi, entropy, top-K and gradient."""
    from drpo.training import logprobs as lp_mod

    tok, model, prompts = policy
    b = _engine(model, tok, "fp32").generate(prompts, SamplingParams(n=2, max_new_tokens=8, logprobs_topk=3),
                                             torch.Generator().manual_seed(1))

    def run():
        model.zero_grad(set_to_none=True)
        lp, ent, tk = lp_mod.response_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids,
                                               b.response_mask, temperature=0.8, with_entropy=True,
                                               topk_ids=b.topk_ids)
        (lp.sum() + 0.1 * ent[b.response_mask.bool()].sum()).backward()
        return lp.detach(), ent.detach(), tk.detach(), model.get_output_embeddings().weight.grad.clone()

    chunked = run()
    monkeypatch.setattr(lp_mod, "_plain_linear_head", lambda m: False)
    full = run()
    m = b.response_mask.bool()
    assert torch.allclose(chunked[0][m], full[0][m], atol=1e-5)
    assert torch.allclose(chunked[1][m], full[1][m], atol=1e-4)
    assert torch.allclose(chunked[2][m], full[2][m], atol=1e-5)
    assert torch.allclose(chunked[3], full[3], atol=1e-5)
    assert (full[0][~m] == 0).all()


def test_soft_capped_heads_take_the_fallback(policy):
    from drpo.training.logprobs import _plain_linear_head

    _, model, _ = policy
    assert _plain_linear_head(model)
    model.config.final_logit_softcapping = 30.0
    try:
        assert not _plain_linear_head(model)
    finally:
        model.config.final_logit_softcapping = None


def test_sample_categorical_draws_from_the_distribution_and_never_a_zero_probability_token():
    from drpo.rollout.engine import sample_categorical

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    draws = sample_categorical(p.expand(200_000, -1), g)
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    assert freq[p == 0].sum() == 0
    # 200k draws: the standard error of a frequency is at most 0.0011; 5 of them is the tolerance
    torch.testing.assert_close(freq, p, atol=0.006, rtol=0)
    # rows are independent and unnormalised rows are fine
    two = sample_categorical(torch.tensor([[0.0, 2.0], [3.0, 0.0]]), g)
    assert two.tolist() == [1, 0]


def _full_batch_sample(eng, prompts, params, generator):
    """The engine's sampling loop with every row's prompt run and no ended row dropped (the reference)."""
    from drpo.rollout.engine import left_pad

    ids, mask = left_pad(prompts, eng.pad_id)
    N = ids.shape[0]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = eng.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache, logits, next_pos, attn = out.past_key_values, out.logits[:, -1], pos[:, -1:] + 1, mask
    done, toks, lps = torch.zeros(N, dtype=torch.bool), [], []
    for _ in range(params.max_new_tokens):
        logp = sampling_logprobs(logits, params)
        tok = torch.where(done, eng.pad_id, sample_categorical(logp.exp(), generator))
        toks.append(tok)
        lps.append(torch.where(done, 0.0, logp.gather(-1, tok[:, None]).squeeze(-1)))
        done = done | (tok == eng.eos_id)
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones((N, 1), dtype=attn.dtype)], dim=-1)
        out = eng.model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=cache,
                        use_cache=True)
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    return torch.stack(toks, 1), torch.stack(lps, 1)


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_rows_that_ended_leave_the_batch_with_the_same_samples(policy, precision):
    """The engine runs each prompt once for its n samples and the model on the live rows only once some
    have ended (EOS), drawing the same uniforms: tokens equal those of the loop over every row (every row's
    prompt run, every row kept), log mu to float rounding."""
    tok, model, prompts = policy
    eng = _engine(model, tok, precision)
    params = SamplingParams(n=16, max_new_tokens=12)
    eos_row = model.get_output_embeddings().weight[tok.eos_token_id]
    with torch.no_grad():  # make EOS likely, so that rows end at different steps
        eos_row.mul_(3.0)
    try:
        eng.sync(model)
        got = eng.generate(prompts, params, torch.Generator().manual_seed(7))
        rows = [prompts[i] for i in got.prompt_index.tolist()]
        want_toks, want_lp = _full_batch_sample(eng, rows, SamplingParams(max_new_tokens=12),
                                                torch.Generator().manual_seed(7))
    finally:
        with torch.no_grad():
            eos_row.div_(3.0)
    ended = (got.response_mask.sum(-1) < got.response_ids.shape[1])
    assert 0 < int(ended.sum()) < len(got)  # some rows ended early, some ran on: the compaction was exercised
    assert torch.equal(got.response_ids, want_toks)
    assert torch.allclose(got.behavior_log_prob, want_lp, atol=1e-5)
