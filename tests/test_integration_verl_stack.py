"""`pip install -e '.[verl]'` gives an environment in which verl's trainers can start.

verl 0.9.1's requirements leave out modules its trainers import; the `verl` extra adds them. These
tests fail (rather than skip) when they are missing, naming the fix, because the other verl tests
skip in that case (tests/test_integration_verl_loop.py needs the worker stack).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl")
from drpo.integrations.doctor import TRAINER_IMPORTS, probe_verl_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_verl_trainer_imports():
    """What each trainer imports when it starts: the v1 trainer (transfer_queue), the legacy one,
    fully-async, one-step-off-policy, and verl's engine workers."""
    modules = list(dict.fromkeys(m for kind in TRAINER_IMPORTS.values() for m in kind))
    env = probe_verl_env(modules)
    assert env.import_error is None, f"{env.import_error}: run pip install -e '.[verl]'"
    assert env.transfer_queue and env.plugin_error is None


@pytest.mark.slow
def test_main_ppo_starts_with_the_recipe_overrides():
    """`python -m verl.trainer.main_ppo` with the recipe's overrides: verl's Hydra entry point (with
    our plug-in loaded by `import verl`) composes the job; `--cfg job` stops before Ray."""
    overrides = subprocess.run(["bash", str(REPO / "examples/verl/run_drpo_qwen3_4b.sh")], check=True,
                               env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True).stdout.split("\n")
    out = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", *filter(None, overrides), "--cfg", "job"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "_target_: drpo.integrations.verl.DRPOPolicyLossConfig" in out.stdout
    assert "loss_mode: drpo" in out.stdout and "delta: 12.5" in out.stdout
