"""One run of a grid: its configuration, what to do with it (:func:`plan`) and doing it (:func:`execute`).

Used by :mod:`drpo.experiments.compare` (the driver) and by :mod:`drpo.experiments.backends` (in the process
that trains the run: a local pool's or a Ray worker's), so that neither imports the other.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from drpo.experiments.grids import Run
from drpo.experiments.results import ended
from drpo.training import run_io
from drpo.training.config import RunConfig, load_config, with_legacy_defaults
from drpo.utils.errors import InputError

MANIFEST = "grid.json"


def run_config(run: Run, out: Path) -> RunConfig:
    return load_config(None, list(run.overrides) + [f"out={out / run.slug}"])


def plan(run: Run, out: Path) -> str:
    """What to do with a run: 'skip' (it ended: a result), 'resume', 'restart' or 'start'.

    Raises ValueError when the run directory holds a run of another configuration (e.g. the grid's
    steps changed): continuing it would mix two experiments under one name.
    """
    run_dir = out / run.slug
    if not (run_dir / "config.yaml").exists():
        return "restart" if run_dir.exists() else "start"
    # validated, so that keys added to the config since (with their defaults) compare equal
    # (a run saved before a key existed ran with its legacy value: :data:`drpo.training.config.LEGACY_DEFAULTS`)
    saved = with_legacy_defaults(yaml.safe_load((run_dir / "config.yaml").read_text()))
    on_disk = RunConfig.model_validate(saved).model_dump(mode="json")
    wanted = run_config(run, out).model_dump(mode="json")
    if {k: v for k, v in on_disk.items() if k != "out"} != {k: v for k, v in wanted.items() if k != "out"}:
        raise InputError(f"{run_dir} holds a run with another configuration than this grid's; "
                         f"use another --out (or delete that run) to run the grid as now defined")
    if ended(run_io.read_status(run_dir)):
        return "skip"
    return "resume" if run_io.latest_checkpoint(run_dir) is not None else "restart"


def execute(run: Run, out: Path, action: str) -> None:
    """Run (or resume) one run to its end, in its own process (a backend's); how it ended is in its status file."""
    from drpo.training.trainer import Trainer

    run_dir = out / run.slug
    if action == "restart":
        try:
            run_io.RunLock(run_dir).release()  # a folder in use by a live process is never moved
        except run_io.RunLocked:
            return
        aside = run_dir.with_name(run_dir.name + ".aborted")
        shutil.rmtree(aside, ignore_errors=True)
        run_dir.rename(aside)
    try:
        trainer = Trainer(run_config(run, out), resume=action == "resume")
    except Exception as e:  # noqa: BLE001 -- set-up failed: say so where the grid reads states
        run_dir.mkdir(parents=True, exist_ok=True)
        run_io.write_status(run_dir, "error", step=0, reason=f"{type(e).__name__}: {e}")
        return
    try:
        trainer.train()
    except BaseException:  # noqa: BLE001 -- the run's lifecycle wrote its status (and traceback.txt)
        pass
