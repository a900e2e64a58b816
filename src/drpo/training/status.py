"""``<out>/status.json``: how the run stands (running, finished, interrupted, collapsed, failed, error: see
:mod:`drpo.training.lifecycle`), when, and why, padded to :data:`STATUS_BYTES` so that it can be rewritten in place
on a full disk."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from drpo.training.disk import full, is_disk_full


STATUS_BYTES = 4096  # status.json is padded (with spaces) to this size, so that it can be rewritten in place


def _write_new_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def write_status(run_dir: Path, state: str, **info: Any) -> None:
    """Write status.json: ``{"state": state, "time": ..., **info}``, padded to :data:`STATUS_BYTES`.

    Normally a new file replaces the old one (atomic). When the new file cannot be written for lack
    of space, the old status.json is overwritten in place instead -- its blocks are already there --
    with ``info["reason"]`` shortened if the whole would not fit in its size; so ``error`` can be
    recorded on a full disk. Raises :class:`DiskFull` when neither works."""
    status = {"state": state, "time": time.time(), **info}
    text = json.dumps(status, indent=1)
    path, tmp = run_dir / "status.json", run_dir / "status.json.tmp"
    try:
        _write_new_file(tmp, (text + " " * (STATUS_BYTES - 1 - len(text.encode())) + "\n").encode())
        os.replace(tmp, path)
        return
    except OSError as e:
        _remove(tmp)
        if not is_disk_full(e):
            raise
        error = e
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    data = _fit_status(status, size) if size else None
    if data is not None:
        try:
            with open(path, "r+b") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return
        except OSError as e:
            if not is_disk_full(e):
                raise
    raise full(str(path), path, None, "",
                "free some space (or move the run); the run's status is not recorded") from error


def _fit_status(status: dict[str, Any], size: int) -> Optional[bytes]:
    """``status`` as JSON padded to exactly ``size`` bytes, its ``reason`` shortened (ending in
    ``...``) as much as needed; None when it cannot fit."""
    reason = str(status.get("reason", ""))
    keep = len(reason)
    while True:
        shown = dict(status, reason=reason[:keep] + "...") if keep < len(reason) else status
        data = json.dumps(shown, indent=1).encode()
        if len(data) < size:
            return data + b" " * (size - 1 - len(data)) + b"\n"
        if keep == 0 or "reason" not in status:
            return None
        keep = max(0, min(keep - 1, keep - (len(data) - size + 1) - 3))


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def read_status(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "status.json"
    return json.loads(p.read_text()) if p.exists() else {}
