"""drpo inside verl: plug-in loading, config path, aggregation, and cross-checks with verl's losses.

Everything goes through verl's own code: ``get_policy_loss_fn`` (its registry), ``ActorConfig``
(built by hydra from verl's ``ppo_trainer.yaml`` with the documented overrides) and, for the
rollout anchor, ``verl.workers.utils.losses.ppo_loss`` (the function verl's workers call).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl")
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import drpo  # noqa: E402
from drpo.integrations.verl import (  # noqa: E402
    BASELINES, OWN_METHODS, DRPOPolicyLossConfig, register, verl_loss_name,
)
from drpo.integrations import doctor  # noqa: E402
from drpo.integrations.doctor import compose_verl_config  # noqa: E402
from drpo.objectives import AGG_MODES  # noqa: E402
from test_doctor import documented_overrides  # noqa: E402

# The documented rollout-anchored overrides (docs/integrations.md) plus the micro-batch size verl's
# ActorConfig requires.
DRPO_OVERRIDES = documented_overrides("rollout-anchored") + ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]


def actor_config(params: dict | None = None, **kw) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                       policy_loss=DRPOPolicyLossConfig(drpo_params=params or {}), **kw)


def batch(seed: int, B: int = 8, T: int = 12) -> dict[str, torch.Tensor]:
    """Random verl-shaped inputs: ratios inside and far outside every trust region."""
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(B, T, generator=g).clamp(min=1e-3))
    log_prob = (old + 0.6 * torch.randn(B, T, generator=g)).clamp(max=-1e-4)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[-1] = 0  # a fully masked row, as verl's padding can produce
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, 1, generator=g).expand(B, T).clone()
    return {"old": old, "log_prob": log_prob, "adv": adv, "mask": mask}


def run_loss(fn, x: dict, config, agg: str, weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    lp = x["log_prob"].clone().requires_grad_(True)
    loss, _ = fn(old_log_prob=x["old"], log_prob=lp, advantages=x["adv"], response_mask=x["mask"],
                 loss_agg_mode=agg, config=config, rollout_is_weights=weights)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def record(pair: str, loss_err: float, grad_err: float) -> None:
    print(f"XCHECK {pair} loss_err={loss_err:.3e} grad_err={grad_err:.3e}")


@pytest.mark.slow
def test_entry_point_registers_at_import_of_verl():
    code = ("import verl; from verl.trainer.ppo.core_algos import get_policy_loss_fn; "
            "print(get_policy_loss_fn('drpo').drpo_objective)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("drpo")


def test_names_do_not_shadow_verl():
    names = register()
    assert register() == names  # idempotent
    for verl_own in ("vanilla", "cispo", "gspo", "dppo_tv", "dppo_kl"):
        assert not hasattr(get_policy_loss_fn(verl_own), "drpo_objective")
    assert verl_loss_name("dppo_tv") == "drpo_dppo_tv" and verl_loss_name("drpo") == "drpo"
    assert set(names) == {verl_loss_name(o) for o in OWN_METHODS + BASELINES}


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("objective", OWN_METHODS + BASELINES)
def test_registered_loss_equals_policy_loss(objective, agg):
    x = batch(0)
    fn = get_policy_loss_fn(verl_loss_name(objective))
    loss, grad = run_loss(fn, x, actor_config(), agg)
    lp = x["log_prob"].clone().requires_grad_(True)
    ref, _ = drpo.policy_loss(objective, lp, x["old"], x["adv"], x["mask"], agg_mode=agg)
    (ref_grad,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("objective", ["drpo", "spo", "ppo", "dppo_tv"])
def test_data_parallel_micro_batches_equal_full_batch(objective, agg):
    """dp=2 ranks x 2 micro-batches with verl's global_batch_info: the DDP-averaged sum of the
    micro-batch gradients equals the gradient of the full-batch loss."""
    x = batch(1, B=8)
    fn = get_policy_loss_fn(verl_loss_name(objective))
    dp, T = 2, x["mask"].shape[1]
    info = {"dp_size": dp, "batch_num_tokens": int(x["mask"].sum()), "global_batch_size": 8,
            "loss_scale_factor": None}
    grad = torch.zeros_like(x["log_prob"])
    for rank in range(dp):
        for micro in range(2):
            rows = slice(4 * rank + 2 * micro, 4 * rank + 2 * micro + 2)
            part = {k: v[rows] for k, v in x.items()}
            if not part["mask"].any():
                continue
            cfg = actor_config()
            cfg.global_batch_info.update(info)
            _, g = run_loss(fn, part, cfg, agg)
            grad[rows] += g / dp  # DDP averages gradients over ranks
    # verl's global_batch_size counts all sequences; our full-batch reference uses the same count
    lp = x["log_prob"].clone().requires_grad_(True)
    ref, _ = drpo.policy_loss(objective, lp, x["old"], x["adv"], x["mask"], agg_mode=agg,
                              global_seq_count=8, horizon=T)
    (ref_grad,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)


def test_missing_global_counts_with_dp_is_an_error():
    cfg = actor_config()
    cfg.global_batch_info.update({"dp_size": 2})
    with pytest.raises(ValueError, match="global batch"):
        run_loss(get_policy_loss_fn("drpo"), batch(0), cfg, "token-mean")


def test_objective_params_come_from_config():
    x = batch(2)
    fn = get_policy_loss_fn("drpo")
    small, _ = run_loss(fn, x, actor_config({"delta": 0.05}), "token-mean")
    big, _ = run_loss(fn, x, actor_config({"delta": 12.5}), "token-mean")
    assert not torch.allclose(small, big)
    with pytest.raises(ValueError, match="unknown parameter"):
        run_loss(fn, x, actor_config({"epsilon": 1.0}), "token-mean")


def _verl_config(**kw) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **kw)


# (verl loss_mode, verl config, drpo objective, drpo params, aggregation, loss values equal?)
CROSS = [
    ("vanilla", dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0),
     "ppo", dict(clip_low=0.2, clip_high=0.28, clip_c=3.0), "token-mean", True),
    ("dppo_tv", dict(clip_ratio=0.15, clip_ratio_low=0.15, clip_ratio_high=0.15, clip_ratio_c=20.0),
     "dppo_tv", dict(delta=0.15, clip_c=20.0), "token-mean", False),
    ("dppo_kl", dict(clip_ratio=0.05, clip_ratio_low=0.05, clip_ratio_high=0.05, clip_ratio_c=20.0),
     "dppo_kl", dict(delta=0.05, clip_c=20.0), "token-mean", False),
    ("cispo", dict(clip_ratio_low=0.2, clip_ratio_high=4.0),
     "cispo", dict(clip_low=0.2, clip_high=4.0), "token-mean", True),
    ("gspo", dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4),
     "gspo", dict(clip_low=3e-4, clip_high=4e-4), "seq-mean-token-mean", True),
]


@pytest.mark.parametrize("with_weights", [False, True], ids=["plain", "rollout_is_weights"])
@pytest.mark.parametrize("verl_name, verl_kw, ours, params, agg, same_value", CROSS,
                         ids=[c[0] for c in CROSS])
def test_matches_verl_builtin(verl_name, verl_kw, ours, params, agg, same_value, with_weights):
    """Same gradient as verl's loss. DPPO's loss *value* differs by design: ours is the surrogate
    -A min(r, c) M, verl's is -A sg(min(r, c)) log(pi) M; their gradients are equal."""
    x = batch(3, B=16, T=16)
    weights = torch.rand(x["mask"].shape, generator=torch.Generator().manual_seed(4)) * 2 if with_weights else None
    theirs = run_loss(get_policy_loss_fn(verl_name), x, _verl_config(**verl_kw), agg, weights)
    mine = run_loss(get_policy_loss_fn(verl_loss_name(ours)), x, actor_config(params), agg, weights)
    loss_err = float((theirs[0] - mine[0]).abs())
    grad_err = float((theirs[1] - mine[1]).abs().max())
    record(f"verl:{verl_name} vs drpo:{ours} ({'weights' if with_weights else 'plain'})", loss_err, grad_err)
    assert theirs[1].abs().max() > 0
    torch.testing.assert_close(mine[1], theirs[1], rtol=1e-5, atol=1e-7)
    if same_value:
        torch.testing.assert_close(mine[0], theirs[0], rtol=1e-5, atol=1e-7)
    else:  # ours = sum(-A min(r,c) v M w)/N ; verl's = sum(-A min(r,c) v log pi M w)/N
        ratio = torch.exp(x["log_prob"] - x["old"]).clamp(max=20.0)
        lp_grad = mine[1] / ratio  # per-token -A v M w / N (ours' gradient is r times it)
        verl_value = (lp_grad * ratio * x["log_prob"]).sum()
        torch.testing.assert_close(theirs[0], verl_value, rtol=1e-5, atol=1e-6)


