"""The README's API example runs as written (docs that match the code)."""
from __future__ import annotations

import json
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


# ------------------------------------------------------------------ the mismatch tables agree with their JSON

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "real_model"
# a table row's first cell -> the engine key of benchmarks/mismatch_table.py's JSON
ENGINES = {"HF fp32": "hf:fp32", "HF bf16 (simulated)": "hf:bf16", "HF bf16": "hf:bf16",
           "HF bf16, fp32 LM head": "hf:bf16+fp32head", "HF fp8 (simulated)": "hf:fp8", "HF fp8": "hf:fp8",
           "HF fp4 (NVFP4)": "hf:fp4", "HF fp4": "hf:fp4", "HF int4 (weight-only)": "hf:int4", "HF int4": "hf:int4",
           "vLLM bf16 (real kernels)": "vllm:bf16", "vLLM bf16": "vllm:bf16", "vLLM fp8 (W8A16)": "vllm:fp8"}
# a column header -> the JSON field it shows
FIELDS = {"tokens": "tokens", "mean |r - 1|": "mean_abs_r_minus_1", "k3": "k3", "k3 (KL mu || pi)": "k3",
          "mean |pi - mu|": "mean_abs_pi_minus_mu", "max |pi - mu|": "max_abs_pi_minus_mu",
          "mu < 0.01": "mu_lt_0.01_frac", "tokens with mu < 0.01": "mu_lt_0.01_frac"}


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown tables as (header cells, rows of cells), with ``\\|`` unescaped and ``**`` dropped."""
    out = []
    for block in re.findall(r"((?:^\|.*\|\n)+)", text, re.M):
        rows = [[c.strip().replace("**", "") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
                for line in block.strip().splitlines()]
        rows = [[c.replace("\\|", "|") for c in r] for r in rows]
        out.append((rows[0], [r for r in rows[2:]]))
    return out


def number(cell: str) -> float:
    cell = cell.split(" / ")[0].strip()
    return float(cell[:-1]) / 100 if cell.endswith("%") else float(cell)


def checked_cells(page: str, result: str, which: int = 0) -> int:
    """Every cell of ``page``'s mismatch table number ``which`` (tables headed 'engine', in page order) whose
    row names an engine of ``result`` and whose column a field: equal to the JSON value at the cell's printed
    precision. Returns the number of cells checked."""
    data = json.loads((RESULTS / result).read_text())["engines"]
    n = 0
    found = [t for t in tables((ROOT / page).read_text(encoding="utf-8")) if t[0] and t[0][0] in ("engine", "rollout engine")]
    for header, rows in found[which:which + 1]:
        for row in rows:
            key = ENGINES.get(row[0])
            if key is None or key not in data:
                continue
            for col, cell in zip(header[1:], row[1:]):
                field = FIELDS.get(col)
                if field is None or not cell:
                    continue
                want, got = data[key][field], number(cell)
                digits = len(re.sub(r"[^0-9]", "", cell.split("e")[0].split(" / ")[0].lstrip("0.").rstrip("%")))
                assert got == pytest.approx(want, rel=0.6 * 10 ** (1 - max(digits, 1)), abs=0.006 if "%" in cell else 0), \
                    f"{page}: {row[0]}, {col}: the table says {cell}, {result} says {want}"
                n += 1
    return n


def test_the_real_model_mismatch_tables_are_their_json():
    """The mismatch figures of the README and of docs/real-model.md are those of the committed JSON (one source)."""
    assert checked_cells("README.md", "mismatch_smollm2_gsm8k.json") >= 24
    assert checked_cells("docs/real-model.md", "mismatch_smollm2_gsm8k.json", 0) >= 48
    assert checked_cells("docs/real-model.md", "mismatch_builtin.json", 1) >= 36
