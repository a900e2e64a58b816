"""The statistics added for issue 27, each against a case computed by hand or a published table:
Kaplan-Meier and the log-rank test (statsmodels), the interquartile mean and the probability of
improvement with stratified bootstrap intervals (scipy), bounded bootstrap means, and the group-sequential
boundaries (O'Brien-Fleming-type alpha spending)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from drpo.experiments import stats as S


def test_kaplan_meier_against_a_hand_computed_case():
    # times 10, 20 (event), 20 (censored), 30, 100 (censored); events at 10, 20, 30
    km = S.kaplan_meier([10, 20, 20, 30, 100], [True, True, False, True, False], horizon=100)
    # S(10) = 4/5; S(20) = 4/5 * 3/4 (the event at 20 precedes the censoring at 20); S(30) = 0.6 * 1/2
    assert list(km.times) == [10, 20, 30] and km.surv == pytest.approx([0.8, 0.6, 0.3])
    assert km.median == 30 and (km.n, km.events) == (5, 3)
    assert km.rmst == pytest.approx(10 * 1 + 10 * 0.8 + 10 * 0.6 + 70 * 0.3)  # area under S up to step 100
    assert km.median_lo <= 30 <= km.median_hi
    none = S.kaplan_meier([100, 100], [False, False], horizon=100)
    assert math.isnan(none.median) and none.rmst == 100 and none.events == 0


def test_logrank_against_a_hand_computed_case():
    # group 1 fails at 1 and 2, group 2 at 3 and 4. Per event time: (n1, n, d) = (2, 4, 1), (1, 3, 1), (0, 2, 1),
    # (0, 1, 1): E1 = 1/2 + 1/3, V = 2*2*1*3/(16*3) + 1*2*1*2/(9*2); chi2 = (2 - E1)^2 / V
    chi2_hand = (2 - 5 / 6) ** 2 / (0.25 + 2 / 9)
    chi2, p, z = S.logrank([1, 2], [1, 1], [3, 4], [1, 1], horizon=4)
    assert chi2 == pytest.approx(chi2_hand) and p == pytest.approx(math.erfc(math.sqrt(chi2_hand / 2)))  # chi2(1 df) tail
    assert z == pytest.approx(-math.sqrt(chi2_hand))  # group 1 collapses earlier: negative
    assert S.logrank([3, 4], [1, 1], [1, 2], [1, 1], horizon=4)[2] == pytest.approx(math.sqrt(chi2_hand))
    assert S.logrank([5, 5], [0, 0], [5, 5], [0, 0], horizon=5) == (0.0, 1.0, 0.0)  # no event: nothing to test
    assert S.logrank([5, 5], [1, 1], [5, 5], [1, 1], horizon=5) == (0.0, 1.0, 0.0)  # all at one time: variance 0


def test_iqm_and_probability_of_improvement_by_hand():
    assert S.iqm([list(range(1, 9))]).mean == pytest.approx(4.5)  # the middle four of 1..8
    # X = 3, 4, 5 against Y = 1, 2, 4: 7 wins and one tie of 9 pairs
    e = S.poi([[3, 4, 5]], [[1, 2, 4]])
    assert e.mean == pytest.approx(7.5 / 9) and 0 <= e.lo <= e.mean <= e.hi <= 1
    assert S.poi([[1, 2, 3]], [[1, 2, 3]]).mean == pytest.approx(0.5)
    assert S.poi([[0.9, 1.0]], [[0.1, 0.2]]).mean == 1 and S.poi([[0.9, 1.0], []], [[0.1, 0.2], [0.3]]).n == 4


def test_the_bootstrap_is_stratified():
    # two settings far apart: resampling within each keeps four low and four high runs, so the IQM stays
    # near 0.5; resampling the pooled runs would often draw six low ones (IQM near 0.05)
    e = S.iqm([[0.0, 0.0, 0.02, 0.1], [0.9, 0.98, 1.0, 1.0]])
    assert 0.45 <= e.lo <= e.mean <= e.hi <= 0.55, e
    pooled = S.iqm([[0.0, 0.0, 0.02, 0.1, 0.9, 0.98, 1.0, 1.0]])
    assert pooled.mean == pytest.approx(e.mean) and pooled.lo < 0.3  # the same runs, unstratified


def test_bounded_intervals_stay_in_range():
    v = [0.0, 0.0, 0.01, 0.3]
    t, b = S.mean_ci(v), S.bounded_mean_ci(v)
    assert t.lo < 0 and 0 <= b.lo <= b.mean <= b.hi <= 0.3 and b.mean == pytest.approx(t.mean)
    assert (S.bounded_mean_ci([0.2, 0.2]).lo, S.bounded_mean_ci([0.2]).n) == (0.2, 1)


def test_group_sequential_bounds_match_the_published_table():
    # Lan-DeMets O'Brien-Fleming-type spending, 5 equally spaced looks, two-sided 0.05 (gsDesign sfLDOF;
    # DeMets & Lan 1994): 4.877, 3.357, 2.680, 2.290, 2.031
    assert S.group_sequential_bounds([0.2, 0.4, 0.6, 0.8, 1.0]) == pytest.approx(
        [4.877, 3.357, 2.680, 2.290, 2.031], abs=2e-3)
    assert S.group_sequential_bounds([1 / 3, 2 / 3, 1.0]) == pytest.approx([3.710, 2.511, 1.993], abs=2e-3)
    assert S.group_sequential_bounds([1.0]) == pytest.approx([1.959964])
    with pytest.raises(ValueError, match="increase"):
        S.group_sequential_bounds([0.5, 0.4])


def test_group_sequential_bounds_spend_what_they_say():
    """Simulated z paths under no effect cross the boundaries at each look with the probability spent there."""
    t = np.array([1 / 3, 2 / 3, 1.0])
    c = S.group_sequential_bounds(t)
    rng = np.random.default_rng(1)
    steps = rng.normal(size=(400_000, 3)) * np.sqrt(np.diff(np.concatenate([[0], t])))
    z = np.cumsum(steps, axis=1) / np.sqrt(t)
    crossed = np.abs(z) >= c
    first = np.where(crossed.any(axis=1), crossed.argmax(axis=1), -1)
    spent = [S.spending(x) - S.spending(y) for x, y in zip(t, np.concatenate([[0], t[:-1]]))]
    for k in range(3):
        assert np.mean(first == k) == pytest.approx(spent[k], abs=4 * math.sqrt(spent[k] / 400_000) + 1e-5), k
    assert np.mean(first >= 0) == pytest.approx(0.05, abs=2e-3)
    # a single look at the last boundary alone would reject less often than 0.05: the early looks cost power
    assert 1.959 < c[-1] < 2.0
