"""The adaptive delta: the step rule (PPO's adaptive KL, turned for delta), the per-token rule, and
the trainer's ``objective.params.delta=auto`` (logged, checkpointed, resumed)."""
from __future__ import annotations

import pytest
import torch

import drpo
from drpo.objectives.adaptive import AdaptiveDeltaConfig, adapt_delta, token_delta
from drpo.training import run_io
from drpo.training.config import ConfigError, load_config
from drpo.training.trainer import Trainer
from helpers import interrupt_at, small_config


def test_step_rule_halves_doubles_and_stays_within_bounds():
    cfg = AdaptiveDeltaConfig(target=0.01, init=1.0, low=0.25, high=4.0)
    assert adapt_delta(1.0, 0.02, cfg) == 0.5       # above 1.5 target: tighten
    assert adapt_delta(1.0, 0.005, cfg) == 2.0      # below target / 1.5: loosen
    assert adapt_delta(1.0, 0.01, cfg) == 1.0       # inside the band: keep
    assert adapt_delta(1.0, 0.0149, cfg) == 1.0 and adapt_delta(1.0, 0.0067, cfg) == 1.0
    assert adapt_delta(0.3, 1.0, cfg) == 0.25 and adapt_delta(3.0, 0.0, cfg) == 4.0
    with pytest.raises(ValueError, match="low <= init <= high"):
        AdaptiveDeltaConfig(init=20.0)


def test_per_token_rule_gives_the_bernoulli_std_boundary():
    mu = torch.tensor([0.5, 0.1, 0.01, 0.99])
    torch.testing.assert_close(token_delta(2.0, mu, "bernoulli_std"), 4.0 * torch.sqrt(mu * (1 - mu)))
    assert token_delta(2.0, mu, "none") == 2.0
    # the drpo gradient weight is w = 1 - sign(A (r - 1)) |pi - mu| / delta_t per token
    mu_t, pi_t = torch.tensor([[0.5, 0.1, 0.02]]), torch.tensor([[0.6, 0.05, 0.03]])
    lp = pi_t.log().requires_grad_()
    A = torch.tensor([1.0])
    loss, m = drpo.policy_loss("drpo", lp, mu_t.log(), A, torch.ones(1, 3), agg_mode="token-sum",
                               delta=0.5, delta_per_token="bernoulli_std")
    (g,) = torch.autograd.grad(loss, lp)
    r = pi_t / mu_t
    w = 1 - torch.sign(r - 1) * (pi_t - mu_t).abs() / (0.5 * 2 * torch.sqrt(mu_t * (1 - mu_t)))
    torch.testing.assert_close(g, -A * r * w)
    with pytest.raises(ValueError, match="unknown delta_per_token"):
        drpo.policy_loss("drpo", lp, mu_t.log(), A, torch.ones(1, 3), delta_per_token="nope")


def test_delta_auto_needs_an_objective_with_delta():
    assert load_config(None, ["objective.params.delta=auto"]).objective.adaptive_delta
    with pytest.raises(ConfigError, match="objective 'ppo' has no delta parameter"):
        load_config(None, ["objective.name=ppo", "objective.params.delta=auto"])
    with pytest.raises(ConfigError, match="low <= init <= high"):
        load_config(None, ["objective.params.delta=auto", "objective.adaptive.init=100"])


@pytest.mark.slow
def test_trainer_adapts_logs_and_resumes_delta(tiny_model_dir, tmp_path, monkeypatch):
    def cfg(out, *extra):
        return small_config(tiny_model_dir, out, "objective.params.delta=auto", "objective.adaptive.target=1e-9",
                            "objective.adaptive.low=1.0", *extra)

    Trainer(cfg(tmp_path / "full")).train()
    rows = run_io.read_metrics(tmp_path / "full" / "metrics.jsonl")
    # any divergence exceeds the tiny target: halved every step down to the floor
    assert [r["obj/delta"] for r in rows] == [12.5, 6.25, 3.125, 1.5625]
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(tmp_path / "part")).train()
    monkeypatch.undo()
    Trainer(cfg(tmp_path / "part"), resume=True).train()
    assert [r["obj/delta"] for r in run_io.read_metrics(tmp_path / "part" / "metrics.jsonl")] == \
        [12.5, 6.25, 3.125, 1.5625]


@pytest.mark.slow
def test_fixed_delta_is_logged(tiny_model_dir, tmp_path):
    tr = Trainer(load_config(None, [f"model={tiny_model_dir}", f"out={tmp_path / 'r'}", "rollout.prompts_per_step=2",
                                    "rollout.group_size=4", "train.minibatches=1", "rollout.max_new_tokens=4",
                                    "eval.every=0", "progress=false", "task.reward=helpers:number_reward"]))
    m = tr.step(0)
    tr.rollout.close()
    assert m["obj/delta"] == 12.5