def test_documented_config_anchors_on_rollout_log_probs(monkeypatch):
    """With the documented overrides, verl's hydra config yields our config class, and verl's
    worker loss (ppo_loss) hands our loss the batch's ``old_log_probs``, which verl's v1 trainer
    sets to ``rollout_log_probs`` in bypass mode (trainer_base._compute_old_log_prob)."""
    from tensordict import TensorDict
    from verl.trainer.ppo import core_algos
    from verl.utils import tensordict_utils as tu
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.utils import losses

    cfg = _compose(DRPO_OVERRIDES)
    assert cfg.trainer.use_v1 and cfg.algorithm.rollout_correction.bypass_mode
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, DRPOPolicyLossConfig)
    assert actor.policy_loss.drpo_params == {"delta": 12.5}

    x = batch(5, B=4, T=6)
    rollout = x["old"]
    seen = {}
    ours = get_policy_loss_fn("drpo")

    def spy(**kw):
        seen.update(kw)
        return ours(**kw)

    monkeypatch.setitem(core_algos.POLICY_LOSS_REGISTRY, "drpo", spy)
    B, T = rollout.shape
    data = TensorDict({
        "prompts": torch.ones(B, 2, dtype=torch.long), "responses": torch.ones(B, T, dtype=torch.long),
        "attention_mask": torch.cat([torch.ones(B, 2), x["mask"].float()], 1).long(),
        "response_mask": x["mask"].long(), "old_log_probs": rollout,  # bypass: old := rollout
        "advantages": x["adv"],
    }, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(x["mask"].sum()), global_batch_size=B)
    # model output in verl's no-padding layout: per sequence [prompt, prompt, response...], the
    # log-prob of response token t sits one position before it
    flat = []
    for i in range(B):
        n = int(x["mask"][i].sum())
        flat += [torch.zeros(1), x["log_prob"][i, :n], torch.zeros(1)]
    out = {"log_probs": torch.cat(flat)}
    loss, metrics = losses.ppo_loss(actor, out, data)
    assert torch.equal(seen["old_log_prob"][x["mask"]], rollout[x["mask"]])
    assert "actor/drpo/penalty_mean" in metrics
    lp = x["log_prob"].clone()
    ref, _ = drpo.policy_loss("drpo", lp, rollout, x["adv"], x["mask"], delta=12.5)
    torch.testing.assert_close(loss.detach(), ref)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compose(overrides: list[str]):
    return compose_verl_config("main_ppo", overrides)


