"""Every objective's gradient pinned against its analytic per-token formula, plus the geometry
claims (DRPO boundary, DPPO mask direction, PPO clip region) and the input checks."""
from __future__ import annotations

import math

import pytest
import torch

import drpo
from drpo.objectives import get_objective, policy_loss

torch.set_default_dtype(torch.float32)


def make_batch(seed: int = 0, B: int = 6, T: int = 9, spread: float = 0.6):
    """Log-probs with mu spread over (1e-4, 1) and pi a perturbation of it; both signs of A."""
    g = torch.Generator().manual_seed(seed)
    blp = torch.empty(B, T).uniform_(math.log(1e-4), 0.0, generator=g)
    lp = (blp + spread * torch.randn(B, T, generator=g)).clamp(max=-1e-4)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    return lp, blp, adv, mask


def token_grad(name, lp, blp, adv, mask, **params):
    """d(sum of per-token losses)/d log pi, via token-sum aggregation."""
    leaf = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(name, leaf, blp, adv, mask, agg_mode="token-sum", compute_metrics=False, **params)
    loss.backward()
    return leaf.grad


def analytic(name: str, lp, blp, adv, mask, **p):
    """Hand-written dL/dlog pi per token (L = -J), for each objective."""
    A = adv[:, None].expand_as(lp)
    r = torch.exp(lp - blp)
    pi, mu = lp.exp(), blp.exp()
    if name == "pg_is":
        g = -A * r
    elif name == "ppo":
        lo, hi = p.get("clip_low", 0.2), p.get("clip_high", 0.2)
        clipped = ((A > 0) & (r > 1 + hi)) | ((A < 0) & (r < 1 - lo))
        g = torch.where(clipped, 0.0, -A * r)
        if p.get("clip_c") is not None:
            g = torch.where((A < 0) & (r > p["clip_c"]), 0.0, g)
    elif name == "cispo":
        g = -A * torch.clamp(r, max=1 + p.get("clip_high", 4.0))
    elif name == "spo":
        eps = p.get("epsilon", 12.5)
        g = -r * (A - A.abs() * (r - 1) / eps)
    elif name == "drpo":
        d = p.get("delta", 12.5)
        g = -r * (A - A.abs() * (pi - mu) / d)
    elif name == "drpo_kl":
        d = p.get("delta", 12.5)
        eps = 1e-8  # the epsilon of verl's binary KL, kept so the formula is exact
        dkl = pi * (-mu / (pi + eps) + (1 - mu) / (1 - pi + eps))  # = (pi - mu) / (1 - pi) as eps -> 0
        g = -(r * A - A.abs() * dkl / d)
    elif name == "drpo_k3":
        d = p.get("delta", 12.5)
        g = -(r * A - A.abs() * mu * (r - 1) / d)
    elif name == "drpo_no_adv":
        d = p.get("delta", 12.5)
        g = -r * (A - p.get("penalty_coef", 1.0) * (pi - mu) / d)
    elif name == "mask_drpo":
        d = p.get("delta", 0.15)
        out = ((A > 0) & (pi - mu > d)) | ((A < 0) & (pi - mu < -d))
        g = -r * (A - out.float() * A.abs() * (pi - mu) / d)
    elif name == "dppo_tv":
        d = p.get("delta", 0.15)
        masked = ((A > 0) & (pi - mu > d)) | ((A < 0) & (mu - pi > d))
        g = torch.where(masked, 0.0, -A * r)
    elif name == "dppo_kl":
        d = p.get("delta", 0.05)
        kl = mu * (torch.log(mu) - torch.log(pi)) + (1 - mu) * torch.log((1 - mu) / (1 - pi))
        masked = (kl > d) & (((A > 0) & (pi > mu)) | ((A < 0) & (pi < mu)))
        g = torch.where(masked, 0.0, -A * r)
    elif name == "gspo":
        m = mask
        s = torch.exp(((lp - blp) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True))
        s = s.expand_as(lp)
        lo, hi = p.get("clip_low", 3e-4), p.get("clip_high", 4e-4)
        clipped = ((A > 0) & (s > 1 + hi)) | ((A < 0) & (s < 1 - lo))
        g = torch.where(clipped, 0.0, -A * s)
    else:
        raise KeyError(name)
    return torch.where(mask.bool(), g, 0.0)


