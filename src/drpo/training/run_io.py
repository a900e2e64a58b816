"""A run directory: resolved config, metrics (JSONL + TensorBoard) and checkpoints.

    <out>/config.yaml            the resolved configuration
    <out>/metrics.jsonl          one JSON object per step, flushed and fsynced as written
    <out>/tb/                    TensorBoard event files
    <out>/checkpoints/step_N/    model (safetensors), tokenizer, optimizer.pt, state.pt
    <out>/status.json            running / finished / failed, with the message

Metrics are append-only. On ``--resume`` from step N, lines of steps > N (logged after the last
checkpoint, and about to be recomputed) are moved to ``metrics.replaced.jsonl``, never dropped.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


class MetricsLog:
    """Append-only JSONL metrics with optional TensorBoard mirroring."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # keep NaN/inf visible in JSON without breaking parsers
    return v


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl (a torn last line, from a kill mid-write, is skipped)."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def set_aside_metrics_after(run_dir: Path, step: int) -> int:
    """Keep rows with step <= ``step`` in metrics.jsonl; append the others to metrics.replaced.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep, later = [], []
    for line in lines:
        try:
            s = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError):
            later.append(line if line.endswith("\n") else line + "\n")
            continue
        (keep if s <= step else later).append(line)
    if later:
        with open(run_dir / "metrics.replaced.jsonl", "a", encoding="utf-8") as fh:
            fh.writelines(later)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)
    return len(later)


def write_status(run_dir: Path, state: str, **info: Any) -> None:
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps({"state": state, "time": time.time(), **info}, indent=1))
    os.replace(tmp, run_dir / "status.json")


def read_status(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "status.json"
    return json.loads(p.read_text()) if p.exists() else {}


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler,
                    extra: dict[str, Any]) -> Path:
    """Write checkpoints/step_<step> atomically (temp folder, then rename)."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save({"step": step, "rng": rng_state(), **extra}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    root = run_dir / "checkpoints"
    if not root.exists():
        return None
    steps = sorted((int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.name.split("_")[1].isdigit())
    return steps[-1][1] if steps else None
