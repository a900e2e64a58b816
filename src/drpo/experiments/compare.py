"""``drpo compare``: run a grid of (method, setting, seed) runs, resumably, then write the report.

    <out>/grid.json                       the manifest: the grid, every run's overrides and state
    <out>/<setting>/<method>/seed<k>/     one ordinary run directory per run (see drpo.training.run_io)
    <out>/report/README.md, *.png         the report (drpo.experiments.report)

Re-running the same command continues the grid: runs whose status.json says ``finished`` are
skipped, a run with a checkpoint that did not finish is resumed from it, and a run that stopped
before its first checkpoint is moved aside to ``<dir>.aborted`` and started again. A run that
diverges (NaN) is recorded as ``failed`` -- a collapse in the report -- and the grid goes on; so
does a run that raises anything else (state ``error``, with the message, reported at the end).
"""
from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from tqdm.auto import tqdm

from drpo.experiments.grids import SETTINGS, Grid, Run, build_grid, describe
from drpo.training import run_io
from drpo.training.config import RunConfig, load_config

MANIFEST = "grid.json"


def run_config(run: Run, out: Path):
    return load_config(None, list(run.overrides) + [f"out={out / run.slug}"])


def plan(run: Run, out: Path) -> str:
    """What to do with a run: 'skip' (finished or diverged), 'resume', 'restart' or 'start'.

    Raises ValueError when the run directory holds a run of another configuration (e.g. the grid's
    steps changed): continuing it would mix two experiments under one name.
    """
    run_dir = out / run.slug
    if not (run_dir / "config.yaml").exists():
        return "restart" if run_dir.exists() else "start"
    # validated, so that keys added to the config since (with their defaults) compare equal
    on_disk = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text())).model_dump(mode="json")
    wanted = run_config(run, out).model_dump(mode="json")
    if {k: v for k, v in on_disk.items() if k != "out"} != {k: v for k, v in wanted.items() if k != "out"}:
        raise ValueError(f"{run_dir} holds a run with another configuration than this grid's; "
                         f"use another --out (or delete that run) to run the grid as now defined")
    state = run_io.read_status(run_dir).get("state")
    if state in ("finished", "failed"):
        return "skip"
    return "resume" if run_io.latest_checkpoint(run_dir) is not None else "restart"


def execute(run: Run, out: Path, action: str) -> dict[str, Any]:
    """Run (or resume) one run to its end; never raises. Returns its manifest entry."""
    from transformers.utils import logging as hf_logging

    from drpo.training.trainer import Trainer, TrainingDiverged

    hf_logging.disable_progress_bar()  # checkpoint-writing bars would drown the grid's own bar
    run_dir = out / run.slug
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"slug": run.slug}
    try:
        if action == "restart":
            aside = run_dir.with_name(run_dir.name + ".aborted")
            shutil.rmtree(aside, ignore_errors=True)
            run_dir.rename(aside)
        Trainer(run_config(run, out), resume=action == "resume").train()
        entry["state"] = "finished"
    except TrainingDiverged as e:
        entry.update(state="failed", reason=str(e))
    except Exception as e:  # noqa: BLE001 -- one broken run must not stop the grid
        entry.update(state="error", reason=f"{type(e).__name__}: {e}")
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    return entry


def _write_manifest(out: Path, grid: Grid, entries: dict[str, dict[str, Any]]) -> None:
    data = grid.to_dict()
    for r in data["runs"]:
        r.update(entries.get(r["slug"], {}))
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / MANIFEST)


def run_grid(grid: Grid, out: Path, workers: int = 1) -> dict[str, dict[str, Any]]:
    """Run every unfinished run of ``grid`` under ``out``; returns {slug: manifest entry}."""
    out.mkdir(parents=True, exist_ok=True)
    actions = {r.slug: plan(r, out) for r in grid.runs}
    entries: dict[str, dict[str, Any]] = {}
    for r in grid.runs:
        st = run_io.read_status(out / r.slug)
        entries[r.slug] = {"state": st.get("state", "pending"), **({"reason": st["reason"]} if "reason" in st else {})}
    todo = [r for r in grid.runs if actions[r.slug] != "skip"]
    _write_manifest(out, grid, entries)

    bar = tqdm(total=len(grid.runs), initial=len(grid.runs) - len(todo), desc=f"grid {grid.name}",
               unit="run", dynamic_ncols=True)

    def record(entry: dict[str, Any]) -> None:
        entries[entry["slug"]] = entry
        _write_manifest(out, grid, entries)
        states = [e["state"] for e in entries.values()]
        bar.set_postfix(failed=states.count("failed"), errors=states.count("error"))
        bar.update(1)

    if workers <= 1:
        for r in todo:
            bar.set_description(f"grid {grid.name}: {r.slug}")
            record(execute(r, out, actions[r.slug]))
    else:
        # a fresh process per run (max_tasks_per_child=1): no state of one run (vLLM's in-process engine,
        # allocator caches) leaks into the next
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
            futures = [pool.submit(execute, r, out, actions[r.slug]) for r in todo]
            for f in as_completed(futures):
                record(f.result())
    bar.close()
    return entries


def run_compare(grid: str, out: Path, workers: int = 1, report: Optional[Path] = None, report_only: bool = False,
                *, seeds: Optional[int] = None, steps: Optional[int] = None, blocks: Optional[Sequence[str]] = None,
                overrides: Sequence[str] = (), estimate: Optional[float] = None) -> dict[str, Any]:
    """Run the grid (unless ``report_only``) and write the report to ``report`` (default ``out/report``).

    ``report_only`` rebuilds the report from the manifest of an earlier call in ``out``;
    ``estimate`` (seconds per run) only prints the run counts and the wall-clock estimate.
    Returns {"entries": {slug: manifest entry}, "report": path to README.md or None}.
    """
    from drpo.experiments.report import write_report

    out = Path(out)
    report_dir = Path(report) if report is not None else out / "report"
    command = f"drpo compare --out {out} --report-only" + (f" --report {report}" if report is not None else "")
    if report_only:
        if not (out / MANIFEST).exists():
            raise ValueError(f"--report-only: no {MANIFEST} under {out}; run the grid first")
        return {"entries": {}, "report": write_report(out, report_dir, command)}

    g = build_grid(grid, seeds=seeds, steps=steps, blocks=blocks, overrides=overrides)
    print(describe(g, estimate, workers))
    if estimate is not None:
        return {"entries": {}, "report": None}
    if g.needs_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            vllm_blocks = [b.name for b in g.blocks if any(SETTINGS[s].needs_vllm for s in b.settings)]
            raise ValueError(f"grid {g.name!r} has vLLM settings (blocks {vllm_blocks}) and vLLM is not installed "
                             "here: run it with .venv-vllm/bin/drpo (make setup-vllm), or keep the other blocks "
                             "with --blocks")
    entries = run_grid(g, out, workers)
    errors = {k: e["reason"] for k, e in entries.items() if e["state"] == "error"}
    for slug, reason in errors.items():
        print(f"run {slug} failed with an error (not a divergence): {reason}")
    return {"entries": entries, "report": write_report(out, report_dir, command)}
