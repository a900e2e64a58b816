"""Faults a cluster produces, on real processes: a killed rollout worker, SIGTERM, a trainer killed under
its worker, broken rewards, a collapsed policy, a full disk, a bug in the middle of a run. Each says what
happened in one line (or keeps its traceback, for a bug), marks the run's status, and resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from typer.testing import CliRunner

from drpo.cli import app
from drpo.training import run_io
import faulty_cli
from helpers import alive, assert_one_line, cmdline, descendants, small_run

pytestmark = pytest.mark.slow  # every test here trains or starts processes
VOLATILE = ("time/", "throughput/")


def _train(args: list[str], fault: Optional[tuple[str, int]] = None) -> subprocess.Popen:
    """``drpo train args`` in a new process (session); with ``fault`` = (kind, step), through tests/faulty_cli.py."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # tests/ holds the reward module and faulty_cli
    argv = faulty_cli.command(*fault, "train", *args) if fault else [sys.executable, "-m", "drpo.cli", "train", *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _paused(p: subprocess.Popen, out: Path) -> None:
    """Wait until the trainer of ``p`` waits at the step faulty_cli pauses it at (or ``p`` ended: fail)."""
    marker = out / faulty_cli.PAUSED
    while not marker.exists():
        assert p.poll() is None, p.communicate()[1]
        time.sleep(0.05)
    assert marker.read_text() == str(p.pid)


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in run_io.read_metrics(out / "metrics.jsonl")]


def _worker_of(trainer: int) -> int:
    return next(p for p in descendants(trainer) if "spawn_main" in cmdline(p) and "resource_tracker" not in cmdline(p))


def _reference(tiny_model_dir, tmp_path, *extra) -> list[dict]:
    """The rows of the same run uninterrupted; it says nothing on stderr (no collapse warning: see SMALL_RUN)."""
    ref = tmp_path / "reference"
    p = _train(small_run(tiny_model_dir, ref, *extra))
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0 and stderr == "", stderr
    return _rows(ref)


def test_a_killed_rollout_worker_is_one_line_and_resume_continues_exactly(tiny_model_dir, tmp_path):
    cfg = ("train.steps=12", "save_every=1", "rollout.staleness=2")
    out = tmp_path / "r"
    p = _train(small_run(tiny_model_dir, out, *cfg), fault=("kill_worker", 4))  # dies making batch 4 (0-based)
    _, stderr = p.communicate(timeout=300)  # noticed where the trainer waits for batch 4 (no timeout to wait out)
    assert p.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "the rollout worker" in lines[0] and "killed by signal 9 (SIGKILL: out of memory?)" \
        in lines[0], stderr
    assert "__main__" not in stderr  # it had started: no hint about the guard
    status = run_io.read_status(out)
    assert status["state"] == "failed" and status["cause"] == "rollout_worker" and status["step"] == 4, status
    assert [r["step"] for r in run_io.read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    res = _train(["--out", str(out), "--resume"])
    assert res.wait(timeout=600) == 0, res.stderr.read()
    assert _rows(out) == _reference(tiny_model_dir, tmp_path, *cfg)


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tiny_model_dir, tmp_path):
    cfg = ("train.steps=30", "save_every=10")
    out = tmp_path / "r"
    p = _train(small_run(tiny_model_dir, out, *cfg), fault=("pause", 2))  # waits at the start of step 3
    _paused(p, out)
    p.send_signal(signal.SIGTERM)  # a scheduler's notice, in the middle of step 3
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 143, stderr
    assert stderr.strip().splitlines() == [f"terminated (SIGTERM) after step 3; resume with: drpo train --out {out} "
                                           "--resume  (restarts from the checkpoint of step 3)"], stderr
    status = run_io.read_status(out)
    assert status["state"] == "interrupted" and status["signal"] == "SIGTERM" and status["step"] == 3
    assert status["checkpoint"] == 3 and run_io.latest_checkpoint(out).name == "step_3"  # the step it finished, kept
    res = _train(["--out", str(out), "--resume"])
    assert res.wait(timeout=600) == 0, res.stderr.read()
    assert _rows(out) == _reference(tiny_model_dir, tmp_path, *cfg)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_worker_and_its_children_exit_when_the_trainer_is_gone(tiny_model_dir, tmp_path, how):
    out = tmp_path / "r"
    p = _train(small_run(tiny_model_dir, out, "train.steps=400", "rollout.staleness=1",
                         "task.reward=helpers:verifying_reward", "save_every=0"), fault=("pause", 2))
    _paused(p, out)  # the worker has scored batches 0 to 2: its verifier child is running
    below = descendants(p.pid)
    worker = _worker_of(p.pid)
    assert any("math_verify" in cmdline(c) or "-c" in cmdline(c) for c in descendants(worker)), \
        [cmdline(c)[:80] for c in below]  # the worker's own verifier child is there
    os.kill(p.pid, how)  # the trainer alone (kill -9, or a SIGTERM it handles)
    p.communicate(timeout=300)
    assert p.returncode == (-signal.SIGKILL if how == signal.SIGKILL else 143)
    deadline = time.monotonic() + 120  # the worker's watchdog looks every second (a bound for a hang only)
    while any(alive(c) for c in below):  # none left under PID 1
        assert time.monotonic() < deadline, [cmdline(c)[:80] for c in below if alive(c)]
        time.sleep(0.05)


