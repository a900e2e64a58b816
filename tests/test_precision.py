"""4-bit rollout weights: NVFP4 (rollout.precision=fp4) and INT4 weight-only (int4): the grids
(checked against the reference formulas of tests/quant_ref.py), zeros, error bounds, the engine's
weights, the mismatch they cause against an fp32 trainer, and the config."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpo.models.moe import experts_modules, routers
from drpo.rollout.engine import HFRolloutEngine, SamplingParams
from drpo.rollout.precision import (
    quantize_fp8_per_channel, quantize_int4_groupwise, quantize_nvfp4, quantize_weights_, round_to_e2m1)
from drpo.training.config import ConfigError, load_config
from drpo.training.logprobs import response_logprobs
from quant_ref import assert_on_int4_grid, assert_on_nvfp4_grid, nearest_e2m1, ref_int4_scales


# --- the grids ------------------------------------------------------------------------------------

def test_e2m1_rounding_is_to_nearest_with_ties_to_even():
    x = torch.linspace(-7.3, 7.3, 20001)
    mid = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    off_midpoints = ((x.abs()[:, None] - mid).abs() > 1e-4).all(-1)
    torch.testing.assert_close(round_to_e2m1(x)[off_midpoints], nearest_e2m1(x.clamp(-6, 6))[off_midpoints],
                               rtol=0, atol=0)
    # midpoints go to the value whose encoding is even (mantissa bit 0): 0, 1, 1, 2, 2, 4, 4
    ties = round_to_e2m1(torch.cat([mid, -mid]))
    assert ties.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0] + [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]


@pytest.mark.parametrize("shape", [(24, 128), (8, 384), (16, 40), (3, 12, 96)],
                         ids=["dense128", "dense384", "in40_padded", "experts"])
def test_nvfp4_values_land_on_the_grid(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 0.05  # rows of different magnitudes
    w_hat = quantize_nvfp4(w)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    assert_on_nvfp4_grid(w_hat, w)
    assert not torch.equal(w_hat, w)
    # the weight of largest |W| of each matrix lands exactly on g * 448 * 6
    flat, flat_hat = w.flatten(-2), w_hat.flatten(-2)
    i = flat.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(flat_hat.gather(-1, i), flat.gather(-1, i), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(24, 128), (8, 384), (16, 200), (16, 96), (3, 12, 32)],
                         ids=["one_group", "three_groups", "in200_padded", "row_shorter_than_group", "experts"])
def test_int4_values_land_on_the_grid(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 0.05
    w_hat = quantize_int4_groupwise(w)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    assert_on_int4_grid(w_hat, w)
    assert not torch.equal(w_hat, w)


def test_blocks_of_zeros_stay_zero_and_do_not_change_their_neighbours():
    torch.manual_seed(1)
    w = torch.randn(4, 256)
    w[1, 16:32] = 0  # one NVFP4 block
    w[2, 128:] = 0  # one INT4 group
    w[3] = 0  # a whole row
    for quantise, zero in ((quantize_nvfp4, (1, slice(16, 32))), (quantize_int4_groupwise, (2, slice(128, None)))):
        w_hat = quantise(w)
        assert torch.isfinite(w_hat).all()
        assert (w_hat[zero] == 0).all() and (w_hat[3] == 0).all()
        assert (w_hat[0] != 0).sum() > 200  # the other blocks are quantised, not zeroed
    for quantise in (quantize_nvfp4, quantize_int4_groupwise):
        assert torch.equal(quantise(torch.zeros(3, 2, 48)), torch.zeros(3, 2, 48))


def test_quantisation_error_is_within_its_bound_and_above_fp8s():
    torch.manual_seed(2)
    w = torch.randn(64, 384) * 0.02
    err = {"fp8": quantize_fp8_per_channel(w) - w, "fp4": quantize_nvfp4(w) - w, "int4": quantize_int4_groupwise(w) - w}
    # int4: round to nearest, no clamp binds: |err| <= s / 2 = group max / 14
    assert ((err["int4"].abs() - ref_int4_scales(w) / 2) <= 1e-7).all()
    # fp4: at most half the largest E2M1 gap (1, between 4 and 6) in units of g * s_ob, and e4m3 rounds
    # s_ob within 2^-4 of its exact value: |err| <= (block max / 6) * (1 + 2^-4)
    block_max = w.reshape(64, -1, 16).abs().amax(-1).repeat_interleave(16, dim=-1)
    assert ((err["fp4"].abs() - block_max / 6 * (1 + 2 ** -4)) <= 1e-7).all()
    rel = {k: (e.norm() / w.norm()).item() for k, e in err.items()}
    print({k: round(v, 4) for k, v in rel.items()})
    # measured: relative RMS error fp8 0.026, fp4 0.096, int4 0.12 (Gaussian weights)
    assert 0.05 < rel["fp4"] < 0.13 and 0.08 < rel["int4"] < 0.16
    assert rel["fp4"] > 3 * rel["fp8"] and rel["int4"] > 3 * rel["fp8"]


# --- the engine ---------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp4", "int4"])
def test_engine_weights_on_the_grid_embeddings_and_routers_bf16(moe_model_dir, tiny_model_dir, precision):
    check = assert_on_nvfp4_grid if precision == "fp4" else assert_on_int4_grid
    for path in (tiny_model_dir, moe_model_dir):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        eng = HFRolloutEngine(model, precision=precision, eos_id=1, pad_id=0).model
        ref = dict(model.named_modules())
        n_linear = 0
        for name, m in eng.named_modules():
            if isinstance(m, torch.nn.Linear) and m.weight is not eng.get_output_embeddings().weight:
                check(m.weight, ref[name].weight)
                n_linear += 1
        assert n_linear >= 8
        emb = eng.get_input_embeddings().weight
        assert torch.equal(emb, model.get_input_embeddings().weight.to(torch.bfloat16).float())
        for name, m in eng.named_modules():
            if m in experts_modules(eng):
                check(m.gate_up_proj, ref[name].gate_up_proj)
                check(m.down_proj, ref[name].down_proj)
        for r in routers(eng):
            assert torch.equal(r.weight, r.weight.to(torch.bfloat16).float())
        assert (path == moe_model_dir) == bool(experts_modules(eng))


@pytest.mark.parametrize("precision", ["fp4", "int4"])
def test_an_untied_lm_head_stays_bf16_at_4_bits(precision):
    from drpo.models.tiny import build_tiny_model, tiny_qwen3_config

    model = build_tiny_model(tiny_qwen3_config(64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                               tie_word_embeddings=False), seed=0)
    head = model.get_output_embeddings().weight.detach().clone()
    assert head.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    quantize_weights_(model, precision)
    assert torch.equal(model.get_output_embeddings().weight, head.to(torch.bfloat16).float())


PROMPTS = ["Q : Maria has 12 apples . A :", "Problem : compute 3 + 4 . Answer :", "Q : 5 - 2 ? A :"]


def _mean_abs_shift(model, tok, precision: str) -> float:
    """mean |pi - mu| over the sampled tokens: mu the engine's probability, pi the fp32 model's."""
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS] * 4
    eng = HFRolloutEngine(model, precision=precision, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    b = eng.generate(prompts, SamplingParams(n=4, max_new_tokens=10), torch.Generator().manual_seed(1))
    with torch.no_grad():
        pi = response_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)[0]
    m = b.response_mask.bool()
    return (pi.exp() - b.behavior_log_prob.exp()).abs()[m].mean().item()


def test_4bit_engines_widen_the_mismatch_beyond_fp8(vllm_model_dir, moe_model_dir):
    """On models whose Linear weights shape the logits (vllm_model_dir: initializer_range 0.3; the
    MoE), not on the sharp/policy models, whose x8-x20 embeddings make the tied head's bf16
    rounding dominate (there fp8, fp4 and int4 all measure about bf16's 1e-3)."""
    for path in (vllm_model_dir, moe_model_dir):
        tok = AutoTokenizer.from_pretrained(path)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        shift = {p: _mean_abs_shift(net, tok, p) for p in ("fp32", "fp8", "fp4", "int4")}
        print(path, {k: f"{v:.2g}" for k, v in shift.items()})
        # measured: dense fp8 0.0086, fp4 0.019, int4 0.030; MoE (probabilities near 1/V) fp8 1.7e-6,
        # fp4 6.0e-6, int4 7.0e-6; fp32 below 1e-6 in both
        assert shift["fp32"] < 0.1 * shift["fp8"]
        assert shift["fp4"] > 1.5 * shift["fp8"] and shift["int4"] > 1.5 * shift["fp8"], (path, shift)


# --- configuration --------------------------------------------------------------------------------

def test_4bit_precisions_are_accepted_and_an_unknown_one_is_a_one_line_config_error():
    for p in ("fp4", "int4"):
        assert load_config(None, [f"rollout.precision={p}"]).rollout.precision == p
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rollout.precision=nf4"])
    msg = str(err.value)
    assert msg.startswith("config error at 'rollout.precision'") and "\n" not in msg, msg
    with pytest.raises(ValueError, match="unknown rollout precision 'nf4'"):
        HFRolloutEngine(torch.nn.Linear(2, 2), precision="nf4", eos_id=0, pad_id=0)
