"""The README's API example runs as written (docs that match the code)."""
from __future__ import annotations

import re
from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    loss, metrics = scope["loss"], scope["metrics"]
    assert loss.ndim == 0 and scope["log_prob"].grad is not None
    assert 0.9 < metrics["weight_mean"] < 1.1