GRAD_CASES = [
    ("pg_is", {}),
    ("ppo", {}),
    ("ppo", {"clip_low": 0.1, "clip_high": 0.28, "clip_c": 3.0}),
    ("cispo", {}),
    ("cispo", {"clip_high": 0.5}),
    ("spo", {}),
    ("spo", {"epsilon": 0.2}),
    ("drpo", {}),
    ("drpo", {"delta": 0.15}),
    ("drpo_kl", {"delta": 0.5}),
    ("drpo_k3", {"delta": 0.5}),
    ("drpo_no_adv", {"delta": 0.5, "penalty_coef": 0.7}),
    ("mask_drpo", {}),
    ("dppo_tv", {}),
    ("dppo_tv", {"delta": 0.05}),
    ("dppo_kl", {}),
    ("gspo", {}),
    ("gspo", {"clip_low": 0.2, "clip_high": 0.2}),
]


@pytest.mark.parametrize("name,params", GRAD_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_matches_analytic_weight(name, params, seed):
    lp, blp, adv, mask = make_batch(seed, spread=0.3 if name == "gspo" else 0.6)
    got = token_grad(name, lp, blp, adv, mask, **params)
    want = analytic(name, lp, blp, adv, mask, **params)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_every_registered_objective_has_a_pinned_gradient():
    pinned = {n for n, _ in GRAD_CASES} | {"grpo", "dapo", "dppo", "drpo_small_delta",
                                            "dppo_topk_tv", "dppo_topk_kl"}
    assert set(drpo.list_objectives()) <= pinned


def test_presets_equal_their_base():
    lp, blp, adv, mask = make_batch(3)
    for preset, base, p in [("grpo", "ppo", {}), ("dapo", "ppo", {"clip_high": 0.28}),
                            ("dppo", "dppo_tv", {}), ("drpo_small_delta", "drpo", {"delta": 0.15})]:
        torch.testing.assert_close(token_grad(preset, lp, blp, adv, mask), token_grad(base, lp, blp, adv, mask, **p))


# --- DRPO geometry ---------------------------------------------------------------------------

def _single(pi: float, mu: float, A: float):
    lp = torch.tensor([[math.log(pi)]])
    blp = torch.tensor([[math.log(mu)]])
    return lp, blp, torch.tensor([A]), torch.ones(1, 1)


@pytest.mark.parametrize("A", [1.0, -1.0])
@pytest.mark.parametrize("mu", [0.3, 0.5])
def test_drpo_small_delta_zero_gradient_at_binary_tv_boundary(A, mu):
    delta = 0.15
    at = mu + math.copysign(delta, A)
    g = token_grad("drpo", *_single(at, mu, A), delta=delta)
    assert abs(float(g)) < 1e-5
    inside = token_grad("drpo", *_single(mu + math.copysign(delta / 2, A), mu, A), delta=delta)
    beyond = token_grad("drpo", *_single(mu + math.copysign(1.5 * delta, A), mu, A), delta=delta)
    # the loss gradient -A r w: inside w > 0 (pushes as PG does), beyond w < 0 (corrective)
    assert float(inside) * (-A) > 0
    assert float(beyond) * (-A) < 0


def test_drpo_weight_is_one_at_pi_equal_mu_and_bounded():
    lp, blp, adv, mask = make_batch(4, spread=3.0)
    for delta in (0.15, 2.5, 12.5):
        _, m = policy_loss("drpo", lp, blp, adv, mask, delta=delta)
        assert 1 - 1 / delta - 1e-5 <= m["weight_min"]
        assert m["weight_mean"] <= 1 + 1 / delta + 1e-5
    _, m = policy_loss("drpo", blp.clone(), blp, adv, mask, delta=0.15)
    assert m["weight_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["weight_min"] == pytest.approx(1.0, abs=1e-6)


def test_drpo_large_delta_never_reaches_boundary():
    lp, blp, adv, mask = make_batch(5, spread=5.0)
    _, m = policy_loss("drpo", lp, blp, adv, mask, delta=12.5)
    assert m["neg_weight_frac"] == 0.0


def test_drpo_without_mu_factor_equals_spo():
    lp, blp, adv, mask = make_batch(6)
    for d in (0.2, 12.5):
        l1, _ = policy_loss("drpo", lp, blp, adv, mask, delta=d, ratio_penalty=True)
        l2, _ = policy_loss("spo", lp, blp, adv, mask, epsilon=d)
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(token_grad("drpo", lp, blp, adv, mask, delta=d, ratio_penalty=True),
                                   token_grad("spo", lp, blp, adv, mask, epsilon=d))


def test_drpo_loss_value_formula():
    lp, blp, adv, mask = make_batch(7)
    loss, _ = policy_loss("drpo", lp, blp, adv, mask, agg_mode="token-sum", delta=0.5)
    A = adv[:, None].expand_as(lp)
    r, mu = torch.exp(lp - blp), blp.exp()
    J = r * A - A.abs() * mu * (r - 1) ** 2 / (2 * 0.5)
    # the same as r A - |A| (pi - mu)^2 / (2 delta mu)
    J2 = r * A - A.abs() * (lp.exp() - mu) ** 2 / (2 * 0.5 * mu)
    torch.testing.assert_close(J, J2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, -(J * mask).sum())


# --- DPPO mask direction -----------------------------------------------------------------------

@pytest.mark.parametrize("A", [1.0, -1.0])
def test_dppo_masks_only_the_diverging_side(A):
    mu, d = 0.4, 0.15
    harmful = mu + math.copysign(0.3, A)   # moved 0.3 in the direction A pushes
    back = mu - math.copysign(0.3, A)      # moved 0.3 against it: back toward mu is allowed
    assert float(token_grad("dppo_tv", *_single(harmful, mu, A), delta=d)) == 0.0
    g_back = float(token_grad("dppo_tv", *_single(back, mu, A), delta=d))
    assert g_back == pytest.approx(-A * back / mu, rel=1e-5)
    inside = mu + math.copysign(0.1, A)
    assert float(token_grad("dppo_tv", *_single(inside, mu, A), delta=d)) == pytest.approx(-A * inside / mu, rel=1e-5)


def test_dppo_clip_c_caps_the_ratio():
    g = token_grad("dppo_tv", *_single(0.05, 0.001, 1.0), delta=0.15, clip_c=3.0)
    assert float(g) == pytest.approx(-3.0, rel=1e-5)


def test_dppo_topk_tv_and_kl():
    # one token position; engine top-2 = ids (0, 1); sampled id 2 is outside the top-K.
    mu_k = torch.tensor([[[0.6, 0.3]]])
    pi_k = torch.tensor([[[0.3, 0.3]]])
    mu_s, pi_s, A = 0.05, 0.2, 1.0
    kw = dict(topk_log_prob=pi_k.log(), behavior_topk_log_prob=mu_k.log(),
              topk_ids=torch.tensor([[[0, 1]]]), sampled_ids=torch.tensor([[2]]))
    lp, blp, adv, mask = _single(pi_s, mu_s, A)
    # TV = 0.5 (|0.3-0.6| + 0 + |0.2-0.05| + |rest 0.2 - 0.05|) = 0.3
    assert float(token_grad("dppo", lp, blp, adv, mask, divergence="topk_tv", delta=0.29, **kw)) == 0.0
    assert float(token_grad("dppo", lp, blp, adv, mask, divergence="topk_tv", delta=0.31, **kw)) == pytest.approx(-pi_s / mu_s, rel=1e-5)
    kl = 0.6 * math.log(0.6 / 0.3) + 0.05 * math.log(0.05 / 0.2) + 0.05 * math.log(0.05 / 0.2)
    assert float(token_grad("dppo", lp, blp, adv, mask, divergence="topk_kl", delta=kl - 1e-3, **kw)) == 0.0
    assert float(token_grad("dppo", lp, blp, adv, mask, divergence="topk_kl", delta=kl + 1e-3, **kw)) != 0.0
    with pytest.raises(ValueError, match="extra inputs"):
        policy_loss("dppo", lp, blp, adv, mask, divergence="topk_tv")


# --- PPO clip region -----------------------------------------------------------------------------

@pytest.mark.parametrize("A,r,clipped", [
    (1.0, 1.19, False), (1.0, 1.21, True), (1.0, 0.5, False),
    (-1.0, 0.81, False), (-1.0, 0.79, True), (-1.0, 1.5, False),
])
def test_ppo_clips_where_the_paper_says(A, r, clipped):
    mu = 0.2
    g = float(token_grad("ppo", *_single(mu * r, mu, A)))
    assert (g == 0.0) == clipped


def test_ppo_dual_clip_and_clip_higher():
    assert float(token_grad("ppo", *_single(0.2 * 5, 0.2, -1.0), clip_c=3.0)) == 0.0
    assert float(token_grad("ppo", *_single(0.2 * 2.5, 0.2, -1.0), clip_c=3.0)) != 0.0
    assert float(token_grad("dapo", *_single(0.2 * 1.25, 0.2, 1.0))) != 0.0
    assert float(token_grad("grpo", *_single(0.2 * 1.25, 0.2, 1.0))) == 0.0


# --- aggregation -------------------------------------------------------------------------------

def _hand_agg(L, M, mode, horizon=None):
    rows = []
    for i in range(L.shape[0]):
        n = int(M[i].sum())
        if n == 0:
            continue
        s = float((L[i] * M[i]).sum())
        rows.append((s, n))
    if mode == "token-mean":
        return sum(s for s, _ in rows) / sum(n for _, n in rows)
    if mode == "token-sum":
        return sum(s for s, _ in rows)
    if mode == "seq-mean-token-sum":
        return sum(s for s, _ in rows) / len(rows)
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in rows) / len(rows)
    if mode == "seq-mean-token-sum-norm":
        return sum(s for s, _ in rows) / len(rows) / (horizon or L.shape[1])
    raise KeyError(mode)


@pytest.mark.parametrize("mode", drpo.objectives.AGG_MODES)
def test_aggregation_matches_hand_computation(mode):
    lp, blp, adv, mask = make_batch(8)
    mask[5] = 0  # an empty sequence is excluded from the sequence count
    loss, _ = policy_loss("pg_is", lp, blp, adv, mask, agg_mode=mode, horizon=12 if "norm" in mode else None)
    L = -adv[:, None] * torch.exp(lp - blp)
    assert float(loss) == pytest.approx(_hand_agg(L, mask, mode, 12 if "norm" in mode else None), rel=1e-5)


@pytest.mark.parametrize("mode", drpo.objectives.AGG_MODES)
@pytest.mark.parametrize("name", ["drpo", "ppo", "dppo_tv"])
def test_microbatch_accumulation_equals_full_batch(mode, name):
    lp, blp, adv, mask = make_batch(9, B=8)
    full = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(name, full, blp, adv, mask, agg_mode=mode, compute_metrics=False)
    loss.backward()
    acc = lp.clone().requires_grad_(True)
    n_tok, n_seq = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    total = 0.0
    for idx in (slice(0, 3), slice(3, 5), slice(5, 8)):
        part, _ = policy_loss(name, acc[idx], blp[idx], adv[idx], mask[idx], agg_mode=mode,
                              global_token_count=n_tok, global_seq_count=n_seq, compute_metrics=False)
        part.backward()
        total += float(part.detach())
    assert total == pytest.approx(float(loss.detach()), rel=1e-5)
    torch.testing.assert_close(acc.grad, full.grad, rtol=1e-5, atol=1e-7)


# --- numerics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pg_is", "ppo", "cispo", "gspo", "spo", "dppo_tv", "dppo_kl", "drpo",
                                  "drpo_small_delta", "drpo_kl", "drpo_k3", "mask_drpo", "drpo_no_adv"])