def recipe_overrides(script: str) -> list[str]:
    """The hydra overrides a recipe passes to verl (its DRY_RUN=1 output)."""
    out = subprocess.run(["bash", os.path.join(REPO, "examples", "verl", script)], env={**os.environ, "DRY_RUN": "1"},
                         capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def doctor_traps(monkeypatch, entry: str, overrides: list[str]) -> list[str]:
    """`drpo doctor verl --entry ENTRY OVERRIDES` with the environment probe faked complete, so
    only the traps of the configuration itself can fire."""
    from typer.testing import CliRunner

    env = doctor.VerlEnv(verl_version="0.9.1", registered=["drpo"], transfer_queue=True)
    monkeypatch.setattr(doctor, "probe_verl_env", lambda modules, timeout=300.0: env)
    result = CliRunner().invoke(doctor.app, ["verl", "--entry", entry, *overrides])
    traps = [ln.split(":")[0].split()[1] for ln in result.output.splitlines() if ln.startswith("TRAP ")]
    assert result.exit_code == (1 if traps else 0), result.output
    return traps


@pytest.mark.slow
def test_recipe_overrides_compose_with_verl_config():
    from verl.utils.config import omega_conf_to_dataclass

    overrides = recipe_overrides("run_drpo_qwen3_4b.sh")
    assert set(documented_overrides("rollout-anchored")) <= set(overrides)
    cfg = _compose(overrides)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert actor.policy_loss.loss_mode == "drpo" and actor.policy_loss.drpo_params == {"delta": 12.5}
    assert cfg.algorithm.rollout_correction.bypass_mode and cfg.trainer.use_v1
    assert (cfg.data.train_batch_size, actor.ppo_mini_batch_size, cfg.actor_rollout_ref.rollout.n) == (64, 16, 8)
    assert cfg.actor_rollout_ref.rollout.val_kwargs.n == 16 and actor.optim.lr == 1e-6


@pytest.mark.slow
def test_recipes_pass_the_doctor(monkeypatch):
    assert doctor_traps(monkeypatch, "main_ppo", recipe_overrides("run_drpo_qwen3_4b.sh")) == []
    assert doctor_traps(monkeypatch, "fully_async", recipe_overrides("run_drpo_qwen3_4b_fully_async.sh")) == []


@pytest.mark.slow
def test_async_recipe_composes_with_verl_fully_async_config(monkeypatch):
    """The fully-async recipe's overrides, composed with verl's fully_async_ppo_trainer.yaml as
    `python -m verl.experimental.fully_async_policy.fully_async_main` does: drpo anchored on the
    recomputed proximal policy with token-level rollout-correction weights, 64 prompts per sync."""
    from verl.utils.config import omega_conf_to_dataclass

    overrides = recipe_overrides("run_drpo_qwen3_4b_fully_async.sh")
    assert set(documented_overrides("fully-async")) <= set(overrides)
    cfg = compose_verl_config("fully_async", overrides)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, DRPOPolicyLossConfig) and actor.policy_loss.loss_mode == "drpo"
    assert actor.policy_loss.drpo_params == {"delta": 12.5} and actor.strategy == "fsdp2"
    rc = cfg.algorithm.rollout_correction
    assert (rc.bypass_mode, rc.rollout_is, rc.rollout_is_threshold) == (False, "token", 2.0)
    assert cfg.actor_rollout_ref.rollout.calculate_log_probs and not cfg.actor_rollout_ref.hybrid_engine
    assert (cfg.data.train_batch_size, cfg.data.gen_batch_size, cfg.actor_rollout_ref.rollout.mode) == (0, 1, "async")
    a = cfg.async_training
    prompts_per_sync = actor.ppo_mini_batch_size * a.require_batches * a.trigger_parameter_sync_step
    assert prompts_per_sync == 64 and cfg.actor_rollout_ref.rollout.n == 8
    # the yaml's default, bypass_mode=True, is what the recipe must override
    without = [o for o in overrides if not o.startswith("algorithm.rollout_correction.bypass_mode")]
    assert doctor_traps(monkeypatch, "fully_async", without) == ["bypass_rewrites_loss",
                                                                  "bypass_ignores_rollout_correction"]


def test_data_step_writes_verl_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    from drpo.integrations import verl_data

    src = tmp_path / "train.jsonl"
    src.write_text('{"prompt": "What is 1+1?", "solution": "2"}\n{"prompt": "3*3?", "solution": 9}\n')
    out = tmp_path / "out" / "train.parquet"
    verl_data.main(["--input", str(src), "--output", str(out), "--question-field", "prompt",
                    "--answer-field", "solution", "--data-source", "dapo_math"])
    df = pd.read_parquet(out)
    assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = df.iloc[1]
    assert row["data_source"] == "dapo_math" and row["ability"] == "math"
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith("3*3?")
    assert "\\boxed{}" in row["prompt"][0]["content"]
    assert dict(row["reward_model"]) == {"style": "rule", "ground_truth": "9"}
    assert row["extra_info"]["index"] == 1


def test_recipe_reward_function():
    import importlib.util

    spec = importlib.util.spec_from_file_location("drpo_reward", os.path.join(REPO, "examples", "verl", "reward.py"))
    reward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward)
    assert reward.compute_score("aime24", "so the answer is \\boxed{204}", "204") == 1.0
    assert reward.compute_score("aime24", "so the answer is \\boxed{205}", "204", {}) == 0.0
