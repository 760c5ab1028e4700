"""The model-output gate's statistics (PSI with a sequential e-value test) and the mean
log ratio of custom `value` metrics: properties, and simulated false alarms and power.

Pure functions only; simulations use seeded numpy Generators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta

from xds_server.rollout import stats

K = 20
EDGES = np.linspace(0.0, 1.0, K + 1)
BOUNDS: tuple[float, ...] = (*EDGES[1:-1].tolist(), math.inf)
"""20 score buckets over [0, 1], +inf last (a model's confidence histogram)."""
JUDGE_ALPHA = 0.01 / 9
"""The default plan's level for one test: 1 - confidence over 3 steps x 3 regions."""


def beta_probs(a: float, b: float) -> np.ndarray:
    p = np.diff(beta.cdf(EDGES, a, b))
    return np.asarray(p / p.sum())


HEALTHY = beta_probs(2.0, 5.0)
COLLAPSE = np.array([0.6, 0.4] + [0.0] * (K - 2))
"""Every score in the lowest two buckets."""


def hist(counts: np.ndarray | Sequence[float], bounds: tuple[float, ...] = BOUNDS) -> stats.Buckets:
    """Per-bucket counts -> the cumulative (upper bound, count) pairs PromQL returns."""
    return tuple(zip(bounds, np.cumsum(counts).tolist(), strict=True))


def first_look(
    rng: np.random.Generator,
    canary: np.ndarray,
    comparator: np.ndarray,
    every: int,
    up_to: int,
    alpha: float,
    severe: bool = False,
) -> float:
    """Scores each side at the first look (every `every` new ones a side) at which the
    test rejects (or, with `severe`, classes the canary high); inf: never."""
    looks = up_to // every
    ca = np.cumsum(rng.multinomial(every, canary, size=looks), axis=0)
    cb = np.cumsum(rng.multinomial(every, comparator, size=looks), axis=0)
    for k in range(looks):
        r = stats.psi_test(hist(ca[k]), hist(cb[k]), 0.1, 0.25, alpha)
        if r.severe if severe else r.significant:
            return float((k + 1) * every)
    return math.inf


# ---- PSI: properties ----

counts = st.lists(st.integers(0, 10_000), min_size=2, max_size=25)


@given(counts, st.data())
@settings(max_examples=200, deadline=None)
def test_psi_is_nonnegative_and_the_p_value_in_0_1(a: list[int], data: st.DataObject) -> None:
    b = data.draw(st.lists(st.integers(0, 10_000), min_size=len(a), max_size=len(a)))
    bounds = (*range(1, len(a)), math.inf)
    r = stats.psi_test(hist(a, bounds), hist(b, bounds), 0.1, 0.25, 0.01)
    if sum(a) == 0 or sum(b) == 0:
        assert r.psi is None and r.p_value == 1.0 and r.classification == "no_data"
        return
    assert r.psi is not None and r.psi >= 0
    assert 0 < r.p_value <= 1
    assert r.significant == (r.p_value <= 0.01)


@given(counts, st.integers(1, 50))
@settings(max_examples=200, deadline=None)
def test_identical_histograms_have_psi_0_and_p_1(a: list[int], scale: int) -> None:
    """Identical shares at any size: the Dirichlet mixture never beats the pooled MLE."""
    bounds = (*range(1, len(a)), math.inf)
    if sum(a) == 0:
        return
    r = stats.psi_test(hist(a, bounds), hist([scale * x for x in a], bounds), 0.1, 0.25, 0.05)
    assert r.psi == pytest.approx(0.0, abs=1e-12)
    assert r.p_value == 1.0 and not r.significant
    assert r.classification == ("pass" if sum(a) >= 100 else "no_data")


@given(counts, st.data(), st.integers(1, 5))
@settings(max_examples=300, deadline=None)
def test_more_data_in_the_pooled_shares_never_lowers_the_p_value(
    a: list[int], data: st.DataObject, k: int
) -> None:
    """Adding k times the pooled histogram to both pools (more data just like the null's
    estimate) never makes the p-value smaller. Adding the *same counts* to both may:
    canary [1, 0] vs comparator [0, 9] has p 0.42; with one more score in the first
    bucket on each side, [2, 0] vs [1, 9], p 0.34 (the canary's lean is surer)."""
    b = data.draw(st.lists(st.integers(0, 1_000), min_size=len(a), max_size=len(a)))
    if sum(a) == 0 or sum(b) == 0:
        return
    pooled = [x + y for x, y in zip(a, b, strict=True)]
    before = stats.same_distribution_log_e(a, b)
    after = stats.same_distribution_log_e(
        [x + k * z for x, z in zip(a, pooled, strict=True)],
        [y + k * z for y, z in zip(b, pooled, strict=True)],
    )
    assert max(after, 0.0) <= max(before, 0.0) + 1e-9


def test_same_counts_added_to_both_can_lower_the_p_value() -> None:
    """Why the monotone property above is the weaker one."""
    before = stats.psi_test(hist([1, 0], (1, math.inf)), hist([0, 9], (1, math.inf)), 0, 0, 0.05)
    after = stats.psi_test(hist([2, 0], (1, math.inf)), hist([1, 9], (1, math.inf)), 0, 0, 0.05)
    assert before.p_value == pytest.approx(0.418, abs=1e-3)
    assert after.p_value == pytest.approx(0.337, abs=1e-3)


def test_psi_formula_epsilon_floor_and_common_bounds() -> None:
    p, q = [0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]
    expected = sum(
        (max(x, 1e-4) - y) * math.log(max(x, 1e-4) / y) for x, y in zip(p, q, strict=True)
    )
    got = stats.population_stability_index([50, 30, 20, 0], [25, 25, 25, 25])
    assert got == pytest.approx(expected)
    # An empty bucket weighs ln(share / 1e-4): a tenth of the scores where the other
    # side has none is a PSI of about 0.1 * ln(1000) = 0.69 on its own.
    assert stats.population_stability_index([90, 10], [100, 0]) > 0.69
    # Different bounds: compared on the bounds both have (cumulative counts are exact).
    fine = ((0.25, 10.0), (0.5, 30.0), (0.75, 60.0), (math.inf, 100.0))
    coarse = ((0.5, 30.0), (math.inf, 100.0))
    r = stats.psi_test(fine, coarse, 0.1, 0.25, 0.05)
    assert r.buckets == 2 and r.psi == pytest.approx(0.0)
    # Extrapolated (fractional) counts are rounded; a counter reset never counts < 0.
    three = (1.0, 2.0, math.inf)
    r = stats.psi_test(
        ((1.0, 10.4), (2.0, 9.0), (math.inf, 20.6)), hist([10, 0, 11], three), 1, 2, 1
    )
    assert (r.canary_total, r.comparator_total) == (21.0, 21.0)


def test_classification_is_data_the_caller_can_read() -> None:
    base = hist(np.round(HEALTHY * 20_000))
    same = stats.psi_test(base, base, 0.1, 0.25, JUDGE_ALPHA)
    assert same.classification == "pass" and same.passed and same.enough
    few = stats.psi_test(hist(np.round(HEALTHY * 50)), base, 0.1, 0.25, JUDGE_ALPHA)
    assert few.classification == "no_data" and not few.enough
    # Above the allowance on enough scores, not (yet) significant: keep looking.
    noisy = stats.psi_test(hist(np.round(beta_probs(2.7, 5) * 150)), base, 0.1, 0.25, 1e-3)
    assert noisy.enough and not noisy.within and not noisy.significant
    assert noisy.classification == "no_data" and not noisy.passed
    moderate = stats.psi_test(hist(np.round(beta_probs(2.7, 5) * 20_000)), base, 0.1, 0.25, 1e-3)
    assert moderate.psi is not None and 0.1 < moderate.psi <= 0.25
    assert moderate.significant and moderate.marginal and not moderate.severe
    assert moderate.classification == "marginal"
    collapse = stats.psi_test(hist(np.round(COLLAPSE * 300)), base, 0.1, 0.25, JUDGE_ALPHA)
    assert collapse.severe and collapse.classification == "high"
    assert collapse.p_value < 1e-100  # overwhelming evidence: small, still above 0
    # Within the allowance though significant (a real but harmless shift): a pass.
    small = stats.psi_test(hist(np.round(beta_probs(2.3, 5) * 50_000)), base, 0.1, 0.25, 0.05)
    assert small.psi is not None and small.psi <= 0.1 and small.significant
    assert small.classification == "pass"


# ---- PSI: bias, false alarms and power, simulated ----


def test_small_sample_psi_bias_and_why_significance_is_required() -> None:
    """One distribution on both sides, 20 buckets: the PSI's mean is about
    (K - 1)(1/n + 1/m), more at small n where sparse buckets sit on the epsilon floor.
    Measured (300 pairs, seed 1): n = m = 50: 1.0; 100: 0.42; 200: 0.19; 500: 0.071;
    1,000: 0.035; 5,000: 0.0067. At 100 a side noise alone is above the 0.25 fail line
    most of the time, and the e-value test never rejects it."""
    rng = np.random.default_rng(1)
    for n, low, high in ((100, 0.3, 0.6), (1000, 0.03, 0.045), (5000, 0.005, 0.009)):
        results = [
            stats.psi_test(
                hist(rng.multinomial(n, HEALTHY)),
                hist(rng.multinomial(n, HEALTHY)),
                0.1,
                0.25,
                0.05,
            )
            for _ in range(300)
        ]
        mean = float(np.mean([r.psi for r in results]))
        assert low < mean < high, (n, mean)
        assert not any(r.significant for r in results)
        if n >= 1000:  # the chi-square approximation, once buckets are seldom empty
            assert mean == pytest.approx((K - 1) * 2 / n, rel=0.2)


def test_psi_false_alarms_under_continuous_monitoring() -> None:
    """400 runs, one distribution for both, a look every 50 new scores a side up to 5,000
    (100 looks): runs that ever reject at alpha 0.05. Measured: 0 of 400 (universal
    inference is conservative: the e-value pays for fitting K - 1 shares twice)."""
    rng = np.random.default_rng(2024)
    runs = 400
    alarms = sum(
        math.isfinite(first_look(rng, HEALTHY, HEALTHY, 50, 5000, 0.05)) for _ in range(runs)
    )
    assert alarms / runs <= 0.05 + 0.02, alarms


def test_psi_detects_a_collapse_in_a_few_hundred_scores() -> None:
    """Every score in the lowest two buckets: classed high at the judge's level within 300
    scores a side in every run (measured at alpha 0.05: 50-60)."""
    rng = np.random.default_rng(7)
    firsts = [
        first_look(rng, COLLAPSE, HEALTHY, 25, 300, JUDGE_ALPHA, severe=True) for _ in range(50)
    ]
    assert max(firsts) <= 300, firsts
    assert float(np.median(firsts)) <= 100


# ---- value metrics: the mean log ratio ----


def pairs_with(
    rng: np.random.Generator, log_ratio: float, sigma: float, n: int
) -> list[tuple[float, float]]:
    """Per-interval readings: the comparator wanders (load), the canary is its reading
    times exp(log_ratio + noise)."""
    comparator = 100.0 * np.exp(rng.normal(0.0, 0.3, n))
    canary = comparator * np.exp(rng.normal(log_ratio, sigma, n))
    return list(zip(canary.tolist(), comparator.tolist(), strict=True))


def first_rejection(pairs: list[tuple[float, float]], alpha: float, **sides: bool) -> float:
    for k in range(5, len(pairs) + 1):
        if stats.ratio_of_means_test(pairs[:k], 1.1, alpha=alpha, **sides).significant:
            return float(k)
    return math.inf


def test_value_pairs_without_a_log_are_skipped_and_counted() -> None:
    pairs = [(10.0, 10.0), (0.0, 5.0), (5.0, -1.0), (math.nan, 3.0), (12.0, 10.0)]
    r = stats.ratio_of_means_test(pairs, 1.1)
    assert (r.pairs, r.skipped, r.enough, r.significant, r.p_value) == (2, 3, False, False, 1.0)
    assert r.effect == pytest.approx(math.sqrt(1.2))
    r = stats.ratio_of_means_test([(7.0, 10.0)] * 3 + [(6.9, 10.0), (7.1, 10.0)] * 2, 1.1, False)
    assert r.enough and r.pairs == 7 and r.higher is None and r.p_value == 1.0  # no side tested
    r = stats.ratio_of_means_test([(7.0, 10.0)] * 3 + [(6.9, 10.0), (7.1, 10.0)] * 2, 1.1, True)
    assert r.p_value == 1.0 and not r.significant  # a drop, only an increase is bad
    r = stats.ratio_of_means_test(
        [(7.0, 10.0)] * 3 + [(6.9, 10.0), (7.1, 10.0)] * 2, 1.1, False, True, JUDGE_ALPHA
    )
    assert r.significant and r.higher is False and r.effect == pytest.approx(0.7, rel=0.01)
    same = stats.ratio_of_means_test([(10.0, 10.0)] * 20, 1.1, True, True)
    assert same.p_value == 1.0 and same.effect == 1.0


@given(st.lists(st.tuples(st.floats(0.01, 1e6), st.floats(0.01, 1e6)), min_size=5, max_size=40))
@settings(max_examples=200, deadline=None)
def test_value_p_value_in_0_1(pairs: list[tuple[float, float]]) -> None:
    for up, down in ((True, False), (False, True), (True, True)):
        r = stats.ratio_of_means_test(pairs, 1.1, up, down, 0.05)
        assert 0 < r.p_value <= 1 and r.pairs == len(pairs)


@pytest.mark.parametrize(
    ("sides", "log_ratio"),
    [
        ({"increase_is_bad": True}, math.log(1.1)),
        ({"increase_is_bad": False, "decrease_is_bad": True}, -math.log(1.1)),
        ({"increase_is_bad": True, "decrease_is_bad": True}, math.log(1.1)),
    ],
)
def test_value_false_alarms_at_the_allowed_change(sides: dict[str, bool], log_ratio: float) -> None:
    """At the boundary (canary exactly allowed_change off), a look after every reading
    from the 5th to the 60th, 400 runs at alpha 0.05. Measured: about 1% (the symmetric
    mixture gated on the sign: roughly alpha / 2 per side)."""
    rng = np.random.default_rng(11)
    runs = 400
    alarms = sum(
        math.isfinite(first_rejection(pairs_with(rng, log_ratio, 0.2, 60), 0.05, **sides))
        for _ in range(runs)
    )
    assert alarms / runs <= 0.05 + 0.02, alarms


def test_value_detects_a_30_percent_drop() -> None:
    """tokens/s 30% down, allowed 10%, per-interval noise sd 0.05 / 0.2 on the log ratio,
    at the judge's level: rejected in every run, by the 12th / 60th reading. Measured
    (100 runs): median 6 / 18.5 readings, p95 8 / 31, slowest 10 / 39."""
    rng = np.random.default_rng(12)
    for sigma, by, median in ((0.05, 12, 7), (0.2, 60, 25)):
        firsts = [
            first_rejection(
                pairs_with(rng, math.log(0.7), sigma, by),
                JUDGE_ALPHA,
                increase_is_bad=False,
                decrease_is_bad=True,
            )
            for _ in range(100)
        ]
        assert max(firsts) <= by, (sigma, sorted(firsts)[-5:])
        assert float(np.median(firsts)) <= median, (sigma, float(np.median(firsts)))