def test_masked_garbage_changes_nothing(name):
    lp, blp, adv, mask = make_batch(10)
    clean = token_grad(name, lp, blp, adv, mask)
    loss_clean, _ = policy_loss(name, lp, blp, adv, mask)
    lp2, blp2 = lp.clone(), blp.clone()
    adv2 = adv[:, None].expand_as(lp).clone()
    off = mask == 0
    lp2[off] = float("nan")
    blp2[off] = float("inf")
    adv2[off] = float("-inf")
    dirty = token_grad(name, lp2, blp2, adv2, mask)
    loss_dirty, _ = policy_loss(name, lp2, blp2, adv2, mask)
    assert torch.equal(clean, dirty)
    assert torch.equal(loss_clean, loss_dirty)
    assert torch.all(dirty[off] == 0)


def test_bf16_inputs_computed_in_float32_and_grad_dtype_kept():
    lp, blp, adv, mask = make_batch(11)
    leaf = lp.to(torch.bfloat16).requires_grad_(True)
    loss, metrics = policy_loss("drpo", leaf, blp.to(torch.bfloat16), adv.to(torch.bfloat16), mask)
    assert loss.dtype == torch.float32
    loss.backward()
    assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad).all()
    ref, _ = policy_loss("drpo", leaf.detach().float(), blp.to(torch.bfloat16).float(), adv.to(torch.bfloat16).float(), mask)
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-6)


