"""Seeds added by a plan fixed before they run: a group-sequential study at stage 2's cell A.

Why. Stage 2 (docs/compare/two_stage) left most verdicts at cell A (lr 1e-3, staleness 4, FP8 rollout: the
mildest cell where PG-IS collapsed in every seed of the map) undecided at 5 seeds. Here seeds are added to
those comparisons in blocks, each comparison stopping when it decides, for futility, or at the cap. This
plan, its claims and its rules were committed before any of its runs started (git log of this file).

The comparisons (claims of :func:`drpo.experiments.claims.decide_claims`, stressed regime, at :data:`CELL`
alone) and the test each one stops on:

    (a)  DRPO delta 12.5 vs GRPO clip-higher + DPPO Binary-TV, final accuracy, claimed +3 points   paired
    (j)  DRPO delta 12.5 alike PG-IS within 3 points of final accuracy (equivalence)               paired
    (k)  DRPO delta 0.15 collapses less than PG-IS                                                 log-rank
    (l)  the paper's comparison at one delta: DRPO 0.15 collapses less than DPPO Binary-TV 0.15    log-rank
    (m)  the same pair on final accuracy (DRPO 0.15 higher)                                        paired

Design. :data:`LOOKS` looks, after each block of :data:`BLOCK` new seeds per method (n = 5, 10, 15 seeds per
method: :data:`SEEDS`, never used before: the quick grid uses 0-1, the map 100-101, stage 2 200-204). The
information fraction of look k is t_k = n_k / N (N = the cap, 15). Each comparison keeps a two-sided error
rate of :data:`ALPHA` (per comparison, as every verdict of this project) by O'Brien-Fleming-type alpha
spending (Lan-DeMets; :func:`drpo.experiments.stats.group_sequential_bounds`): z boundaries c_k = 3.71, 2.51,
1.99 at t = 1/3, 2/3, 1.

* log-rank comparisons: the log-rank z on the time to collapse of all runs of each side (a run that did not
  collapse is censored at its last step); positive when the treatment survives longer. Decide at look k when
  |z| >= c_k: *reproduced* if z >= c_k, *contradicted* if z <= -c_k.
* paired comparisons: the per-seed differences of final accuracy (treatment - control, the control of (a) the
  mean of its two methods); the repeated confidence interval RCI_k = mean +- c'_k sd / sqrt(n), where c'_k is
  the t quantile (n - 1 df) of the same nominal level as c_k (Jennison & Turnbull 1999, 3.8). RCIs cover the
  effect at every look at once with probability >= 95%, so the claim's own verdict rule applied to the RCI
  (:func:`drpo.experiments.claims.verdict`: reproduced, contradicted, equivalent, smaller than claimed)
  decides at look k as soon as it is not *inconclusive*.
* futility (non-binding, so it cannot raise the error rate): at an interim look from t >= 1/2 on (here look 2),
  stop when the conditional power under the current trend -- the chance that the cap decides, if the effect
  and spread seen so far continue -- is below :data:`FUTILITY_POWER`. For log-rank: the final z is normal with
  mean z_k / sqrt(t_k) and variance 1 - t_k; for paired: the final mean is normal with mean m_k and variance
  sd^2 (N - n_k) / N^2, judged with the cap's RCI.
* at the cap a comparison ends with its last look's verdict (*inconclusive* if none decided).
* a method gets the next block of seeds while some open comparison uses it; the log-rank information
  fraction is taken as n_k / N (seeds), not events: fixed in advance, not read from the data.

Budget (the arithmetic that sized N): timed on the machine this plan was made on, under the load of other
work (2-3x an idle machine's step time), one 100-step run at cell A took about 9 minutes for a method that
does not collapse (GRPO clip-higher, DPPO-TV) and 3-6 for one stopped for collapse (DRPO 12.5, PG-IS; a
collapsed run's responses run to the token limit, so its steps are slower): about 32 run-minutes per seed of
the five methods, 16 minutes with 2 workers, 80 minutes per block of 5 seeds. Three blocks of all five
methods (the worst case: nothing stops before the cap) take 4 h; comparisons that stop at look 2 drop their
methods from block 3, and an idle machine halves all of it: N = 15 fits about 3 hours of grid time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import stats as sps

from drpo.experiments import claims as C
from drpo.experiments import effects as E
from drpo.experiments import stats as S
from drpo.experiments import results as R
from drpo.experiments.results import Runs
from drpo.experiments.study import CALM, Cell

CELL = Cell(1e-3, 4, "fp8")  # stage 1's cell A (docs/compare/two_stage), by the stage-2 rule on PG-IS's runs
METHODS = ("pg_is", "dapo", "dppo_tv", "drpo", "drpo_d0.15")
COMPARISONS = ("a", "j", "k", "l", "m")
BLOCK = 5
LOOKS = 3
SEEDS = tuple(range(1000, 1000 + BLOCK * LOOKS))
STEPS = 100  # as stage 2's runs
ALPHA = 0.05
FUTILITY_POWER = 0.10
FUTILITY_FROM = 0.5  # information fraction from which the futility rule applies


def claims() -> tuple[C.Claim, ...]:
    """The comparisons: stage 2's claims of :data:`COMPARISONS` in the stressed regime, at :data:`CELL`."""
    chosen = {c.id: c for c in C.decide_claims(CALM, (CELL.name,)) if c.regime == "stressed" and c.id in COMPARISONS}
    return tuple(chosen[i] for i in COMPARISONS)


