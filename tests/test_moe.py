"""The tiny Mixture-of-Experts: the engine records its expert choices, low precision flips some of
them against the trainer (rollout/router_flip_frac), and routing replay makes the trainer use them."""
from __future__ import annotations

import contextlib
import copy
import json
import types

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from drpo.models.loading import load_policy
from drpo.models.moe import EXPERTS_IMPLEMENTATION, experts_modules, given_routing, is_moe, routers
from drpo.models.tiny import build_tiny_model, tiny_qwen3_moe_config
from drpo.builtin.tokenizer import build_tokenizer
from drpo.rollout.engine import HFRolloutEngine, SamplingParams
from drpo.rollout.precision import FP8_MAX, _bf16_experts_forward, loop_bf16_experts_forward, use_bf16_compute_
from drpo.training.config import ConfigError, load_config
from drpo.training.logprobs import response_logprobs
from drpo.training.trainer import Trainer
from helpers import small_config


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


# ---------------------------------------------------------------- the experts implementation

SMALL_MOE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 moe_intermediate_size=32)
VOCAB = 300


def small_moe(seed: int = 1):
    """A random tiny MoE built from drpo's config (fp32), whose routers are sharpened (x30) so that
    the tokens of a batch spread over the experts and the gates are far from uniform."""
    model = build_tiny_model(tiny_qwen3_moe_config(VOCAB, **SMALL_MOE), seed=seed)
    with torch.no_grad():
        for r in routers(model):
            r.weight.mul_(30.0)
    return model


def random_batch(n: int, p: int, r: int, seed: int):
    """(prompt ids, prompt mask, response ids, response mask): prompts left-padded by 0..p-1 positions,
    responses right-padded after a random length (>= 1)."""
    g = torch.Generator().manual_seed(seed)
    pid, rid = torch.randint(0, VOCAB, (n, p), generator=g), torch.randint(0, VOCAB, (n, r), generator=g)
    pad = torch.randint(0, p, (n,), generator=g)
    pm = (torch.arange(p)[None] >= pad[:, None]).long()
    rlen = torch.randint(1, r + 1, (n,), generator=g)
    rm = (torch.arange(r)[None] < rlen[:, None]).long()
    return pid, pm, rid, rm


def loss_and_grads(model, batch, routing=None):
    """log pi and entropy of the response tokens, and the gradient of a loss made of both, for every
    parameter."""
    model.zero_grad(set_to_none=True)
    pid, pm, rid, rm = batch
    with given_routing(model, routing, replay=True):
        lp, ent, _ = response_logprobs(model, pid, pm, rid, rm, with_entropy=True)
    w = torch.linspace(-1.0, 2.0, lp.numel()).view_as(lp)  # not a plain sum: unequal weights per token
    ((w * lp * rm).sum() + (ent * rm).sum()).backward()
    return lp.detach(), ent.detach(), {n: p.grad for n, p in model.named_parameters()}


@contextlib.contextmanager
def count_calls(implementation: str):
    """Count the calls of transformers' experts function ``implementation`` (as the library looks it
    up: ALL_EXPERTS_FUNCTIONS, a local override of its global mapping)."""
    calls = []
    library = ALL_EXPERTS_FUNCTIONS[implementation]

    def spy(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return library(self, *args, **kwargs)
    ALL_EXPERTS_FUNCTIONS[implementation] = spy
    try:
        yield calls
    finally:
        del ALL_EXPERTS_FUNCTIONS[implementation]


def test_drpo_runs_the_library_grouped_experts():
    model = small_moe()
    assert EXPERTS_IMPLEMENTATION == "grouped_mm" and model.config._experts_implementation == "grouped_mm"
    batch = random_batch(3, 5, 4, seed=0)
    with count_calls("grouped_mm") as calls, torch.no_grad():
        response_logprobs(model, *batch)
    assert calls == [3 * 9, 3 * 9]  # one call per layer, every position of the batch
    model.set_experts_implementation("eager")
    with count_calls("grouped_mm") as calls, torch.no_grad():
        response_logprobs(model, *batch)
    assert calls == []


@pytest.mark.parametrize("n,p,r,seed", [(1, 2, 1, 0), (3, 5, 4, 1), (8, 9, 6, 2), (16, 12, 8, 3)])
def test_grouped_experts_equal_the_eager_loop_outputs_and_gradients(n, p, r, seed):
    """fp32: log-probs, entropies and the gradients of every parameter (router, experts, attention,
    embeddings) equal the eager loop's to float tolerance; padded batches, and a batch of 3 positions
    that leaves some experts without tokens (empty groups)."""
    grouped = small_moe()
    eager = copy.deepcopy(grouped)
    eager.set_experts_implementation("eager")
    assert grouped.config._experts_implementation == "grouped_mm"
    batch = random_batch(n, p, r, seed)
    lp_g, ent_g, grads_g = loss_and_grads(grouped, batch)
    lp_e, ent_e, grads_e = loss_and_grads(eager, batch)
    torch.testing.assert_close(lp_g, lp_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_g, ent_e, rtol=1e-5, atol=1e-5)
    assert grads_g.keys() == grads_e.keys()
    assert [n for n, g in grads_g.items() if g is None] == [] == [n for n, g in grads_e.items() if g is None]
    for name, g in grads_g.items():
        torch.testing.assert_close(g, grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        assert grads_g[f"model.layers.0.{name}"].abs().sum() > 0, name  # the gradients compared are not zero


def test_grouped_experts_replay_given_routing_like_the_eager_loop():
    """Routing replay with given expert sets: the same log-probs and gradients (router included,
    through the gates of the given sets) in both implementations."""
    grouped = small_moe()
    eager = copy.deepcopy(grouped)
    eager.set_experts_implementation("eager")
    batch = random_batch(6, 7, 5, seed=4)
    g = torch.Generator().manual_seed(5)
    routing = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6 * 12 * 2)]).view(6, 12, 2, 2)
    routing[0, :3] = -1  # not recorded: the model's own choice
    lp_g, _, grads_g = loss_and_grads(grouped, batch, routing)
    lp_e, _, grads_e = loss_and_grads(eager, batch, routing)
    lp_own, _, _ = loss_and_grads(grouped, batch)
    assert not torch.allclose(lp_g, lp_own)  # the given sets are not the model's own
    torch.testing.assert_close(lp_g, lp_e, rtol=1e-5, atol=1e-5)
    assert [n for n, g in grads_g.items() if g is None] == [] == [n for n, g in grads_e.items() if g is None]
    for name, gr in grads_g.items():
        torch.testing.assert_close(gr, grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_saved_and_loaded_moe_keeps_outputs_and_the_grouped_experts(tmp_path, tiny_model_dir):
    model = small_moe()
    tok = build_tokenizer()
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    # transformers does not write the choice to config.json ...
    assert "experts_implementation" not in json.loads((tmp_path / "moe" / "config.json").read_text())
    batch = random_batch(4, 6, 3, seed=6)
    with torch.no_grad():
        ref = response_logprobs(model, *batch)[0]
    _, loaded = load_policy(str(tmp_path / "moe"))  # ... drpo sets it on load
    assert loaded.config._experts_implementation == EXPERTS_IMPLEMENTATION
    with count_calls("grouped_mm") as calls, torch.no_grad():
        got = response_logprobs(loaded, *batch)[0]
    assert len(calls) == 2
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # even where a folder's config names another implementation
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    (tmp_path / "moe" / "config.json").write_text(json.dumps({**cfg, "experts_implementation": "eager"}))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "moe").config._experts_implementation == "eager"
    assert load_policy(str(tmp_path / "moe"))[1].config._experts_implementation == EXPERTS_IMPLEMENTATION
    # a dense model loads as before (it has no experts to set)
    _, dense = load_policy(tiny_model_dir)
    assert not experts_modules(dense) and not is_moe(dense)


