"""Checkpoints: what a run needs to continue exactly, in files that load without running code.

    checkpoints/step_N/
        model.safetensors (or its shards and index), config.json, tokenizer files   the policy (save_pretrained)
        optimizer.safetensors          the optimizer's tensors; its settings and the scheduler's state are JSON
                                       in the file's metadata
        state.json                     :class:`CheckpointState`: the step, the configuration, the run's environment,
                                       the adaptive delta and the random generators' states
        rollout_versions.safetensors   the earlier policy versions a stale rollout still needs (staleness >= 1)

Written atomically (a temp folder, then a rename); a full disk is :class:`~drpo.training.disk.DiskFull` and leaves
the earlier checkpoints as they were. Read with safetensors and JSON only; the model's weights through the model
loader (:func:`drpo.models.loading.read_weights`: one file or shards). A checkpoint written before this format
(optimizer.pt and state.pt, torch pickles) is read with torch's restricted unpickler (``weights_only=True``:
containers, tensors, numbers, and the numpy arrays of an RNG state) and converted in memory; a pickle that asks for
anything else would run code when loaded, and is refused (:class:`UnsafeCheckpoint`, naming the file): never
loaded, and never passed over for an older checkpoint either.
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from drpo.models.loading import read_weights
from drpo.training import disk
from drpo.training.environment import RunEnvironment
from drpo.utils.errors import UserError, first_line

StateDict = dict[str, torch.Tensor]
FORMAT = 2  # state.json's "format"; 1: the torch pickles (optimizer.pt, state.pt) of earlier versions
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
ROLLOUT_VERSIONS = "rollout_versions.safetensors"
LEGACY_OPTIMIZER, LEGACY_STATE = "optimizer.pt", "state.pt"


class UnsafeCheckpoint(UserError):
    """A checkpoint file that would run code if loaded (a pickle of more than tensors and numbers)."""


# ------------------------------------------------------------------ the state


def rng_state() -> dict[str, Any]:
    """The states of Python's, numpy's and torch's random generators, as JSON."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {"python": [version, list(internal), gauss],
            "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = s["numpy"]
    np.random.set_state({**np_state, "state": {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(s["torch"])), dtype=torch.uint8))


@dataclass(frozen=True)
class CheckpointState:
    """What a checkpoint holds besides tensors (``state.json``).

    step         the steps done
    config       the run's configuration (``RunConfig.model_dump(mode="json")``): what --resume compares against
    environment  the run's environment (threads, CPU kernels, memory policy): what a resumed run compares
    delta        the adaptive delta's value (objective.params.delta=auto), None otherwise
    rng          :func:`rng_state` after the step
    """

    step: int
    config: dict[str, Any]
    environment: RunEnvironment
    delta: Optional[float]
    rng: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CheckpointState":
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"state.json has format {d.get('format')!r}, this drpo reads {FORMAT}")
        return cls(step=int(d["step"]), config=d["config"], environment=RunEnvironment(**d["environment"]),
                   delta=d["delta"], rng=d["rng"])


@dataclass
class Checkpoint:
    """A checkpoint read in full: ``model`` weights, the optimizer's and scheduler's state dicts, the rollout
    versions (``{version: weights}``) and its :class:`CheckpointState`."""

    path: Path
    state: CheckpointState
    model: StateDict
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rollout_versions: dict[int, StateDict]


# ------------------------------------------------------------------ optimizer state as tensors + JSON


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """The optimizer's tensors (``<param index>/<name>``) in a safetensors file whose metadata holds the rest of
    its state dict and the scheduler's, as JSON."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for i, entry in sd["state"].items():
        plain[str(i)] = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{i}/{k}"] = v.detach().contiguous()
            else:
                plain[str(i)][k] = v
    meta = {"state": plain, "param_groups": sd["param_groups"], "scheduler": scheduler.state_dict()}
    save_file(tensors, str(path), metadata={"drpo": json.dumps(meta)})


def read_optimizer(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state dict, scheduler state dict) from :func:`save_optimizer`'s file (JSON lists where the
    optimizer had tuples: :func:`restore_optimizer` puts them back)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["drpo"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, t in tensors.items():
        i, name = key.split("/", 1)
        state.setdefault(int(i), {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}, meta["scheduler"]


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler, ckpt: "Checkpoint") -> None:
    """Load a checkpoint's optimizer and scheduler states (settings that are tuples in ``optimizer`` are tuples
    again: JSON had lists)."""
    live = optimizer.param_groups
    groups = [{k: tuple(v) if isinstance(live[min(g, len(live) - 1)].get(k), tuple) else v for k, v in group.items()}
              for g, group in enumerate(ckpt.optimizer["param_groups"])]
    optimizer.load_state_dict({**ckpt.optimizer, "param_groups": groups})
    scheduler.load_state_dict(ckpt.scheduler)


# ------------------------------------------------------------------ earlier checkpoints (torch pickles)

# what the pickles of earlier checkpoints hold besides containers, tensors and numbers: numpy's RNG state
_LEGACY_GLOBALS = [getattr(np, "_core", np).multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with numpy's RNG arrays allowed; a pickle that asks for anything
    else is :class:`UnsafeCheckpoint` (nothing of it runs)."""
    try:
        with torch.serialization.safe_globals(_LEGACY_GLOBALS):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it calls {wanted.group(1)}" if wanted else "it holds more than tensors and numbers"
        raise UnsafeCheckpoint(f"{path} would run code if loaded ({what}); drpo loads no such file. "
                               "If you made it yourself with an earlier drpo, check where it has been; a checkpoint "
                               "from anyone else: start a new run instead") from None