def test_of(claim: C.Claim) -> str:
    if claim.metric == "collapse":
        return "log-rank"
    if claim.metric == "final_acc":
        return "paired"
    raise ValueError(f"claim {claim.id!r}: the sequential plan tests collapse and final accuracy, not {claim.metric}")


def methods_of(claim: C.Claim) -> set[str]:
    return {n for side in (claim.treatment, claim.control) for x in side for n in x.removeprefix("best:").split(",")}


def fractions() -> list[float]:
    return [(k + 1) / LOOKS for k in range(LOOKS)]


_BOUNDS: dict[tuple, list[float]] = {}


def bounds() -> list[float]:
    """The z boundaries c_1..c_K of the plan (computed once)."""
    key = (tuple(fractions()), ALPHA)
    if key not in _BOUNDS:
        _BOUNDS[key] = S.group_sequential_bounds(fractions(), ALPHA)
    return _BOUNDS[key]


@dataclass
class Look:
    """One comparison at one look: ``n`` seeds per method; ``statistic`` (log-rank z, or the paired mean) with
    its boundary (``bound``: c_k for z; the RCI's half-width for paired); ``decision``: a verdict, 'continue',
    'futility', or 'inconclusive' (at the cap); ``power``: the conditional power of the futility rule."""

    look: int
    n: int
    statistic: float
    bound: float
    lo: float = float("nan")
    hi: float = float("nan")
    decision: str = "continue"
    power: float = float("nan")
    detail: str = ""


def _restrict(runs: Runs, seeds: set[int]) -> Runs:
    return Runs([r for by_seed in runs.by.values() for s, r in by_seed.items() if s in seeds])


def _t_bound(c: float, df: int) -> float:
    """The t quantile (``df`` degrees of freedom) of the nominal level of the z boundary c."""
    return float(sps.t.isf(sps.norm.sf(c), df))


def _paired_decision(claim: C.Claim, mean: float, half: float, n: int) -> str:
    e = S.Effect(mean, mean - half, mean + half, n, float("nan"))
    return C.verdict(claim, e)


def _power_logrank(z: float, t: float, c_final: float) -> float:
    mean, sd = z / math.sqrt(t), math.sqrt(1 - t)
    return float(sps.norm.sf((c_final - mean) / sd) + sps.norm.cdf((-c_final - mean) / sd))


def _power_paired(claim: C.Claim, mean: float, sd: float, n: int) -> float:
    """P(the cap's RCI decides), the final mean ~ N(mean, sd^2 (N - n) / N^2) (the current trend)."""
    N = len(SEEDS)
    spread = sd * math.sqrt(N - n) / N
    half = _t_bound(bounds()[-1], N - 1) * sd / math.sqrt(N)
    if spread == 0:
        return float(_paired_decision(claim, mean, half, N) != "inconclusive")
    z = np.linspace(-8, 8, 3201)
    decided = np.array([_paired_decision(claim, mean + spread * x, half, N) != "inconclusive" for x in z])
    weight = sps.norm.pdf(z)
    return float(np.sum(weight * decided) / np.sum(weight))


