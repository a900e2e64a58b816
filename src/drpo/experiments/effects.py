"""From runs to a claim's evidence: per-seed paired values, collapse counts, times to collapse, and the
verdicts of :mod:`drpo.experiments.claims` (the report and the sequential plan both read them here).

    paired_values   per (setting, seed) with both sides: treatment - control of the claim's metric
    claim_effect    the effect of a claim over some settings (paired t-interval, or collapse counts)
    survival        per run of some methods: (steps to collapse, collapsed?); a run that never collapsed is
                    censored at its last step (drpo.experiments.results.RunResult.time_to_collapse)
    verdicts        one verdict per claim (and per setting for ``per_setting`` claims)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from drpo.experiments import claims as C
from drpo.experiments import stats as S
from drpo.experiments.results import RunResult, Runs


@dataclass
class Verdict:
    claim: C.Claim
    scope: str        # the settings the effect pools
    effect: S.Effect
    verdict: str
    detail: str = ""  # e.g. the control chosen as "best"


def final(r: RunResult) -> Optional[float]:
    return r.final_acc


def side_values(runs: Runs, setting: str, names: tuple[str, ...], f: Callable[[RunResult], Optional[float]]
          ) -> tuple[dict[int, float], str]:
    """Per seed, the mean of ``f`` over the methods ``names`` (all must have the seed); a name
    'best:m1,m2' picks, in this setting, the method with the highest mean final accuracy."""
    label = "+".join(names)
    if len(names) == 1 and names[0].startswith("best:"):
        cands = [m for m in names[0][5:].split(",") if runs.by.get((setting, m))]
        if not cands:
            return {}, label
        best = max(cands, key=lambda m: np.mean(list(runs.per_seed(setting, m, final).values())))
        names, label = (best,), best
    per = [runs.per_seed(setting, m, f) for m in names]
    if not per or not all(per):
        return {}, label
    seeds = set.intersection(*(set(d) for d in per))
    return {s: float(np.mean([d[s] for d in per])) for s in seeds}, label


def time_target(runs: Runs, setting: str) -> Optional[float]:
    """The setting's target accuracy: step-0 accuracy + TIME_FRACTION x (best mean final - step-0)."""
    finals = [np.mean(list(d.values())) for m in runs.methods(setting) if (d := runs.per_seed(setting, m, final))]
    starts = [r.initial_acc for m in runs.methods(setting) for r in runs.by[(setting, m)].values()
              if r.initial_acc is not None]
    if not finals or not starts:
        return None
    start = float(np.mean(starts))
    return start + C.TIME_FRACTION * (max(finals) - start)


def _metric(runs: Runs, claim: C.Claim, setting: str) -> Callable[[RunResult], Optional[float]]:
    if claim.metric == "final_acc":
        return final
    if claim.metric == "grad_var":
        return lambda r: math.log(r.grad_var) if r.grad_var and r.grad_var > 0 else None
    target = time_target(runs, setting)
    if target is None:
        return lambda r: None
    return lambda r: math.log(r.steps_to(target, r.last_step + r.eval_every))


def paired_values(runs: Runs, claim: C.Claim, settings: tuple[str, ...]) -> tuple[list[float], str]:
    """Treatment minus control per (setting, seed) with both sides (log ratios for the log metrics), and
    which method 'best:' chose per setting."""
    values, notes = [], []
    for s in settings:
        f = _metric(runs, claim, s)  # (the time target of the treatment's setting serves both sides)
        t, _ = side_values(runs, s, claim.treatment, f)
        c, label = side_values(runs, claim.control_setting or s, claim.control, f)
        values += [t[k] - c[k] for k in sorted(set(t) & set(c))]
        if claim.control[0].startswith("best:") and c:
            notes.append(f"{s}: best fixed = {label}")
    return values, "; ".join(notes)


def side_runs(runs: Runs, settings: tuple[str, ...], names: tuple[str, ...]) -> list[RunResult]:
    """Every run of the methods ``names`` in ``settings`` (one side of a collapse claim)."""
    return [r for s in settings for m in names for r in runs.by.get((s, m), {}).values()]


def survival(rr: list[RunResult]) -> tuple[list[int], list[bool]]:
    """(steps to collapse or to censoring, collapsed?) of each run."""
    pairs = [r.time_to_collapse for r in rr]
    return [d for d, _ in pairs], [e for _, e in pairs]


def claim_effect(runs: Runs, claim: C.Claim, settings: tuple[str, ...]) -> tuple[S.Effect, str]:
    """The effect of ``claim`` over ``settings``: paired over seeds, or collapse counts."""
    if claim.metric == "collapse":
        t, c = side_runs(runs, settings, claim.treatment), side_runs(runs, settings, claim.control)
        return S.count_effect(sum(r.collapsed for r in t), len(t), sum(r.collapsed for r in c), len(c)), ""
    values, notes = paired_values(runs, claim, settings)
    return S.paired_effect(values, log_scale=claim.metric in C.LOG_METRICS), notes


def scopes(runs: Runs, claim: C.Claim) -> list[tuple[str, ...]]:
    """The settings each verdict of ``claim`` pools: all of its settings present, or one per setting."""
    present = tuple(s for s in claim.settings if s in runs.settings())
    return ([(s,) for s in present] if claim.per_setting else [present]) or [claim.settings]


def verdicts(runs: Runs, claims: tuple[C.Claim, ...]) -> list[Verdict]:
    out = []
    for claim in claims:
        for scope in scopes(runs, claim):
            e, detail = claim_effect(runs, claim, scope)
            out.append(Verdict(claim, ", ".join(scope), e, C.verdict(claim, e), detail))
    return out
