"""``drpo compare``: run a grid of (method, setting, seed) runs, resumably, then write the report.

    <out>/grid.json                       the manifest: the grid, every run's overrides and state
    <out>/<setting>/<method>/seed<k>/     one ordinary run directory per run (see drpo.training.run_io)
    <out>/report/README.md, *.png         the report (drpo.experiments.report)
    <out>/.lock                           held by the drpo compare working in this folder

Each run is a fresh process: on this machine (``spawn``, ``--workers N`` at once), or a Ray task on a
cluster (``--backend ray``: :mod:`drpo.experiments.backends`). Re-running the same command
continues the grid: runs that ended (finished, stopped early for collapse, or diverged: results) are
skipped; a run with a checkpoint that did not end (interrupted, its rollout worker died, a bug, a full
disk) is resumed from it; one that stopped before its first checkpoint is moved aside to
``<dir>.aborted`` and started again. One broken run never stops the grid.

The folder belongs to one ``drpo compare`` at a time (a second one exits at once, naming the holder),
and the manifest's states are always read back from the runs' own status files, so ``grid.json``
agrees with the runs on disk. Ctrl-C or SIGTERM cancels the queue, lets the runs in flight stop after
their current step with a checkpoint (status ``interrupted``), prints how to resume, and exits 130.
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from tqdm.auto import tqdm

from drpo.experiments.backends import Backend, check_backend, make_backend
from drpo.experiments.grids import Grid, Run, build_grid, describe
from drpo.experiments.results import ended
from drpo.experiments.runner import MANIFEST, execute, plan, run_config  # noqa: F401 (run_config: re-exported)
from drpo.experiments.selection import write_choice
from drpo.experiments.study import SETTINGS
from drpo.training import run_io
from drpo.training.config import RunConfig, load_config
from drpo.utils.errors import InputError

class GridInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the grid; the message says how to resume."""


def _state(out: Path, run: Run) -> dict[str, Any]:
    """A run's manifest entry, read from its status file (the one source of truth)."""
    st = run_io.read_status(out / run.slug)
    return {"state": st.get("state", "pending"), **{k: st[k] for k in ("reason", "cause", "step") if k in st}}


def write_manifest(out: Path, grid: Grid) -> dict[str, dict[str, Any]]:
    """grid.json: the grid and every run's state as its status file says; returns {slug: entry}."""
    data = grid.to_dict()
    entries = {}
    for r, d in zip(grid.runs, data["runs"]):
        entries[r.slug] = _state(out, r)
        d.update(entries[r.slug])
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / MANIFEST)
    return entries


