"""Group advantages and run-config validation."""
from __future__ import annotations

import pytest
import torch

from drpo.training.advantages import group_advantages
from drpo.training.config import ConfigError, load_config


def test_grpo_mean_centred_without_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    ga = group_advantages(r, 4)
    torch.testing.assert_close(ga.advantages, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.5, 0.5, -0.5, -0.5]))
    assert ga.zero_adv_groups == 0


def test_std_normalisation_and_rloo():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    std = r.std()
    torch.testing.assert_close(group_advantages(r, 4, std_normalize=True).advantages, (r - 0.25) / (std + 1e-6))
    # RLOO: R_i - mean of the others
    want = torch.tensor([1.0 - 0.0, 0.0 - 1 / 3, 0.0 - 1 / 3, 0.0 - 1 / 3])
    torch.testing.assert_close(group_advantages(r, 4, "rloo").advantages, want)


def test_zero_advantage_groups_counted_and_filtered():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    ga = group_advantages(r, 2)
    assert ga.zero_adv_groups == 2 and ga.groups == 3
    assert ga.keep.tolist() == [False, False, True, True, False, False]
    assert ga.zero_adv_frac == pytest.approx(2 / 3)


def test_advantage_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(4), 1)


def test_config_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["train.lr=3e-5", "objective.name=ppo", "objective.params={clip_high: 0.28}"])
    assert cfg.train.lr == 3e-5 and cfg.objective.name == "ppo" and cfg.objective.params == {"clip_high": 0.28}
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\nrollout:\n  precision: bf16\n")
    cfg = load_config(f, ["seed=4"])
    assert cfg.seed == 4 and cfg.rollout.precision == "bf16"


@pytest.mark.parametrize("override,needle", [
    (["train.lrr=1"], "train.lrr"),
    (["train.lr=abc"], "train.lr"),
    (["train.lr=-1"], "train.lr"),
    (["rollout.precision=nf4"], "rollout.precision"),
    (["train.minibatches=5"], "train.minibatches"),
    (["rollout.group_size=1"], "rollout.group_size"),
    (["objective.name=nope"], "unknown objective 'nope'"),
    (["objective.params={dleta: 1}"], "unknown parameter"),
    (["objective.agg_mode=mean"], "unknown agg_mode"),
    (["task.name=jsonl"], "task.path"),
    (["train.rollout_correction={mode: truncate}"], "train.rollout_correction"),
    (["train.anchor=old_policy", "train.rollout_correction={mode: cut}"], "unknown mode"),
    (["objective.name=dppo_topk_tv"], "rollout.logprobs_topk"),
    (["nonsense"], "not of the form"),
])
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, override)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