def test_metrics_content_and_buckets():
    lp, blp, adv, mask = make_batch(12)
    _, m = policy_loss("dppo_tv", lp, blp, adv, mask)
    for key in ("ratio_mean", "ratio_max", "kl_k3", "abs_shift_mean", "abs_shift_max", "beyond_pos_frac",
                "beyond_neg_frac", "inactive_frac", "neg_weight_frac", "weight_mean", "loss"):
        assert key in m and math.isfinite(m[key])
    fr = sum(m[f"{b}/token_frac"] for b in ("mu<0.01", "mu<0.1", "mu<0.5", "mu>=0.5"))
    assert fr == pytest.approx(1.0)
    pi, mu = lp.exp(), blp.exp()
    sel = mask.bool()
    assert m["abs_shift_max"] == pytest.approx(float((pi - mu).abs()[sel].max()), rel=1e-5)
    assert m["beyond_pos_frac"] == pytest.approx(float(((pi - mu) > 0.15)[sel].float().mean()), rel=1e-5)
    # for DPPO the switched-off tokens are exactly those with zero weight
    g = token_grad("dppo_tv", lp, blp, adv, mask)
    assert m["inactive_frac"] == pytest.approx(float((g[sel] == 0).float().mean()), rel=1e-5)


# --- rollout correction ---------------------------------------------------------------------------