def run_grid(grid: Grid, out: Path, workers: Optional[int] = None, backend: str = "local",
             address: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """Run every run of ``grid`` under ``out`` that has not ended, ``workers`` at once (None: the backend's
    default) on ``backend`` (drpo.experiments.backends; ``address``: the Ray cluster's); returns
    {slug: manifest entry}."""
    check_backend(backend, address)
    out.mkdir(parents=True, exist_ok=True)
    lock = run_io.RunLock(out)
    try:
        pool = make_backend(backend, workers, address)
        try:
            return _run_locked(grid, out, pool)
        finally:
            pool.close()
    finally:
        lock.release()


def _run_locked(grid: Grid, out: Path, pool: Backend) -> dict[str, dict[str, Any]]:
    actions = {r.slug: plan(r, out) for r in grid.runs}
    todo = [r for r in grid.runs if actions[r.slug] != "skip"]
    entries = write_manifest(out, grid)
    bar = tqdm(total=len(grid.runs), initial=len(grid.runs) - len(todo), desc=f"grid {grid.name}",
               unit="run", dynamic_ncols=True)
    running: set[str] = set()
    queue = list(todo)
    t0 = time.monotonic()

    def on_term(signum, frame) -> None:
        raise GridInterrupted()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        while queue or running:
            while queue and len(running) < pool.slots:
                r = queue.pop(0)
                pool.start(r, out, actions[r.slug])
                running.add(r.slug)
            for slug in pool.wait():
                running.discard(slug)
                entries = write_manifest(out, grid)
                states = [e["state"] for e in entries.values()]
                bar.set_postfix(collapsed=states.count("collapsed"), failed=states.count("failed"),
                                errors=states.count("error"), h=f"{(time.monotonic() - t0) / 3600:.2f}")
                bar.update(1)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (GridInterrupted)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the runs' checkpoints short
        stopped = pool.stop()  # the runs in flight stop after their current step, with a checkpoint
        write_manifest(out, grid)
        raise GridInterrupted(f"stopped: {len(queue) + len(running) - stopped} queued runs cancelled, {stopped} in "
                              f"flight stopped after their current step") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    return write_manifest(out, grid)


def run_compare(grid: str, out: Path, workers: Optional[int] = None, report: Optional[Path] = None,
                report_only: bool = False, *, seeds: Optional[int] = None, steps: Optional[int] = None,
                blocks: Optional[Sequence[str]] = None, overrides: Sequence[str] = (),
                estimate: Optional[float] = None, map_dir: Optional[Path] = None, backend: str = "local",
                address: Optional[str] = None) -> dict[str, Any]:
    """Run the grid (unless ``report_only``) and write the report to ``report`` (default ``out/report``).

    ``report_only`` rebuilds the report from the runs in ``out`` (and the manifest from the grid named,
    with the runs' states on disk); ``estimate`` (seconds per run) only prints the run counts and the
    wall-clock estimate; ``map_dir``: stage 2 (``--grid decide``) chooses its cells from this map;
    ``backend``, ``address``, ``workers``: where the runs run and how many at once (:func:`run_grid`).
    Returns {"entries": {slug: manifest entry}, "report": path to README.md or None}.
    """
    from drpo.experiments.report import write_report

    out = Path(out)
    report_dir = Path(report) if report is not None else out / "report"
    def grid_now() -> Grid:  # a sequential grid grows look by look, from the runs that ended in ``out``
        return build_grid(grid, seeds=seeds, steps=steps, blocks=blocks, overrides=overrides, map_dir=map_dir,
                          runs_dir=out if grid == "sequential" else None)

    g = grid_now()
    command = (f"drpo compare --grid {shown(grid)} --out {shown(out)}" + (f" --map {shown(map_dir)}" if map_dir else "")
               + " --report-only" + (f" --report {shown(report)}" if report is not None else ""))
    if report_only:
        if not any((out / r.slug / "status.json").exists() for r in g.runs):
            raise InputError(f"--report-only: no run of grid {g.name!r} under {out}; run the grid first")
        try:
            with _held(out):
                write_manifest(out, g)
        except run_io.RunLocked:
            pass  # a drpo compare is running in this folder and keeps grid.json current itself
        return {"entries": {}, "report": write_report(out, report_dir, command, map_dir=map_dir)}
    check_backend(backend, address)
    print(describe(g, estimate, workers or 1))
    if estimate is not None:
        return {"entries": {}, "report": None}
    if g.needs_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            vllm_blocks = [b.name for b in g.blocks if any(SETTINGS[s].needs_vllm for s in b.settings)]
            raise InputError(f"grid {g.name!r} has vLLM settings (blocks {vllm_blocks}) and vLLM is not installed "
                             "here: run it with .venv-vllm/bin/drpo (make setup-vllm), or keep the other blocks "
                             "with --blocks")
    if g.choice is not None:
        write_choice(map_dir, g.choice)
    entries = run_grid(g, out, workers, backend, address)
    while g.kind == "sequential":  # the next look's block: seeds for the comparisons still open
        nxt = grid_now()
        if {r.slug for r in nxt.runs} == {r.slug for r in g.runs}:
            break
        print(describe(nxt, None, workers or 1))
        g, entries = nxt, run_grid(nxt, out, workers, backend, address)
    for slug, e in entries.items():
        if not ended(e):
            print(f"run {slug} did not end: {e['state']}" + (f" ({e['reason']})" if "reason" in e else ""))
    return {"entries": entries, "report": write_report(out, report_dir, command, map_dir=map_dir)}


def shown(path) -> str:
    """A path as the report's rebuild command shows it: relative to the working folder when inside it, so
    that a committed report names no folder of the machine it was made on."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve())) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


class _held:
    """The grid folder's lock for a block (a report rebuilt while a grid runs would read half-written states)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self):
        self.lock = run_io.RunLock(self.out)
        return self.lock

    def __exit__(self, *exc) -> None:
        self.lock.release()
