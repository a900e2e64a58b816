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

A full disk (or a used-up quota) while writing any of these files is :class:`DiskFull`, one line
naming the path, the free space and (when known) what was needed, and never leaves a partial file:
a checkpoint's temp folder is removed (the older checkpoints are untouched), a metrics row that did
not fit is cut off again, and status.json -- written padded to :data:`STATUS_BYTES` -- is
overwritten in place when a new file cannot be written, so that a run on a full disk can still
record ``error``.
"""
from __future__ import annotations

import errno
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


class DiskFull(OSError):
    """A run file could not be written: its disk is full (ENOSPC) or the quota used up (EDQUOT).

    path:   the file or folder being written
    free:   bytes free on its disk afterwards (after the partial file was removed)
    needed: about how many bytes the write needed, None when unknown
    The message is one line saying so, and what to do; ``errno`` is ENOSPC.
    """

    def __init__(self, message: str, path: os.PathLike | str, free: int, needed: Optional[int] = None) -> None:
        super().__init__(errno.ENOSPC, message)
        self.path, self.free, self.needed = Path(path), free, needed

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):
        return type(self), (self.strerror, str(self.path), self.free, self.needed)


LOW_SPACE_BYTES = 1 << 20  # a write that fails with less than this free failed for lack of space
_FULL_MESSAGES = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def free_bytes(path: Path) -> int:
    """Bytes available to this user on the disk holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def _size(n: Optional[int]) -> str:
    """``512 B``, ``3.2 KiB``, ``1.5 GiB``."""
    if n is None or n < 0:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def is_disk_full(error: BaseException, path: Optional[Path] = None) -> bool:
    """Whether ``error`` (or an error it was raised from) says the disk is full or the quota used
    up. Writers that do not say (torch.save: ``unexpected pos``) are recognised by the disk of
    ``path`` having less than :data:`LOW_SPACE_BYTES` free at once after they failed."""
    seen: set[int] = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(e) for m in _FULL_MESSAGES):
            return True
        e = e.__cause__ or e.__context__
    return path is not None and 0 <= free_bytes(path) < LOW_SPACE_BYTES


def _full(what: str, path: Path, needed: Optional[int], done: str, todo: str) -> DiskFull:
    free = free_bytes(path)
    need = f", about {_size(needed)} needed" if needed else ""
    return DiskFull(f"disk full: could not write {what} ({_size(free)} free{need}){done}; {todo}", path, free, needed)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as e:
            if not is_disk_full(e):
                raise
            try:
                os.ftruncate(self._fd, end)  # frees space, needs none
            except OSError:
                pass
            raise _full(f"the metrics of step {step} to {self.path}", self.path, len(data), "",
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
    raise _full(str(path), path, None, "",
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
    are the earlier policy versions a stale rollout still needs (``v<version>/<param>`` keys).

    On a full disk: :class:`DiskFull` -- before writing anything when the tensors alone need more
    than is free, else once a writer fails; the temp folder is removed either way (on any error),
    and the checkpoints written before are untouched."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    needed = checkpoint_bytes(model, optimizer, rollout_versions)
    before = latest_checkpoint(run_dir)
    kept = f" and {before.name} is intact" if before is not None else ""
    todo = "free some space (or move the run), then continue it with --resume"
    what = f"checkpoint step_{step} in {root}"
    if 0 <= free_bytes(run_dir) < needed:
        raise _full(what, run_dir, needed, f"; nothing was written{kept}", todo)
    try:
        root.mkdir(exist_ok=True)
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save({"step": step, "rng": rng_state(), **extra}, tmp / "state.pt")
        if rollout_versions:
            from safetensors.torch import save_file

            save_file({f"v{v}/{k}": t.contiguous() for v, sd in rollout_versions.items() for k, t in sd.items()},
                      str(tmp / ROLLOUT_VERSIONS))
    except BaseException as e:
        full = isinstance(e, Exception) and is_disk_full(e, run_dir)  # before the partial files are removed
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _full(what, run_dir, needed, f"; the partial checkpoint was removed{kept}", todo) from e
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def checkpoint_bytes(model, optimizer, rollout_versions: Optional[dict[int, dict[str, torch.Tensor]]] = None) -> int:
    """The bytes of the tensors a checkpoint holds (tied ones once): a lower bound of its size."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()

    for t in model.state_dict().values():
        add(t)
    for state in optimizer.state.values():
        for t in state.values():
            add(t)
    for sd in (rollout_versions or {}).values():
        for t in sd.values():
            add(t)
    return total


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
