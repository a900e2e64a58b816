"""End-to-end: a short RL run writes metrics and checkpoints, resumes exactly, stops on NaN, and
rejects bad configs and bad data with named errors."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from drpo.cli import app
from drpo.training import run_io, trainer as trainer_mod
from drpo.training.config import load_config
from drpo.training.trainer import Trainer, TrainingDiverged

VOLATILE = ("time/", "throughput/")


def small(tiny_model_dir, out, *extra):
    return load_config(None, [
        f"model={tiny_model_dir}", f"out={out}", "train.steps=4", "rollout.prompts_per_step=4",
        "rollout.group_size=4", "train.minibatches=2", "rollout.max_new_tokens=6", "eval.every=2",
        "eval.prompts=8", "save_every=2", "progress=false", "train.lr=1e-3", "rollout.precision=fp8", *extra])


def stable_rows(path):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in run_io.read_metrics(path)]


def test_short_run_writes_metrics_checkpoints_and_tensorboard(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    summary = Trainer(small(tiny_model_dir, out)).train()
    rows = run_io.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    r = rows[1]
    for key in ("reward/mean", "obj/loss", "obj/ratio_max", "obj/mu<0.01/token_frac", "obj/entropy",
                "mismatch/abs_shift_mean", "train/grad_norm", "adv/zero_adv_group_frac",
                "rollout/mu_lt_0.01_frac", "time/rollout", "throughput/tokens_per_s"):
        assert key in r, key
    assert r["mismatch/abs_shift_mean"] > 0  # fp8 rollout vs fp32 trainer
    assert "eval/accuracy" in rows[2] and "eval/accuracy" in rows[4]
    assert (out / "checkpoints" / "step_2" / "model.safetensors").exists()
    assert (out / "checkpoints" / "step_4" / "optimizer.pt").exists()
    assert list((out / "tb").glob("events.*"))
    assert run_io.read_status(out)["state"] == "finished"
    assert (out / "config.yaml").read_text().startswith("seed: 0")
    assert summary["accuracy_before"] == rows[0]["eval/accuracy"]


def test_fp32_rollout_matches_trainer_at_first_minibatch(tiny_model_dir, tmp_path):
    cfg = small(tiny_model_dir, tmp_path / "r", "rollout.precision=fp32", "train.steps=1", "eval.every=0")
    Trainer(cfg).train()
    row = run_io.read_metrics(tmp_path / "r" / "metrics.jsonl")[-1]
    assert row["mismatch/abs_shift_max"] < 1e-5
    assert abs(row["mismatch/ratio_max"] - 1.0) < 1e-3


def test_resume_logs_the_same_numbers(tiny_model_dir, tmp_path, monkeypatch):
    full = tmp_path / "full"
    Trainer(small(tiny_model_dir, full)).train()

    part = tmp_path / "part"
    real_step = Trainer.step

    def interrupted(self, step):
        if step == 3:  # 0-based: the 4th step, after the step-2 checkpoint and the step-3 row
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(small(tiny_model_dir, part)).train()
    monkeypatch.setattr(Trainer, "step", real_step)
    assert [r["step"] for r in run_io.read_metrics(part / "metrics.jsonl")] == [0, 1, 2, 3]
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(small(tiny_model_dir, part))
    Trainer(small(tiny_model_dir, part), resume=True).train()
    assert stable_rows(part / "metrics.jsonl") == stable_rows(full / "metrics.jsonl")
    replaced = run_io.read_metrics(part / "metrics.replaced.jsonl")
    assert [r["step"] for r in replaced] == [3]  # the row logged after the checkpoint is kept aside


def test_nan_loss_stops_with_a_clear_message(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real = trainer_mod.policy_loss
    calls = {"n": 0}

    def bad(*a, **k):
        loss, m = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 2 else loss), m

    monkeypatch.setattr(trainer_mod, "policy_loss", bad)
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        Trainer(small(tiny_model_dir, out, "eval.every=0")).train()
    assert run_io.read_status(out)["state"] == "failed"
    assert [r["step"] for r in run_io.read_metrics(out / "metrics.jsonl")] == [1]


def test_old_policy_anchor_with_rollout_correction_and_bf16_trainer(tiny_model_dir, tmp_path):
    cfg = small(tiny_model_dir, tmp_path / "rc", "train.steps=1", "eval.every=0", "train.anchor=old_policy",
                "train.rollout_correction={level: token, mode: truncate, upper: 2.0}", "train.precision=bf16",
                "objective.name=ppo", "train.filter_zero_adv_groups=true", "train.advantage=rloo")
    Trainer(cfg).train()
    row = run_io.read_metrics(tmp_path / "rc" / "metrics.jsonl")[-1]
    assert "obj/rollout_corr/rho_mean" in row or row.get("train/skipped") == 1


def test_jsonl_task_and_bad_data(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"Q : compute {i} + 1 . A :", "a": str(i + 1)}) for i in range(6)))
    base = [f"model={tiny_model_dir}", "train.steps=1", "rollout.prompts_per_step=2", "rollout.group_size=2",
            "train.minibatches=1", "rollout.max_new_tokens=4", "eval.every=0", "progress=false",
            "task.name=jsonl", f"task.path={data}", "task.question_field=q", "task.answer_field=a"]
    Trainer(load_config(None, base + [f"out={tmp_path / 'ok'}"])).train()
    with pytest.raises(ValueError, match="max_prompt_tokens=3"):  # checked for every row up front
        Trainer(load_config(None, base + [f"out={tmp_path / 'long'}", "task.max_prompt_tokens=3"]))
    with pytest.raises(ValueError, match="no field 'missing'"):
        Trainer(load_config(None, base + [f"out={tmp_path / 'f'}", "task.answer_field=missing"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        Trainer(load_config(None, base + [f"out={tmp_path / 'e'}", f"task.path={empty}"]))


def test_cli_reports_config_errors_by_key(tmp_path):
    res = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "x"), "train.minibatches=7"])
    assert res.exit_code == 2
    assert "train.minibatches" in res.output


def test_cli_train_runs_on_a_local_model(tiny_model_dir, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["train", "--model", tiny_model_dir, "--out", str(out), "train.steps=1",
                                   "rollout.prompts_per_step=2", "rollout.group_size=2", "train.minibatches=1",
                                   "rollout.max_new_tokens=4", "eval.every=1", "eval.prompts=4", "progress=false"])
    assert res.exit_code == 0, res.output
    assert "held-out accuracy: before" in res.output


def test_eval_command_on_a_local_model(tiny_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", "--model", tiny_model_dir, "--benchmark", "aime24", "--k", "2",
                                   "--limit", "3", "--max-new-tokens", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["n"] == 3 and d["k"] == 2 and 0.0 <= d["avg_at_k"] <= d["pass_at_k"] <= 1.0
    res = CliRunner().invoke(app, ["eval", "--model", tiny_model_dir, "--benchmark", "nope"])
    assert res.exit_code == 2 and "unknown benchmark" in res.output


def test_overlong_reward_replaces_the_reward_of_truncated_responses(tiny_model_dir, tmp_path):
    cfg = small(tiny_model_dir, tmp_path / "ol", "train.steps=1", "eval.every=0", "rollout.max_new_tokens=1",
                "train.overlong_reward=-1.0")
    tr = Trainer(cfg)
    m = tr.step(0)
    # one new token: only a response whose single token is EOS is not truncated
    assert m["reward/mean"] == pytest.approx(-1.0 * (1 - m["response/eos_frac"]))
