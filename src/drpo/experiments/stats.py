"""The statistics of the comparison, in one place: Student-t intervals and paired effects with their
minimum detectable effect (MDE), and exact tests on collapse counts.

    mean_ci        mean and 95% Student-t interval of values
    paired_effect  the same for paired differences, plus the MDE at 80% power (two-sided 5%):
                   MDE = (t_{0.975, n-1} + t_{0.80, n-1}) sd / sqrt(n)
    count_effect   collapse counts k_T / n_T vs k_C / n_C: the rate difference p_T - p_C with a 95%
                   Newcombe (hybrid Wilson score) interval, one-sided Fisher exact p-values in both
                   directions, and the MDE: the smallest reduction of the control's observed rate that a
                   one-sided 5% Fisher test detects with 80% power at these n (exact binomial enumeration)
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