def _legacy(ckpt: Path) -> tuple[CheckpointState, dict, dict]:
    """(state, optimizer state dict, scheduler state dict) of a checkpoint in the pickle format (FORMAT 1)."""
    s = safe_torch_load(ckpt / LEGACY_STATE)
    opt = safe_torch_load(ckpt / LEGACY_OPTIMIZER)
    if not isinstance(s, dict) or "step" not in s:
        raise ValueError(f"{LEGACY_STATE} holds no step")
    rng = s["rng"]
    bit_generator, key, pos, has_gauss, gauss = rng["numpy"]
    version, internal, python_gauss = rng["python"]
    state = CheckpointState(
        step=int(s["step"]), config=s["config"], delta=s.get("delta"),
        environment=RunEnvironment(threads=s.get("threads"), cpu_capability=s.get("cpu_capability"),
                                   keep_freed_memory=None),
        rng={"python": [version, list(internal), python_gauss],
             "numpy": {"bit_generator": bit_generator, "state": {"key": np.asarray(key).tolist(), "pos": int(pos)},
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": base64.b64encode(rng["torch"].numpy().tobytes()).decode("ascii")})
    return state, opt["optimizer"], opt["scheduler"]


# ------------------------------------------------------------------ writing and reading


def checkpoint_bytes(model, optimizer, rollout_versions: Optional[dict[int, StateDict]] = None) -> int:
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


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, scheduler, state: CheckpointState,
                    rollout_versions: Optional[dict[int, StateDict]] = None) -> Path:
    """Write checkpoints/step_<state.step> atomically (temp folder, then rename). ``rollout_versions`` are the
    earlier policy versions a stale rollout still needs (``v<version>/<param>`` keys).

    On a full disk: :class:`~drpo.training.disk.DiskFull` -- before writing anything when the tensors alone need
    more than is free, else once a writer fails; the temp folder is removed either way (on any error), and the
    checkpoints written before are untouched."""
    root = run_dir / "checkpoints"
    final = root / f"step_{state.step}"
    tmp = root / f".tmp_step_{state.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    needed = checkpoint_bytes(model, optimizer, rollout_versions)
    before = latest_checkpoint(run_dir)
    kept = f" and {before.name} is intact" if before is not None else ""
    todo = "free some space (or move the run), then continue it with --resume"
    what = f"checkpoint step_{state.step} in {root}"
    if 0 <= disk.free_bytes(run_dir) < needed:
        raise disk.full(what, run_dir, needed, f"; nothing was written{kept}", todo)
    try:
        root.mkdir(exist_ok=True)
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_optimizer(tmp / OPTIMIZER, optimizer, scheduler)
        _write_text(tmp / STATE, state.to_json())
        if rollout_versions:  # copies: a version's tensors may be views of one buffer, which safetensors refuses
            save_file({f"v{v}/{k}": t.clone() for v, sd in rollout_versions.items() for k, t in sd.items()},
                      str(tmp / ROLLOUT_VERSIONS))
    except BaseException as e:
        full = isinstance(e, Exception) and disk.is_disk_full(e, run_dir)  # before the partial files are removed
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk.full(what, run_dir, needed, f"; the partial checkpoint was removed{kept}", todo) from e
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def read_checkpoint(ckpt: Path) -> Checkpoint:
    """Everything in a checkpoint folder, read fully (so that a truncated or empty file fails here). A checkpoint of
    the pickle format is read safely and converted (module docstring)."""
    if (ckpt / STATE).exists() or not (ckpt / LEGACY_STATE).exists():
        state = CheckpointState.from_json((ckpt / STATE).read_text(encoding="utf-8"))
        opt, sched = read_optimizer(ckpt / OPTIMIZER)
    else:
        state, opt, sched = _legacy(ckpt)
    return Checkpoint(ckpt, state, read_weights(ckpt), opt, sched, load_rollout_versions(ckpt))


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


def latest_valid_checkpoint(run_dir: Path, warn: Callable[[str], None] = print) -> Optional[Checkpoint]:
    """The newest checkpoint that reads completely; unreadable newer ones are reported with ``warn`` and skipped
    (never deleted). One that would run code stops the search: :class:`UnsafeCheckpoint`."""
    for ckpt in reversed(checkpoints(run_dir)):
        try:
            return read_checkpoint(ckpt)
        except UnsafeCheckpoint:
            raise
        except Exception as e:  # noqa: BLE001 -- any unreadable file makes the checkpoint unusable
            warn(f"checkpoint {ckpt.name} cannot be read ({type(e).__name__}: {first_line(e) if str(e) else 'empty'}); "
                 "trying an older one")
    return None


def load_rollout_versions(ckpt: Path) -> dict[int, StateDict]:
    """The policy versions saved by :func:`save_checkpoint` (empty for a synchronous run)."""
    path = ckpt / ROLLOUT_VERSIONS
    if not path.exists():
        return {}
    out: dict[int, StateDict] = {}
    for key, t in load_file(str(path)).items():
        v, name = key.split("/", 1)
        out.setdefault(int(v[1:]), {})[name] = t
    return out