def test_rollout_correction_token_tis_and_icepop():
    lp, blp_old, adv, mask = make_batch(13)
    g = torch.Generator().manual_seed(1)
    rollout = (blp_old + 0.5 * torch.randn(blp_old.shape, generator=g)).clamp(max=0.0)
    rho = torch.exp(blp_old - rollout)
    base = token_grad("ppo", lp, blp_old, adv, mask)

    def rc_grad(rc):
        leaf = lp.clone().requires_grad_(True)
        loss, m = policy_loss("ppo", leaf, blp_old, adv, mask, agg_mode="token-sum",
                              rollout_log_prob=rollout, rollout_correction=rc)
        loss.backward()
        return leaf.grad, m

    got, m = rc_grad(drpo.RolloutCorrection.tis(upper=2.0))
    torch.testing.assert_close(got, base * torch.clamp(rho, max=2.0) * mask, rtol=1e-4, atol=1e-6)
    assert m["rollout_corr/truncated_frac"] > 0
    got, m = rc_grad(drpo.RolloutCorrection.icepop(0.5, 2.0))
    keep = ((rho >= 0.5) & (rho <= 2.0)).float()
    torch.testing.assert_close(got, base * keep * mask, rtol=1e-4, atol=1e-6)
    assert m["rollout_corr/masked_frac"] > 0
    got, _ = rc_grad(drpo.RolloutCorrection.tis(upper=1e9, level="sequence"))
    seq_rho = torch.exp(((blp_old - rollout) * mask).sum(-1, keepdim=True))
    torch.testing.assert_close(got, base * seq_rho * mask, rtol=1e-4, atol=1e-6)