# ---------------------------------------------------------------- the bf16-rounding experts (engine, bf16 trainer)

def assert_bf16_equal(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Both on the bf16 grid and equal, except that a different order of fp32 additions before a
    rounding may move a rare value by one bf16 step (2^-8 relative). A missing or extra rounding point
    makes most values differ."""
    assert torch.equal(got, got.to(torch.bfloat16).float())
    assert (got == ref).float().mean() >= 0.99, (got == ref).float().mean()
    torch.testing.assert_close(got, ref, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("round_weights", [False, True])
@pytest.mark.parametrize("tokens", [1, 5, 200])
def test_bf16_experts_forward_matches_the_per_expert_rounding_loop(round_weights, tokens):
    """The batched bf16-rounding experts forward gives the per-expert loop's outputs (rounding points
    included) and its straight-through gradients w.r.t. the input, the gate weights and both expert
    weights (float tolerance); expert 7 is never routed to."""
    experts = experts_modules(small_moe())[0]
    experts._drpo_round_weight = round_weights
    g = torch.Generator().manual_seed(tokens)
    h = torch.randn(tokens, 64, generator=g)
    idx = torch.stack([torch.randperm(7, generator=g)[:2] for _ in range(tokens)])
    gates = torch.softmax(torch.randn(tokens, 2, generator=g), -1)
    upstream = torch.randn(tokens, 64, generator=g)
    res = []
    for fwd in (_bf16_experts_forward, loop_bf16_experts_forward):
        experts.zero_grad(set_to_none=True)
        hh, gg = h.clone().requires_grad_(), gates.clone().requires_grad_()
        out = fwd(experts, hh, idx, gg)
        (out * upstream).sum().backward()
        res.append((out.detach(), hh.grad, gg.grad, experts.gate_up_proj.grad, experts.down_proj.grad))
    (out, *grads), (ref_out, *ref_grads) = res
    assert_bf16_equal(out, ref_out)
    for name, a, b in zip(("hidden", "gates", "gate_up_proj", "down_proj"), grads, ref_grads):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert experts.gate_up_proj.grad[7].abs().sum() == 0  # the expert no token chose gets no gradient


def test_fp8_engine_and_bf16_trainer_equal_the_per_expert_rounding_loop():
    """Whole models: the FP8 engine samples the same tokens, routing and log-probs mu with the batched
    experts as with the loop; the simulated bf16 trainer gets the same log-probs and gradients."""
    model = small_moe()
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14]]
    batches = []
    for loop in (False, True):
        eng = HFRolloutEngine(model, precision="fp8", eos_id=1, pad_id=0)
        if loop:
            for m in experts_modules(eng.model):
                m.forward = types.MethodType(loop_bf16_experts_forward, m)
        batches.append(eng.generate(prompts, SamplingParams(max_new_tokens=8, n=4), torch.Generator().manual_seed(0)))
    new, ref = batches
    assert torch.equal(new.response_ids, ref.response_ids) and torch.equal(new.routing, ref.routing)
    torch.testing.assert_close(new.behavior_log_prob, ref.behavior_log_prob, rtol=1e-5, atol=1e-5)

    trainers = [copy.deepcopy(model) for _ in range(2)]
    for t in trainers:
        use_bf16_compute_(t, round_weights=True)
    for m in experts_modules(trainers[1]):
        m.forward = types.MethodType(loop_bf16_experts_forward, m)
    batch = random_batch(6, 7, 5, seed=7)
    (lp, ent, grads), (lp_ref, ent_ref, grads_ref) = [loss_and_grads(t, batch) for t in trainers]
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
