"""A run directory cannot be corrupted: one process at a time, resume only with the same
configuration, a restart path for runs that stopped before their first checkpoint, Ctrl-C marked and
explained, unreadable checkpoints skipped."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from drpo.cli import app
from drpo.training import run_io
from drpo.training.config import ConfigError, load_config
from drpo.training.trainer import Trainer
from helpers import interrupt_at, small_config, small_run

args, small = small_run, small_config


# ------------------------------------------------------------------ 1. one process per run directory
@pytest.mark.slow
def test_a_second_trainer_on_a_locked_run_directory_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    first = Trainer(small(tiny_model_dir, out))
    with pytest.raises(run_io.RunLocked, match=f"in use by pid {os.getpid()}"):
        Trainer(small(tiny_model_dir, out, "objective.name=ppo"))
    first.train()  # the first one is unaffected and finishes
    assert run_io.read_status(out)["state"] == "finished"
    assert yaml.safe_load((out / "config.yaml").read_text())["objective"]["name"] == "drpo"


@pytest.mark.slow
def test_a_second_process_exits_at_once_with_a_clear_line(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    holder = Trainer(small(tiny_model_dir, out))  # holds the lock in this process
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # tests/ holds the reward module
        res = subprocess.run([sys.executable, "-m", "drpo.cli", "train", *args(tiny_model_dir, out)],
                             capture_output=True, text=True, timeout=120, env=env)
    finally:
        holder.life.lock.release()
    assert res.returncode == 2, res.stderr
    assert "is in use by pid" in res.stderr and "Traceback" not in res.stderr
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(f"pid {dead.stdout.strip()} on host since 2026-01-01 00:00:00\n")
    notes = []
    Trainer(small(tiny_model_dir, out, "train.steps=1"), notify=notes.append).train()
    assert any(f"left by process {dead.stdout.strip()}" in n for n in notes)
    assert run_io.read_status(out)["state"] == "finished"


# ------------------------------------------------------------------ 2. resume only what was run
@pytest.mark.slow
def test_resume_refuses_a_changed_configuration_and_names_the_keys(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    Trainer(small(tiny_model_dir, out)).train()
    saved = (out / "config.yaml").read_text()
    with pytest.raises(ValueError) as e:
        Trainer(small(tiny_model_dir, out, "objective.name=ppo", "rollout.group_size=2", "train.lr=0.5",
                      "train.steps=6"), resume=True)
    msg = str(e.value)
    for key in ("objective.name", "rollout.group_size", "train.lr"):
        assert key in msg
    assert "train.steps" not in msg.split("only")[0]  # growing train.steps is allowed
    assert (out / "config.yaml").read_text() == saved  # nothing recorded that was not used
    with pytest.raises(ValueError, match="train.steps may only grow"):
        Trainer(small(tiny_model_dir, out, "train.steps=2"), resume=True)


@pytest.mark.slow
def test_resume_with_more_steps_and_other_eval_settings_continues(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    Trainer(small(tiny_model_dir, out)).train()
    Trainer(small(tiny_model_dir, out, "train.steps=6", "eval.every=3", "eval.prompts=4", "save_every=3"),
            resume=True).train()
    status = run_io.read_status(out)
    assert status["state"] == "finished" and status["step"] == 6
    assert [r["step"] for r in run_io.read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_cli_resume_without_overrides_uses_the_saved_configuration(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "r"
    interrupt_at(monkeypatch, 3)
    res = CliRunner().invoke(app, ["train", *args(tiny_model_dir, out, "objective.name=ppo")])
    assert res.exit_code == 130
    monkeypatch.undo()
    res = CliRunner().invoke(app, ["train", "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((out / "config.yaml").read_text())["objective"]["name"] == "ppo"
    assert run_io.read_status(out)["state"] == "finished"


# ------------------------------------------------------------------ 3. stopped before the first checkpoint
@pytest.mark.slow
def test_resume_starts_over_when_there_is_no_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "r"
    interrupt_at(monkeypatch, 1)  # after step 1 was logged, before the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        Trainer(small(tiny_model_dir, out)).train()
    monkeypatch.undo()
    assert [r["step"] for r in run_io.read_metrics(out / "metrics.jsonl")] == [1]
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(small(tiny_model_dir, out))
    notes = []
    Trainer(small(tiny_model_dir, out), resume=True, notify=notes.append).train()
    assert any("starting the run over from step 0" in n for n in notes)
    assert [r["step"] for r in run_io.read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in run_io.read_metrics(out / "metrics.replaced.jsonl")] == [1]


@pytest.mark.slow
def test_resuming_on_other_cpu_kernels_is_said(tiny_model_dir, tmp_path, monkeypatch):
    """A checkpoint records the run's environment (drpo.training.environment); resuming on another set of CPU
    kernels (another machine) warns that the numbers part from the uninterrupted run's. The same set: no warning.
    (Another thread count cannot happen: ``threads`` may not change on resume, and unset, the run keeps its own.)"""
    import torch

    out = tmp_path / "r"
    Trainer(small(tiny_model_dir, out, "train.steps=2")).train()
    assert run_io.read_status(out)["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    notes = []
    Trainer(small(tiny_model_dir, out, "train.steps=4"), resume=True, notify=notes.append).life.lock.release()
    assert not any("resuming with" in n for n in notes), notes
    saved = torch.backends.cpu.get_cpu_capability()
    other = "AVX512" if saved != "AVX512" else "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    Trainer(small(tiny_model_dir, out, "train.steps=4"), resume=True, notify=notes.append).train()
    assert run_io.read_status(out)["cpu_capability"] == other
    assert any(f"resuming with {other} CPU kernels, the run began with {saved}" in n for n in notes), notes


@pytest.mark.parametrize("override,needle", [
    ("objective.params.delta=-1", "delta must be > 0"),
    ("objective.params.divergence=nope", "unknown divergence"),
    ("objective.params.delta='12.5'", "parameter 'delta' must be of type float"),
])
def test_objective_parameters_are_checked_when_the_config_loads(override, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])
    key, value = override.split("=")
    f = tmp_path / "c.yaml"
    f.write_text(f"objective:\n  params:\n    {key.split('.')[-1]}: {value}\n")
    with pytest.raises(ConfigError, match=needle):  # the same from a config file
        load_config(f)


@pytest.mark.slow
def test_a_prompt_over_the_limit_fails_before_anything_is_written(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(ValueError, match="task.max_prompt_tokens=3"):
        Trainer(small(tiny_model_dir, out, "task.max_prompt_tokens=3"))
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    Trainer(small(tiny_model_dir, out, "train.steps=1")).train()  # a plain start works afterwards


def test_max_prompt_tokens_beyond_the_model_positions_is_refused(tiny_model_dir, tmp_path):
    # the tiny model has 128 positions; 256 prompt tokens + 6 new ones cannot fit
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        Trainer(small(tiny_model_dir, tmp_path / "r", "task.max_prompt_tokens=256"))


# ------------------------------------------------------------------ 4. Ctrl-C
@pytest.mark.slow
def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "r"
    interrupt_at(monkeypatch, 2)
    res = CliRunner().invoke(app, ["train", *args(tiny_model_dir, out)])
    assert res.exit_code == 130
    assert "interrupted after step 2" in res.output
    assert f"drpo train --out {out} --resume" in res.output and "checkpoint of step 2" in res.output
    status = run_io.read_status(out)
    assert status["state"] == "interrupted" and status["step"] == 2


# ------------------------------------------------------------------ 5. unreadable checkpoints
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate_model", "empty_state"])
def test_resume_falls_back_past_a_corrupted_checkpoint(tiny_model_dir, tmp_path, monkeypatch, damage):
    out = tmp_path / "r"
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(small(tiny_model_dir, out, "save_every=1")).train()
    monkeypatch.undo()
    bad = out / "checkpoints" / "step_3"
    if damage == "truncate_model":
        f = bad / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    else:
        (bad / "state.json").write_bytes(b"")
    notes = []
    tr = Trainer(small(tiny_model_dir, out, "save_every=1"), resume=True, notify=notes.append)
    assert tr.start_step == 2
    assert any("step_3 cannot be read" in n for n in notes) and any("resuming from step_2" in n for n in notes)
    tr.train()
    assert run_io.read_status(out)["state"] == "finished"


# ------------------------------------------------------------------ 6. no held-out set
@pytest.mark.slow
def test_jsonl_task_without_eval_path_finishes_with_a_clear_summary(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join('{"problem": "Q : compute %d + 1 . A :", "answer": "%d"}' % (i, i + 1) for i in range(6)))
    res = CliRunner().invoke(app, ["train", "--model", tiny_model_dir, "--out", str(tmp_path / "r"), "task.name=jsonl",
                                   f"task.path={data}", "train.steps=1", "rollout.prompts_per_step=2",
                                   "rollout.group_size=2", "train.minibatches=1", "rollout.max_new_tokens=4",
                                   "progress=false"])
    assert res.exit_code == 0, res.output
    assert "held-out evaluation is skipped" in res.output and "not measured" in res.output


# ------------------------------------------------------------------ 7. train.steps and the schedule
def test_train_steps_may_not_change_on_resume_when_the_schedule_is_laid_out_over_it():
    """cosine's learning rates depend on train.steps: a resumed run with other steps would not continue the run it
    resumes (refused, one line); constant and warmup do not, so steps may grow there."""
    from drpo.training.resume import ResumeRefused, check_resume_config

    def cfg(schedule, steps):
        return {"train": {"schedule": schedule, "steps": steps, "warmup_steps": 2}}

    with pytest.raises(ResumeRefused, match=r"^--resume with train.steps=6 \(the run's: 4\): train.schedule=cosine "
                                            r"lays its learning rates out over train.steps") as e:
        check_resume_config(cfg("cosine", 4), cfg("cosine", 6), 2)
    assert len(str(e.value).splitlines()) == 1
    check_resume_config(cfg("cosine", 4), cfg("cosine", 4), 2)
    for schedule in ("constant", "warmup"):
        check_resume_config(cfg(schedule, 4), cfg(schedule, 6), 2)


def test_the_schedules_said_to_depend_on_the_run_length_are_those_that_do():
    from drpo.training.optim import OVER_THE_RUN, schedule

    for kind in ("constant", "warmup", "cosine"):
        short, long = schedule(kind, 2, 40), schedule(kind, 2, 400)
        depends = any(short(i) != long(i) for i in range(40))
        assert depends == (kind in OVER_THE_RUN), kind
