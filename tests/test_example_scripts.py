"""The analysis scripts the README's figures come from (examples/run_summary.py,
examples/builtin_error_analysis.py), run as a user runs them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from drpo.tasks.arithmetic import ArithmeticTask, boxed

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_run_summary_means_and_evals(tmp_path):
    rows = [{"step": 0, "eval/accuracy": 0.25},
            {"step": 1, "reward/mean": 0.1, "response/eos_frac": 1.0},
            {"step": 2, "reward/mean": 0.3, "response/eos_frac": 0.5, "eval/accuracy": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _run("run_summary.py", tmp_path, "--keys", "response/eos_frac", "--per-step", "reward/mean")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "eval/accuracy: 0: 0.250, 2: 0.500"
    assert lines[1].startswith("response/eos_frac: mean 0.75, max 1, min 0.5, first 1, last 0.5 (2 steps)")
    assert lines[2:] == ["1 reward/mean=0.1", "2 reward/mean=0.3"]


@pytest.mark.slow
def test_run_summary_errors_name_the_problem(tmp_path):
    out = _run("run_summary.py", tmp_path)
    assert out.returncode != 0 and "metrics.jsonl does not exist" in out.stderr
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.0}) + "\n")
    out = _run("run_summary.py", tmp_path, "--keys", "nope/key")
    assert out.returncode != 0 and "'nope/key'" in out.stderr


@pytest.mark.slow
def test_error_analysis_counts_operand_copies(tmp_path):
    # held-out problems whose first operand is not the answer, so copying it is wrong
    exs = [e for e in ArithmeticTask().heldout(20) if str(e.meta["operands"][0]) != e.answer][:2]
    a, b = exs
    per = [{"id": a.id, "responses": [f"so {boxed(a.answer)}", f"so {boxed(a.meta['operands'][0])}"]},
           {"id": b.id, "responses": [f"so {boxed(999)}", "no box at all"]}]
    (tmp_path / "e.json").write_text(json.dumps({"n": 20, "per_example": per}))
    out = _run("builtin_error_analysis.py", tmp_path / "e.json")
    assert out.returncode == 0, out.stderr
    assert "4 answers, accuracy 0.250, wrong 3, of which copy an operand 1" in out.stdout

    (tmp_path / "bad.json").write_text(json.dumps({"n": 1, "per_example": [{"id": "aime-1", "responses": []}]}))
    out = _run("builtin_error_analysis.py", tmp_path / "bad.json")
    assert out.returncode != 0 and "not built-in held-out problems" in out.stderr
