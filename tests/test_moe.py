"""The tiny Mixture-of-Experts: the engine records its expert choices, low precision flips some of
them against the trainer (rollout/router_flip_frac), and routing replay makes the trainer use them."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpo.models.moe import experts_modules, given_routing, is_moe, routers
from drpo.rollout.engine import HFRolloutEngine, SamplingParams
from drpo.rollout.precision import FP8_MAX
from drpo.training.config import ConfigError, load_config
from helpers import small_config
from drpo.training.logprobs import response_logprobs
from drpo.training.trainer import Trainer


@pytest.fixture(scope="module")
def moe(moe_model_dir):
    tok = AutoTokenizer.from_pretrained(moe_model_dir)
    model = AutoModelForCausalLM.from_pretrained(moe_model_dir, dtype=torch.float32)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in
               ["Q : Maria has 12 apples . A :", "Problem : compute 3 + 4 . Answer :", "Q : 5 - 2 ? A :"]]
    return tok, model, prompts


def generate(model, tok, prompts, precision, n=4, seed=0):
    eng = HFRolloutEngine(model, precision=precision, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_batch=5)
    return eng.generate(prompts, SamplingParams(max_new_tokens=6, n=n), torch.Generator().manual_seed(seed))


def forward(model, batch, replay: bool, routing=None):
    with given_routing(model, batch.routing if routing is None else routing, replay=replay) as stats, torch.no_grad():
        lp, _, _ = response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                     batch.response_mask)
    return lp, stats


def test_the_engine_records_routing_for_every_real_position(moe):
    tok, model, prompts = moe
    assert is_moe(model) and len(routers(model)) == 2
    b = generate(model, tok, prompts, "fp32")  # max_batch=5 < 12 rows: chunks are concatenated
    N, P, R = len(b), b.prompt_ids.shape[1], b.response_ids.shape[1]
    assert b.routing.shape == (N, P + R, 2, 2)
    real = torch.cat([b.prompt_mask, b.response_mask], 1).bool()
    assert ((b.routing >= 0) == real[:, :, None, None]).logical_or(~real[:, :, None, None]).all()
    assert (b.routing[~real] == -1).all()
    assert (b.routing[real][..., 0] != b.routing[real][..., 1]).all()  # two distinct experts


def test_fp32_engine_routes_like_the_trainer_fp8_flips_some_decisions(moe):
    tok, model, prompts = moe
    lp32, s32 = forward(model, generate(model, tok, prompts, "fp32"), replay=False)
    assert s32.decisions > 300 and s32.flips == 0
    b8 = generate(model, tok, prompts, "fp8")
    _, s8 = forward(model, b8, replay=False)
    # measured 2-7% flips with this model; bf16 rounding alone cannot make 0 or 100%
    assert 0.005 < s8.flip_frac < 0.3, s8.flip_frac


def test_replay_makes_the_experts_use_the_given_choices(moe):
    tok, model, prompts = moe
    b = generate(model, tok, prompts, "fp32")
    forced = b.routing.clone()
    real = forced >= 0
    forced[real] = torch.tensor([6, 7]).expand_as(forced)[real]  # route every real position to experts 6, 7
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone())) for m in experts_modules(model)]
    try:
        lp_forced, stats = forward(model, b, replay=True, routing=forced)
    finally:
        for h in hooks:
            h.remove()
    valid = real.all(-1)  # (N, T, L)
    for layer, idx in enumerate(seen):
        chosen = idx.reshape(len(b), -1, 2)[valid[:, :, layer]]
        assert (chosen.sort(-1).values == torch.tensor([6, 7])).all()
    assert stats.flips > 0  # the model's own choices were other experts for most positions
    lp_own, _ = forward(model, b, replay=True)  # replaying its own choices changes nothing
    lp_plain, _ = forward(model, b, replay=False)
    torch.testing.assert_close(lp_own, lp_plain)
    assert not torch.allclose(lp_forced, lp_plain)


def test_low_precision_quantises_experts_and_keeps_the_router_in_bf16(moe):
    tok, model, prompts = moe
    eng = HFRolloutEngine(model, precision="fp8", eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    for m in experts_modules(eng.model):
        w = m.gate_up_proj.detach()
        scale = w.abs().amax(-1, keepdim=True) / FP8_MAX
        q = w / scale
        torch.testing.assert_close(q, q.to(torch.float8_e4m3fn).float(), rtol=0, atol=1e-4)
    for r in routers(eng.model):
        torch.testing.assert_close(r.weight, r.weight.to(torch.bfloat16).float(), rtol=0, atol=0)
    ref = dict(model.named_parameters())
    assert any(not torch.equal(p, ref[n]) for n, p in eng.model.named_parameters() if "experts" in n)


@pytest.mark.slow
def test_trainer_logs_router_flips_and_replays(moe_model_dir, tmp_path):
    got = {}
    for replay in (False, True):
        tr = Trainer(small_config(moe_model_dir, tmp_path / str(replay), "train.steps=1", "save_every=0",
                                  "train.lr=1e-4", "rollout.precision=fp8", f"train.routing_replay={replay}"))
        got[replay] = tr.step(0)
        tr.rollout.close()
    assert got[False]["rollout/router_flip_frac"] > 0
    # the same batch (same seed, same engine): replaying the engine's experts brings pi closer to mu
    assert got[True]["reward/mean"] == got[False]["reward/mean"]
    assert got[True]["mismatch/kl_k3"] < got[False]["mismatch/kl_k3"]


def test_routing_replay_needs_an_moe_model_and_the_hf_engine(tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"model={tiny_model_dir}", f"out={tmp_path / 'r'}", "train.routing_replay=true"])
    with pytest.raises(ValueError, match="needs a Mixture-of-Experts model"):
        Trainer(cfg)
    with pytest.raises(ConfigError, match="only rollout.engine=hf records"):
        load_config(None, ["train.routing_replay=true", "rollout.engine=vllm"])
