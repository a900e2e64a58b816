"""A run directory: resolved config, metrics (JSONL + TensorBoard) and checkpoints.

    <out>/config.yaml            the resolved configuration
    <out>/metrics.jsonl          one JSON object per step, flushed and fsynced as written
    <out>/tb/                    TensorBoard event files
    <out>/checkpoints/step_N/    model (safetensors), tokenizer, optimizer.pt, state.pt
    <out>/status.json            running / finished / failed / interrupted, with the message
    <out>/.lock                  held (flock) by the process running the run; holds its pid

Metrics are append-only. On ``--resume`` from step N, lines of steps > N (logged after the last
checkpoint, and about to be recomputed) are moved to ``metrics.replaced.jsonl``, never dropped.

One process at a time: :class:`RunLock` takes an exclusive ``flock`` on ``<out>/.lock``; a second
process gets :class:`RunLocked` at once. The kernel releases the lock when its process dies, so a
lock left by a killed run is taken over (and said so). Resuming checks that the configuration did
not change except for :data:`RESUME_SAFE_KEYS` (:func:`check_resume_config`), and falls back past a
checkpoint that cannot be read (:func:`latest_valid_checkpoint`).
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


class RunLocked(RuntimeError):
    """Another live process is running in this run directory."""


class RunLock:
    """An exclusive lock on a run directory for the life of this object (or of the process)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.previous_owner: Optional[int] = None  # pid of a dead process whose lock was taken over
        self._fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            owner = self._fh.read().strip() or "another process"
            self._fh.close()
            raise RunLocked(f"{run_dir} is in use by {owner}; wait for it to end, or choose another --out") from None
        self._fh.seek(0)
        old = self._fh.read().split()
        if old and old[0] == "pid" and len(old) > 1 and old[1].isdigit() and int(old[1]) != os.getpid():
            self.previous_owner = int(old[1])
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.seek(0)
            self._fh.truncate()
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()


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


ROLLOUT_VERSIONS = "rollout_versions.safetensors"


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler,
                    extra: dict[str, Any], rollout_versions: Optional[dict[int, dict[str, torch.Tensor]]] = None
                    ) -> Path:
    """Write checkpoints/step_<step> atomically (temp folder, then rename). ``rollout_versions``
    are the earlier policy versions a stale rollout still needs (``v<version>/<param>`` keys)."""
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
    if rollout_versions:
        from safetensors.torch import save_file

        save_file({f"v{v}/{k}": t.contiguous() for v, sd in rollout_versions.items() for k, t in sd.items()},
                  str(tmp / ROLLOUT_VERSIONS))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint folders of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    steps = sorted((int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.name.split("_")[1].isdigit())
    return [p for _, p in steps]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def read_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Everything in a checkpoint folder, read fully (so that a truncated or empty file fails here):
    model state, optimizer/scheduler states, step and RNG, rollout versions."""
    from safetensors.torch import load_file

    return {"model": load_file(str(ckpt / "model.safetensors")),
            "optimizer": torch.load(ckpt / "optimizer.pt", weights_only=False),
            "state": torch.load(ckpt / "state.pt", weights_only=False),
            "rollout_versions": load_rollout_versions(ckpt)}


def latest_valid_checkpoint(run_dir: Path, warn=print) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint that reads completely, and its contents; unreadable newer ones are
    reported with ``warn`` and skipped (never deleted)."""
    for ckpt in reversed(checkpoints(run_dir)):
        try:
            data = read_checkpoint(ckpt)
            if not isinstance(data["state"], dict) or "step" not in data["state"]:
                raise ValueError("state.pt holds no step")
            return ckpt, data
        except Exception as e:  # noqa: BLE001 -- any unreadable file makes the checkpoint unusable
            warn(f"checkpoint {ckpt.name} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty'}); "
                 "trying an older one")
    return None


# keys that may differ on --resume: they change what is logged or when, not what is computed
# (task.reward_timeout only bounds how long a reward call may take: a run that finished is unchanged by it)
RESUME_SAFE_KEYS = ("train.steps", "eval.", "save_every", "progress", "tensorboard", "out", "task.reward_timeout")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "params" and not (prefix == "train." and k == "rollout_correction"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict[str, Any], wanted: dict[str, Any], resumed_step: int) -> None:
    """Refuse to resume with a configuration that differs from the saved one, except for
    :data:`RESUME_SAFE_KEYS`; ``train.steps`` may only grow, and never below the resumed step."""
    a, b = _flatten(saved), _flatten(wanted)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                     and not any(k == s or (s.endswith(".") and k.startswith(s)) for s in RESUME_SAFE_KEYS))
    if changed:
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed)
        raise ValueError(f"--resume with a changed configuration ({detail}); only "
                         f"{', '.join(s.rstrip('.') + ('.*' if s.endswith('.') else '') for s in RESUME_SAFE_KEYS)} "
                         "may change. Start a new run (another --out) to change the others")
    steps_saved, steps_new = a.get("train.steps"), b.get("train.steps")
    if steps_new is not None and steps_saved is not None and steps_new < steps_saved:
        raise ValueError(f"--resume with train.steps={steps_new} below the run's {steps_saved}: train.steps may only grow")
    if steps_new is not None and steps_new < resumed_step:
        raise ValueError(f"--resume: train.steps={steps_new} is below the checkpoint's step {resumed_step}")


def load_rollout_versions(ckpt: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The policy versions saved by :func:`save_checkpoint` (empty for a synchronous run)."""
    path = ckpt / ROLLOUT_VERSIONS
    if not path.exists():
        return {}
    from safetensors.torch import load_file

    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path)).items():
        v, name = key.split("/", 1)
        out.setdefault(int(v[1:]), {})[name] = t
    return out
