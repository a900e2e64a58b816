"""The metrics of a run: ``<out>/metrics.jsonl``, one JSON object per step, appended, flushed and fsynced as written
(mirrored to TensorBoard in ``<out>/tb/``). Append-only: on ``--resume`` from step N the rows of steps > N (logged
after the last checkpoint, and about to be recomputed) move to ``metrics.replaced.jsonl``, never dropped."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from drpo.training.disk import full, is_disk_full, write_all


class MetricsLog:
    """Append-only JSONL metrics with optional TensorBoard mirroring."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        # unbuffered: a row is in the file, fsynced, or not at all (a buffer would retry a failed
        # write at close, and leave half a row on a full disk)
        self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one row; on a full disk, cut off what was written of it and raise :class:`DiskFull`."""
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        data = (json.dumps(row) + "\n").encode("utf-8")
        end = os.fstat(self._fd).st_size
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as e:
            if not is_disk_full(e):
                raise
            try:
                os.ftruncate(self._fd, end)  # frees space, needs none
            except OSError:
                pass
            raise full(f"the metrics of step {step} to {self.path}", self.path, len(data), "",
                        "free some space (or move the run), then continue it with --resume") from e
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
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
