"""A grid's runs as the report and the stage-2 rule read them: per run, from its status and metrics.

* final accuracy   the mean of ``eval/accuracy`` over the run's last 3 evaluations (less sampling noise
                   than one). A run that diverged (NaN) delivers no model at its step budget: its final
                   accuracy counts as 0. A run stopped early for collapse keeps the accuracy it had
                   when stopped (it stops right after an evaluation).
* best accuracy    the highest ``eval/accuracy`` the run logged.
* collapse         :mod:`drpo.training.collapse` on the run's metrics (a diverged run counts).
* time to collapse the step its collapse began; a run that never collapsed is censored at its last step
                   (a run stopped for collapse stopped *after* it began, so its time is never censored).
* gradient-norm variance   the variance over steps of ``train/grad_norm`` (pre-clipping), per run.

A run has *ended* when its status says ``finished``, ``collapsed`` (stopped early), or ``failed`` with
cause ``diverged``; other states (interrupted, a dead rollout worker, a bug, a full disk) are runs to
resume, not results.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from drpo.training import run_io
from drpo.training.collapse import CollapseState, as_number, detect_collapse

FINAL_EVALS = 3  # final accuracy = mean of the last 3 evaluations


def ended(status: dict) -> bool:
    """Whether a run's status says it has a result (see the module docstring)."""
    state = status.get("state")
    return state in ("finished", "collapsed") or (state == "failed" and status.get("cause") == "diverged")


@dataclass
class RunResult:
    slug: str
    method: str
    setting: str
    seed: int
    state: str
    rows: list[dict] = field(repr=False)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], v) for r in self.rows if (v := as_number(r.get(key))) is not None]

    def step_mean(self, key: str) -> Optional[float]:
        vals = [v for _, v in self.series(key) if math.isfinite(v)]
        return float(np.mean(vals)) if vals else None

    @property
    def diverged(self) -> bool:
        return self.state == "failed"

    @cached_property
    def collapse(self) -> CollapseState:
        return detect_collapse(self.rows, diverged=self.diverged)

    @property
    def collapsed(self) -> bool:
        return self.collapse.collapsed

    @property
    def time_to_collapse(self) -> tuple[int, bool]:
        """(the step its collapse began, True), or (its last step, False) for a run that never collapsed:
        survival data, censored at the last step."""
        return (self.collapse.began, True) if self.collapsed else (self.last_step, False)

    @property
    def initial_acc(self) -> Optional[float]:
        acc = self.series("eval/accuracy")
        return acc[0][1] if acc and acc[0][0] == 0 else None

    @property
    def final_acc(self) -> Optional[float]:
        """Mean of the last :data:`FINAL_EVALS` evaluations (0 for a diverged run)."""
        if self.diverged:
            return 0.0
        acc = [v for step, v in self.series("eval/accuracy") if step > 0]
        return float(np.mean(acc[-FINAL_EVALS:])) if acc else None

    @property
    def best_acc(self) -> Optional[float]:
        acc = [v for _, v in self.series("eval/accuracy")]
        return max(acc) if acc else None

    def steps_to(self, target: float, censored_at: int) -> int:
        """The first evaluation step whose accuracy reaches ``target``; ``censored_at`` if none does."""
        for step, v in self.series("eval/accuracy"):
            if step > 0 and v >= target:
                return step
        return censored_at

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.rows), default=0)

    @property
    def eval_every(self) -> int:
        steps = [s for s, _ in self.series("eval/accuracy") if s > 0]
        return steps[1] - steps[0] if len(steps) >= 2 else (steps[0] if steps else 1)

    @property
    def grad_var(self) -> Optional[float]:
        g = [v for _, v in self.series("train/grad_norm") if math.isfinite(v)]
        return float(np.var(g, ddof=1)) if len(g) >= 2 else None


def load_run(out: Path, slug: str, method: str, setting: str, seed: int) -> Optional[RunResult]:
    """The run in ``out/slug`` if it has ended (a result), else None."""
    run_dir = Path(out) / slug
    status = run_io.read_status(run_dir)
    if not ended(status):
        return None
    return RunResult(slug, method, setting, seed, status["state"], run_io.read_metrics(run_dir / "metrics.jsonl"))


def load_runs(out: Path) -> tuple[dict, list[RunResult], list[str]]:
    """(manifest, runs that ended, slugs of runs that have not ended) of the grid in ``out``."""
    manifest = json.loads((Path(out) / "grid.json").read_text())
    done, pending = [], []
    for r in manifest["runs"]:
        run = load_run(Path(out), r["slug"], r["method"], r["setting"], r["seed"])
        if run is not None:
            done.append(run)
        else:
            pending.append(r["slug"])
    return manifest, done, pending


class Runs:
    """Runs indexed by (setting, method) -> {seed: RunResult}."""

    def __init__(self, runs: list[RunResult]) -> None:
        self.by: dict[tuple[str, str], dict[int, RunResult]] = defaultdict(dict)
        for r in runs:
            self.by[(r.setting, r.method)][r.seed] = r

    def per_seed(self, setting: str, method: str, f: Callable[[RunResult], Optional[float]]) -> dict[int, float]:
        return {s: v for s, r in self.by.get((setting, method), {}).items() if (v := f(r)) is not None}

    def methods(self, setting: str) -> list[str]:
        return [m for (s, m) in self.by if s == setting]

    def settings(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.by))
