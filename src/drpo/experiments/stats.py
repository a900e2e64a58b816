"""The statistics of the comparison, in one place: Student-t intervals and paired effects with their
minimum detectable effect (MDE), and exact tests on collapse counts.

    mean_ci        mean and 95% Student-t interval of values
    paired_effect  the same for paired differences, plus the MDE at 80% power (two-sided 5%):
                   MDE = (t_{0.975, n-1} + t_{0.80, n-1}) sd / sqrt(n)
    count_effect   collapse counts k_T / n_T vs k_C / n_C: the rate difference p_T - p_C with a 95%
                   Newcombe (hybrid Wilson score) interval, one-sided Fisher exact p-values in both
                   directions, and the MDE: the smallest reduction of the control's observed rate that a
                   one-sided 5% Fisher test detects with 80% power at these n (exact binomial enumeration)
    bounded_mean_ci  the mean of values bounded to a range (accuracies), with a 95% percentile bootstrap
                   interval: it stays within what the values can take, where a t-interval of few seeds does not

Time to collapse, as survival data (statsmodels' ``SurvfuncRight`` and ``survdiff``):

    kaplan_meier   the Kaplan-Meier estimate S(t), the median time with its 95% interval (Brookmeyer-
                   Crowley, complementary log-log) and the restricted mean time up to a horizon (the area
                   under S: the mean steps survived within the budget)
    logrank        the log-rank test of two groups: chi^2 (1 df), its p-value, and the signed z = +-sqrt(chi^2),
                   positive when group 1 survives longer (the larger restricted mean)

Aggregates for few runs (Agarwal et al., NeurIPS 2021; scipy's bootstrap, not their archived ``rliable``):

    iqm            the interquartile mean (the mean of the middle 50% of runs, scipy's trim_mean 0.25) with a
                   95% stratified percentile bootstrap interval: runs are resampled within each stratum
                   (setting), each stratum a separate sample of scipy.stats.bootstrap
    poi            the probability of improvement P(X > Y) + P(X = Y) / 2 (Mann-Whitney's U / (n m)), averaged
                   over strata, with the same stratified bootstrap (X's and Y's runs resampled independently)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy import stats

Z975 = 1.959963984540054


def t_quantile(q: float, df: int) -> float:
    return float(stats.t.ppf(q, df))


@dataclass
class Estimate:
    """A mean with its 95% interval over ``n`` values (lo = hi = NaN for n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "-"
        if not math.isfinite(self.lo):
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}] (n={self.n})"


def _finite(values: Iterable[Optional[float]]) -> np.ndarray:
    return np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)


def mean_ci(values: Iterable[Optional[float]]) -> Estimate:
    v = _finite(values)
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    m = float(v.mean())
    if v.size < 2:
        return Estimate(m, float("nan"), float("nan"), 1)
    h = t_quantile(0.975, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return Estimate(m, m - h, m + h, int(v.size))


@dataclass
class Effect:
    """A claim's effect: mean and 95% interval in the claim's units, the number of pairs (or runs), and
    the minimum detectable effect at 80% power. ``detail``: what the numbers are (e.g. the counts)."""

    mean: float
    lo: float
    hi: float
    n: int
    mde: float
    detail: str = ""
    p_less: float = float("nan")     # count effects: one-sided p that the treatment's rate is lower
    p_greater: float = float("nan")  # ... and higher

    def fmt(self, pct: bool = False) -> str:
        if self.n == 0:
            return "-"
        f = (lambda v: f"{100 * v:+.1f}%") if pct else (lambda v: f"{v:+.3f}")
        if self.n < 2 or not math.isfinite(self.lo):
            return f"{f(self.mean)} (n={self.n})"
        return f"{f(self.mean)} [{f(self.lo)}, {f(self.hi)}] (n={self.n})" + (f"; {self.detail}" if self.detail else "")


def paired_effect(values: Sequence[Optional[float]], log_scale: bool = False) -> Effect:
    """Mean, 95% t-interval and MDE of paired values; ``log_scale`` values are log(T / C) and the
    result is the relative reduction 1 - T / C (interval and MDE mapped)."""
    v = _finite(values)
    n = int(v.size)
    if n == 0:
        return Effect(float("nan"), float("nan"), float("nan"), 0, float("nan"))
    m = float(v.mean())
    if n < 2:
        lo = hi = mde = float("nan")
    else:
        se = float(v.std(ddof=1)) / math.sqrt(n)
        half = t_quantile(0.975, n - 1) * se
        lo, hi = m - half, m + half
        mde = (t_quantile(0.975, n - 1) + t_quantile(0.80, n - 1)) * se
    if log_scale:  # log(T/C) -> reduction 1 - T/C: decreasing, so the bounds swap
        return Effect(1 - math.exp(m), 1 - math.exp(hi), 1 - math.exp(lo), n, 1 - math.exp(-mde))
    return Effect(m, lo, hi, n, mde)


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = k / n, Z975 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z975 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """95% interval of p1 - p2 (Newcombe's hybrid score method, his method 10)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def fisher_less(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided Fisher exact p-value that group 1's rate is lower than group 2's."""
    return float(stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="less")[1])