# --- errors -------------------------------------------------------------------------------------

def test_errors_are_named():
    lp, blp, adv, mask = make_batch(14)
    with pytest.raises(ValueError, match="unknown objective 'nope'.*drpo"):
        policy_loss("nope", lp, blp, adv, mask)
    with pytest.raises(ValueError, match="behavior_log_prob has shape"):
        policy_loss("drpo", lp, blp[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss("drpo", lp, blp, adv[:2], mask)
    with pytest.raises(ValueError, match="all zero"):
        policy_loss("drpo", lp, blp, adv, torch.zeros_like(mask))
    bad = lp.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="log_prob has NaN or inf at an unmasked position"):
        policy_loss("drpo", bad, blp, adv, mask)
    badA = adv.clone()
    badA[2] = float("inf")
    with pytest.raises(ValueError, match="advantages has NaN or inf"):
        policy_loss("drpo", lp, blp, badA, mask)
    with pytest.raises(ValueError, match="pass log-probabilities"):
        policy_loss("drpo", lp.exp() + 0.5, blp, adv, mask)
    with pytest.raises(ValueError, match="delta must be > 0"):
        policy_loss("drpo", lp, blp, adv, mask, delta=0.0)
    with pytest.raises(ValueError, match="clip_low must be in"):
        policy_loss("ppo", lp, blp, adv, mask, clip_low=1.5)
    with pytest.raises(ValueError, match="unknown divergence 'foo'.*binary_tv"):
        policy_loss("dppo", lp, blp, adv, mask, divergence="foo")
    with pytest.raises(ValueError, match="unknown divergence 'foo'.*binary_kl"):
        policy_loss("drpo", lp, blp, adv, mask, divergence="foo")
    with pytest.raises(ValueError, match="unknown parameter.*'dleta'.*delta"):
        policy_loss("drpo", lp, blp, adv, mask, dleta=1.0)
    with pytest.raises(ValueError, match="unknown agg_mode"):
        policy_loss("drpo", lp, blp, adv, mask, agg_mode="mean")
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        policy_loss("spo", lp, blp, adv, mask, epsilon=-1.0)
    with pytest.raises(ValueError, match="given together"):
        policy_loss("drpo", lp, blp, adv, mask, rollout_log_prob=blp)
    with pytest.raises(ValueError, match="unknown level"):
        drpo.RolloutCorrection(level="word")


def test_user_registered_objective():
    from drpo.objectives import ObjectiveOutput

    @drpo.register_objective("test_scaled_pg")
    def scaled(x, *, scale: float = 2.0):
        return ObjectiveOutput(loss=-scale * x.advantages * x.ratio)

    assert "test_scaled_pg" in drpo.list_objectives()
    lp, blp, adv, mask = make_batch(15)
    torch.testing.assert_close(token_grad("test_scaled_pg", lp, blp, adv, mask, scale=3.0),
                               3.0 * token_grad("pg_is", lp, blp, adv, mask))
    with pytest.raises(ValueError, match="already registered"):
        drpo.register_objective("drpo")(scaled)
    assert get_objective("test_scaled_pg").param_defaults == {"scale": 2.0}


def test_token_weights_multiply_the_per_token_loss():
    lp, blp, adv, mask = make_batch(16)
    w = torch.rand(lp.shape, generator=torch.Generator().manual_seed(0)) * 2
    leaf = lp.clone().requires_grad_(True)
    loss, m = policy_loss("drpo", leaf, blp, adv, mask, agg_mode="token-sum", token_weights=w, delta=0.5)
    loss.backward()
    torch.testing.assert_close(leaf.grad, token_grad("drpo", lp, blp, adv, mask, delta=0.5) * w * mask)
    with pytest.raises(ValueError, match="token_weights has shape"):
        policy_loss("drpo", lp, blp, adv, mask, token_weights=w[:, :2])
