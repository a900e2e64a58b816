"""The README's API example runs as written (docs that match the code)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    loss, metrics = scope["loss"], scope["metrics"]
    assert loss.ndim == 0 and scope["log_prob"].grad is not None
    # the README's formula, w = 1 - sign(A (r - 1)) |pi - mu| / delta, on the example's own tensors
    lp, blp = scope["log_prob"].detach(), scope["behavior_log_prob"]
    pi, mu = lp.exp(), blp.exp()
    A = scope["advantages"][:, None].expand_as(pi)
    w = 1 - torch.sign(A * (pi / mu - 1)) * (pi - mu).abs() / 12.5
    assert metrics["weight_mean"] == pytest.approx(float(w.mean()), abs=1e-5)
    assert metrics["abs_shift_mean"] == pytest.approx(float((pi - mu).abs().mean()), abs=1e-6)