@lru_cache(maxsize=4096)
def _power_less(p1: float, n1: int, p2: float, n2: int, alpha: float) -> float:
    """P(one-sided Fisher test of 'rate 1 < rate 2' rejects at ``alpha``) when the rates are p1, p2."""
    b1, b2 = stats.binom.pmf(range(n1 + 1), n1, p1), stats.binom.pmf(range(n2 + 1), n2, p2)
    power = 0.0
    for k1 in range(n1 + 1):
        for k2 in range(n2 + 1):
            if b1[k1] * b2[k2] > 1e-12 and fisher_less(k1, n1, k2, n2) < alpha:
                power += b1[k1] * b2[k2]
    return power


def count_mde(n1: int, p2: float, n2: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest d such that a treatment rate p2 - d is detected (one-sided Fisher, ``alpha``) with
    ``power`` against a control rate ``p2`` at these sample sizes; inf when even d = p2 (a treatment
    that never collapses) is not, NaN when the control never collapses (nothing to reduce)."""
    if p2 <= 0:
        return float("nan")
    for d in np.linspace(0.0, p2, 101)[1:]:
        if _power_less(round(max(p2 - d, 0.0), 6), n1, round(p2, 6), n2, alpha) >= power:
            return float(d)
    return float("inf")


def count_effect(k1: int, n1: int, k2: int, n2: int) -> Effect:
    """Treatment k1 of n1 runs collapsed, control k2 of n2: the effect is the *reduction* of the
    collapse rate, p2 - p1 (positive: the treatment collapses less), with its interval and MDE."""
    if n1 == 0 or n2 == 0:
        return Effect(float("nan"), float("nan"), float("nan"), 0, float("nan"))
    lo, hi = newcombe(k2, n2, k1, n1)
    return Effect(k2 / n2 - k1 / n1, lo, hi, n1 + n2, count_mde(n1, k2 / n2, n2),
                  detail=f"{k1}/{n1} vs {k2}/{n2} collapsed",
                  p_less=fisher_less(k1, n1, k2, n2), p_greater=fisher_less(k2, n2, k1, n1))


BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0  # the report's intervals are reproducible


def _bootstrap(samples: Sequence[np.ndarray], statistic, vectorized: bool = False) -> tuple[float, float]:
    """95% percentile interval of ``statistic(*samples)``, each sample resampled on its own."""
    if any(len(x) < 2 for x in samples):
        return float("nan"), float("nan")
    if all(np.ptp(x) == 0 for x in samples):  # nothing varies: every resample gives the estimate
        v = float(statistic(*samples, axis=-1) if vectorized else statistic(*samples))
        return v, v
    res = stats.bootstrap(tuple(samples), statistic, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                          vectorized=vectorized, random_state=np.random.default_rng(BOOTSTRAP_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bounded_mean_ci(values: Iterable[Optional[float]]) -> Estimate:
    """Mean and 95% percentile bootstrap interval (within the values' range, unlike a t-interval)."""
    v = _finite(values)
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    lo, hi = _bootstrap([v], np.mean, vectorized=True)
    return Estimate(float(v.mean()), lo, hi, int(v.size))


def iqm(strata: Sequence[Sequence[float]]) -> Estimate:
    """Interquartile mean of all runs of ``strata`` (lists of per-run values, one per setting) with its
    stratified bootstrap interval."""
    xs = [np.asarray(x, dtype=float) for x in strata if len(x)]
    if not xs:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)

    def statistic(*samples, axis=-1):
        return stats.trim_mean(np.concatenate(samples, axis=-1), 0.25, axis=-1)

    lo, hi = _bootstrap(xs, statistic, vectorized=True)
    return Estimate(float(statistic(*xs)), lo, hi, int(sum(len(x) for x in xs)))


def poi(x_strata: Sequence[Sequence[float]], y_strata: Sequence[Sequence[float]]) -> Estimate:
    """P(X > Y) + P(X = Y) / 2 per stratum (X's runs against Y's runs of the same setting), averaged over the
    strata where both have runs, with its stratified bootstrap interval."""
    pairs = [(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in zip(x_strata, y_strata)
             if len(x) and len(y)]
    if not pairs:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    k = len(pairs)

    def statistic(*samples, axis=-1):  # U / (n m) per stratum (ties count one half), averaged over strata
        per = []
        for x, y in zip(samples[:k], samples[k:]):
            diff = x[..., :, None] - y[..., None, :]
            per.append(np.mean((diff > 0) + 0.5 * (diff == 0), axis=(-2, -1)))
        return np.mean(per, axis=0)

    samples = [x for x, _ in pairs] + [y for _, y in pairs]
    lo, hi = _bootstrap(samples, statistic, vectorized=True)
    return Estimate(float(statistic(*samples)), lo, hi, int(sum(len(x) + len(y) for x, y in pairs)))


@dataclass
class Survival:
    """A Kaplan-Meier estimate: S(t) after each distinct time ``times`` (S = 1 before the first), the median
    time with its 95% interval (NaN where S never falls to 0.5, or the bound is not reached), the restricted
    mean up to ``horizon``, and the counts."""

    times: np.ndarray
    surv: np.ndarray
    median: float
    median_lo: float
    median_hi: float
    rmst: float
    horizon: float
    n: int
    events: int


def kaplan_meier(durations: Sequence[float], events: Sequence[bool], horizon: float) -> Survival:
    from statsmodels.duration.survfunc import SurvfuncRight

    d, e = np.asarray(durations, dtype=float), np.asarray(events, dtype=float)
    if d.size == 0:
        nan = float("nan")
        return Survival(np.array([]), np.array([]), nan, nan, nan, nan, horizon, 0, 0)
    sf = SurvfuncRight(d, e)
    times, surv = np.asarray(sf.surv_times, dtype=float), np.asarray(sf.surv_prob, dtype=float)
    # restricted mean: the area under the step function S from 0 to the horizon
    edges = np.concatenate([[0.0], np.minimum(times, horizon), [horizon]])
    levels = np.concatenate([[1.0], surv])
    rmst = float(np.sum(levels * np.diff(edges).clip(min=0)))
    if e.sum() == 0:
        median = lo = hi = float("nan")
    else:
        median = float(sf.quantile(0.5))
        with np.errstate(all="ignore"):
            lo, hi = (float(x) for x in sf.quantile_ci(0.5))
    return Survival(times, surv, median, lo, hi, rmst, horizon, int(d.size), int(e.sum()))


def logrank(d1: Sequence[float], e1: Sequence[bool], d2: Sequence[float], e2: Sequence[bool],
            horizon: float, strata1: Optional[Sequence] = None, strata2: Optional[Sequence] = None
            ) -> tuple[float, float, float]:
    """(chi^2, p, z) of the log-rank test of group 1 against group 2 (stratified when ``strata1``/``strata2``
    label each run's stratum: the settings a regime pools); z > 0 when group 1 survives longer (its restricted
    mean up to ``horizon`` is larger). No information (no event, or every run at risk failing at one time:
    the statistic's variance is 0): (0, 1, 0)."""
    from statsmodels.duration.survfunc import survdiff

    if not (len(d1) and len(d2)) or sum(e1) + sum(e2) == 0:
        return 0.0, 1.0, 0.0
    strata = None if strata1 is None else np.asarray(list(strata1) + list(strata2))
    try:
        chisq, p = survdiff(np.concatenate([d1, d2]).astype(float), np.concatenate([e1, e2]).astype(float),
                            np.array([1] * len(d1) + [2] * len(d2)), strata=strata)
    except np.linalg.LinAlgError:
        return 0.0, 1.0, 0.0
    sign = np.sign(kaplan_meier(d1, e1, horizon).rmst - kaplan_meier(d2, e2, horizon).rmst)
    return float(chisq), float(p), float(sign * math.sqrt(max(float(chisq), 0.0)))


def spending(t: float, alpha: float = 0.05) -> float:
    """Lan-DeMets O'Brien-Fleming-type alpha spending for a two-sided test of total error ``alpha``, each
    side spending 2 - 2 Phi(z_{1-alpha/4} / sqrt(t)) (alpha / 2 per side by t = 1; gsDesign's sfLDOF
    convention): the error rate spent by information fraction t."""
    return 0.0 if t <= 0 else float(2 * (2 - 2 * stats.norm.cdf(stats.norm.ppf(1 - alpha / 4) / math.sqrt(t))))


def group_sequential_bounds(fractions: Sequence[float], alpha: float = 0.05, grid: int = 2001) -> list[float]:
    """Two-sided critical values c_1..c_K for z statistics at information fractions t_1 < ... < t_K <= 1:
    under no effect, P(|Z_1| < c_1, ..., |Z_{k-1}| < c_{k-1}, |Z_k| >= c_k) = spending(t_k) - spending(t_{k-1}).

    Z_k = S_k / sqrt(t_k) where the score S has independent normal increments, S_k - S_{k-1} ~ N(0, t_k -
    t_{k-1}) (the canonical joint law of a statistic on accumulating data). The crossing probabilities come
    from the density of S on the continuation region, carried from look to look by convolution with the
    increment's normal density on a grid (the recursion of Armitage, McPherson and Rowe 1969, as in gsDesign);
    each c_k by root finding."""
    from scipy.optimize import brentq

    t = np.asarray(fractions, dtype=float)
    if not (t.size and np.all(np.diff(t) > 0) and 0 < t[0] and t[-1] <= 1):
        raise ValueError(f"information fractions must increase within (0, 1]: {list(fractions)}")
    bounds: list[float] = []
    s = density = None  # the continuation region's grid of S and the (sub-)density of S on it
    for k, tk in enumerate(t):
        target = spending(tk, alpha) - spending(t[k - 1] if k else 0.0, alpha)
        if k == 0:
            c = float(stats.norm.isf(target / 2))
        else:
            sd = math.sqrt(tk - t[k - 1])

            def crossing(c: float) -> float:  # P(still inside before look k, outside at look k) - target
                edge = c * math.sqrt(tk)
                out = stats.norm.cdf((-edge - s) / sd) + stats.norm.sf((edge - s) / sd)
                return float(np.trapezoid(density * out, s)) - target

            c = float(brentq(crossing, 0.1, 40.0, xtol=1e-7))
        bounds.append(c)
        edge = c * math.sqrt(tk)
        new_s = np.linspace(-edge, edge, grid)
        if k == 0:
            density = stats.norm.pdf(new_s, scale=math.sqrt(tk))
        else:
            kernel = stats.norm.pdf(new_s[:, None] - s[None, :], scale=math.sqrt(tk - t[k - 1]))
            density = np.trapezoid(kernel * density[None, :], s, axis=1)
        s = new_s
    return bounds