def test_broken_rewards_stop_the_run_in_one_line(tiny_model_dir, tmp_path):
    for reward, staleness, needle in (("raising_reward", 0, "every reward call failed in 3 consecutive steps"),
                                      ("exiting_reward", 0, "called sys.exit(3)"),
                                      ("exiting_reward", 1, "called sys.exit(3)")):
        out = tmp_path / f"{reward}{staleness}"
        p = _train(small_run(tiny_model_dir, out, f"task.reward=helpers:{reward}", f"rollout.staleness={staleness}",
                             "train.steps=8"))
        _, stderr = p.communicate(timeout=300)
        stops = [ln for ln in stderr.splitlines() if ln.startswith("training stopped:")]
        assert p.returncode == 1 and "Traceback" not in stderr, stderr
        assert len(stops) == 1 and needle in stops[0] and reward in stops[0], stderr
        status = run_io.read_status(out)
        assert status["state"] == "failed" and status["cause"] == "reward", status


def test_a_collapsed_policy_is_said_and_can_stop_the_run(tmp_path):
    """lr 10 with the unregularised objective destroys the built-in model within a few steps."""
    base = ["objective.name=pg_is", "train.lr=10", "train.steps=40", "eval.every=5", "eval.prompts=64",
            "threads=1", "progress=false", "tensorboard=false", "save_every=0"]
    res = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "warn"), *base, "train.steps=12"])
    assert res.exit_code == 0, res.output
    assert "warning: collapsed at step" in res.output
    status = run_io.read_status(tmp_path / "warn")
    assert status["state"] == "finished"
    res = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "stop"), *base, "train.stop_on_collapse=true"])
    assert res.exit_code == 1 and "(train.stop_on_collapse)" in res.output, res.output
    status = run_io.read_status(tmp_path / "stop")
    rows = run_io.read_metrics(tmp_path / "stop" / "metrics.jsonl")
    assert status["state"] == "collapsed" and status["step"] < 40 and rows[-1]["step"] == status["step"]
    assert "eval/accuracy" in rows[-1]  # it stopped right after an evaluation


def test_a_full_disk_is_one_line_and_the_status_says_error(tiny_model_dir, tmp_path, monkeypatch):
    from drpo.training import checkpoint

    real = checkpoint.save_checkpoint

    def full(run_dir, *a, **k):
        step = a[4].step  # the CheckpointState
        if step >= 4:
            raise run_io.DiskFull(f"disk full: could not write checkpoint step_{step} in {run_dir}/checkpoints",
                                  run_dir, free=0)
        return real(run_dir, *a, **k)

    monkeypatch.setattr(checkpoint, "save_checkpoint", full)
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["train", *small_run(tiny_model_dir, out, "train.steps=6")])
    assert_one_line(res, 1, "disk full: could not write checkpoint step_4")
    status = run_io.read_status(out)
    assert status["state"] == "error" and status["cause"] == "disk_full" and status["step"] == 4
    assert run_io.latest_checkpoint(out).name == "step_2"  # the last good one stays


def test_a_bug_mid_run_keeps_its_traceback_and_fails_the_run(tiny_model_dir, tmp_path, monkeypatch):
    from drpo.training.trainer import Trainer

    real = Trainer.step

    def buggy(self, step):
        if step == 2:
            raise ValueError("a bug in the middle of a run")
        return real(self, step)

    monkeypatch.setattr(Trainer, "step", buggy)
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["train", *small_run(tiny_model_dir, out)])
    assert res.exit_code == 1 and "Traceback" in res.output and "a bug in the middle of a run" in res.output
    assert "unexpected ValueError" in res.output and str(out / "traceback.txt") in res.output
    status = run_io.read_status(out)
    assert status["state"] == "failed" and status["cause"] == "exception" and status["step"] == 2
    assert "in buggy" in (out / "traceback.txt").read_text()
    # a mistake in the input is still one line and exit 2, before anything runs
    assert_one_line(CliRunner().invoke(app, ["train", "--out", str(tmp_path / "x"), "train.lr=abc"]), 2,
                    "config error at 'train.lr'")


def test_divergence_names_the_metrics_step(tiny_model_dir, tmp_path, monkeypatch):
    from drpo.training import trainer as trainer_mod

    real = trainer_mod.policy_loss
    calls = {"n": 0}

    def nan_at_step_3(obj, logp, **kw):
        loss, m = real(obj, logp, **kw)
        calls["n"] += 1
        return (loss * float("nan"), m) if calls["n"] > 2 * 2 else (loss, m)  # 2 minibatches per step

    monkeypatch.setattr(trainer_mod, "policy_loss", nan_at_step_3)
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["train", *small_run(tiny_model_dir, out, "train.steps=6")])
    assert_one_line(res, 1, "step 3: the loss is nan")
    assert [r["step"] for r in run_io.read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert json.loads((out / "status.json").read_text())["cause"] == "diverged"