def look(runs: Runs, claim: C.Claim, k: int) -> Optional[Look]:
    """Comparison ``claim`` at look ``k`` (1-based) on the seeds of blocks 1..k; None until every run of
    those seeds of its methods has ended."""
    seeds = set(SEEDS[:k * BLOCK])
    for m in methods_of(claim):
        if not seeds <= set(runs.by.get((CELL.name, m), {})):
            return None
    sub = _restrict(runs, seeds)
    c, t, final = bounds()[k - 1], fractions()[k - 1], k == LOOKS
    if test_of(claim) == "log-rank":
        d1, e1 = E.survival(E.side_runs(sub, (CELL.name,), claim.treatment))
        d2, e2 = E.survival(E.side_runs(sub, (CELL.name,), claim.control))
        _, p, z = S.logrank(d1, e1, d2, e2, horizon=STEPS)
        out = Look(k, len(seeds), z, c, detail=f"{sum(e1)}/{len(e1)} vs {sum(e2)}/{len(e2)} collapsed; nominal p = {p:.3g}")
        out.decision = "reproduced" if z >= c else "contradicted" if z <= -c else "continue"
        if out.decision == "continue" and not final and t >= FUTILITY_FROM:
            out.power = _power_logrank(z, t, bounds()[-1])
    else:
        values, _ = E.paired_values(sub, claim, (CELL.name,))
        v = np.asarray(values, dtype=float)
        n, mean, sd = v.size, float(v.mean()), float(v.std(ddof=1))
        half = _t_bound(c, n - 1) * sd / math.sqrt(n)
        out = Look(k, n, mean, half, mean - half, mean + half, detail=f"sd {sd:.3f}")
        verdict = _paired_decision(claim, mean, half, n)
        out.decision = verdict if verdict != "inconclusive" else "continue"
        if out.decision == "continue" and not final and t >= FUTILITY_FROM:
            out.power = _power_paired(claim, mean, sd, n)
    if out.decision == "continue":
        if not math.isnan(out.power) and out.power < FUTILITY_POWER:
            out.decision = "futility"
        elif final:
            out.decision = "inconclusive"
    return out


def analyse(runs: Runs) -> dict[str, list[Look]]:
    """Every comparison's looks so far, up to the one where it stopped."""
    out: dict[str, list[Look]] = {}
    for claim in claims():
        looks: list[Look] = []
        for k in range(1, LOOKS + 1):
            r = look(runs, claim, k)
            if r is None:
                break
            looks.append(r)
            if r.decision != "continue":
                break
        out[claim.id] = looks
    return out


def blocks_to_run(runs: Runs) -> list[tuple[int, tuple[str, ...]]]:
    """(look, methods) of every block the plan has asked for so far: look 1 for all methods, and look k+1 for
    the methods of the comparisons still open after look k."""
    looks = analyse(runs)
    out = [(1, METHODS)]
    for k in range(1, LOOKS):
        if not all(len(looks[c.id]) >= k or _stopped(looks[c.id]) for c in claims()):
            break  # look k is not complete yet
        # still open after look k: went on to look k + 1, or has look k's data and continues
        open_ = [c for c in claims() if len(looks[c.id]) > k
                 or (len(looks[c.id]) == k and looks[c.id][-1].decision == "continue")]
        if not open_:
            break
        out.append((k + 1, tuple(m for m in METHODS if any(m in methods_of(c) for c in open_))))
    return out


def _stopped(looks: list[Look]) -> bool:
    return bool(looks) and looks[-1].decision != "continue"


def seeds_of(look_k: int) -> tuple[int, ...]:
    return SEEDS[(look_k - 1) * BLOCK:look_k * BLOCK]


def ended_runs(out: Optional[Path]) -> Runs:
    """The plan's runs in ``out`` that have ended (read from their folders, whatever the manifest says)."""
    if out is None:
        return Runs([])
    found = [R.load_run(Path(out), f"{CELL.name}/{m}/seed{s}", m, CELL.name, s) for m in METHODS for s in SEEDS]
    return Runs([r for r in found if r is not None])
