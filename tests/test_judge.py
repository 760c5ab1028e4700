"""The canary judge and its statistics, alone: simulated known distributions and properties.

Pure functions only: no I/O, no clock, no sleeps. Simulations use seeded numpy Generators,
so every run sees the same data.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import with_metric
from xds_server.render.bootstrap import ENVOY_DEFAULT_BUCKETS_MS, LATENCY_BUCKETS_MS
from xds_server.rollout import stats
from xds_server.rollout.evidence import FAIL, HIGH, MARGINAL, NO_DATA, PASS, Comparison, Measurement
from xds_server.rollout.judge import judge
from xds_server.spec import (
    Analysis,
    Guardrails,
    MetricKind,
    MetricSpec,
    NoDataRule,
    RolloutPlan,
)

ROOT = Path(__file__).resolve().parent.parent
ENVOY_BUCKETS_MS: tuple[float, ...] = (*ENVOY_DEFAULT_BUCKETS_MS, math.inf)
PLAN = RolloutPlan(guardrails=Guardrails(max_error_rate=1.0, max_p99_ms=1e9, min_requests=20))
"""Default analysis; guardrails that never trip, so the analysis alone decides."""
WINDOW = Measurement(requests=1000, errors=10, p99_ms=120.0)
"""A sliding window well inside the guardrails."""
TWO = replace(
    PLAN,
    analysis=replace(
        PLAN.analysis,
        metrics=tuple(m for m in PLAN.analysis.metrics if m.name in ("error_rate", "latency")),
    ),
)
"""Errors and the median alone (no critical tail or client-error metric): for the score
arithmetic."""


def histogram(latencies_ms: np.ndarray) -> tuple[tuple[float, float], ...]:
    """Request times -> Envoy's cumulative histogram (value <= bound counts in that bucket)."""
    idx = np.searchsorted(np.array(ENVOY_BUCKETS_MS[:-1]), latencies_ms, side="left")
    counts = np.bincount(idx, minlength=len(ENVOY_BUCKETS_MS))
    return tuple(zip(ENVOY_BUCKETS_MS, np.cumsum(counts).astype(float).tolist(), strict=True))


def pool(
    rng: np.random.Generator,
    rate: float,
    error_p: float,
    slowdown: float = 1.0,
    latency_samples: int | None = None,
) -> Measurement:
    """One pool's step: Poisson requests, binomial errors, long-tailed request times."""
    n = int(rng.poisson(rate))
    errors = int(rng.binomial(n, error_p))
    k = n if latency_samples is None else latency_samples
    body = rng.lognormal(math.log(30.0), 0.5, size=k)
    tail = rng.lognormal(math.log(150.0), 0.7, size=k)
    times = np.where(rng.random(k) < 0.03, tail, body) * slowdown
    return Measurement(requests=n, errors=errors, latency_buckets=histogram(times))


# ---- known distributions ----


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_identical_versions_with_ample_data_pass(seed: int) -> None:
    rng = np.random.default_rng(seed)
    canary, base = pool(rng, 20_000, 0.01), pool(rng, 20_000, 0.01)
    v = judge(PLAN, WINDOW, Comparison(canary, base, "baseline"))
    assert v.outcome == PASS, v.reason
    assert v.score == 100
    assert {m.classification for m in v.metrics} == {PASS}


def test_doubled_error_rate_with_ample_data_fails_conclusively() -> None:
    rng = np.random.default_rng(11)
    canary, base = pool(rng, 20_000, 0.02), pool(rng, 20_000, 0.01)
    v = judge(PLAN, WINDOW, Comparison(canary, base, "baseline"))
    err = next(m for m in v.metrics if m.name == "error_rate")
    assert err.classification == HIGH
    assert err.effect is not None and 1.6 < err.effect < 2.5
    assert err.p_value is not None and err.p_value <= 0.01
    assert v.outcome == FAIL and v.conclusive
    assert v.score == 0  # a critical metric failed


def test_a_rollout_shares_each_metrics_false_alarm_level_among_its_tests() -> None:
    """34 errors against 10 in equal traffic: p about 0.003. One test at alpha 0.01 calls
    that a regression; nine (3 analysed steps x 3 regions) get 0.0011 each and must hold
    for more evidence, or a healthy rollout would gather nine chances of a false alarm."""
    canary = Measurement(requests=1_000, errors=34)  # 3.4%: above ignore_below
    base = Measurement(requests=1_000, errors=10)
    cmp = Comparison(canary, base, "baseline")
    assert PLAN.analysis_tests(3) == 9

    def error_rate(plan: RolloutPlan, regions: int) -> tuple[str, float]:
        m = next(m for m in judge(plan, WINDOW, cmp, regions=regions).metrics)
        assert m.name == "error_rate"
        return m.classification, m.alpha

    one_step = replace(PLAN, steps=(5, 100))
    assert one_step.analysis_tests(1) == 1
    assert error_rate(one_step, 1) == (HIGH, pytest.approx(0.01))
    assert error_rate(PLAN, 3) == (NO_DATA, pytest.approx(0.01 / 9))
    per_step = replace(PLAN, analysis=replace(PLAN.analysis, false_alarm_scope="step"))
    assert per_step.analysis_tests(3) == 1
    assert error_rate(per_step, 3) == (HIGH, pytest.approx(0.01))
    shadowed = replace(PLAN, warmup=replace(PLAN.warmup, shadow_percent=10, shadow_duration=5))
    assert shadowed.analysis_tests(3) == 12  # the shadow phase is judged too


def test_thirty_percent_slower_latency_fails_on_the_score() -> None:
    rng = np.random.default_rng(12)
    canary = pool(rng, 5_000, 0.01, slowdown=1.3)
    base = pool(rng, 5_000, 0.01)
    v = judge(TWO, WINDOW, Comparison(canary, base, "baseline"))
    err = next(m for m in v.metrics if m.name == "error_rate")
    lat = next(m for m in v.metrics if m.name == "latency")
    assert err.classification == PASS
    assert lat.classification == HIGH
    assert lat.effect is not None and lat.effect > 1.1
    assert lat.p_value is not None and lat.p_value <= 0.01
    # errors 50 (pass) + latency 0 (high) of 100: below marginal_score 75 -> a failure.
    assert v.score == pytest.approx(50)
    assert v.outcome == FAIL and v.conclusive


def test_slower_latency_is_marginal_between_the_marginal_and_pass_scores() -> None:
    rng = np.random.default_rng(12)
    canary = pool(rng, 5_000, 0.01, slowdown=1.3)
    base = pool(rng, 5_000, 0.01)
    plan = replace(TWO, analysis=replace(TWO.analysis, marginal_score=40, pass_score=95))
    v = judge(plan, WINDOW, Comparison(canary, base, "baseline"))
    assert v.score == pytest.approx(50)
    assert v.outcome == MARGINAL and not v.conclusive


def test_tiny_but_significant_latency_shift_is_not_a_regression() -> None:
    """+3% with huge samples: the rank test rejects, the effect-size floor (x1.1) holds."""
    rng = np.random.default_rng(13)
    canary = pool(rng, 400_000, 0.01, slowdown=1.03)
    base = pool(rng, 400_000, 0.01)
    assert canary.latency_buckets is not None and base.latency_buckets is not None
    raw = stats.latency_test(canary.latency_buckets, base.latency_buckets, 0.5, 1.0, 0.99)
    assert raw.p_value <= 1e-6 and raw.significant  # without the floor: a regression
    v = judge(PLAN, WINDOW, Comparison(canary, base, "baseline"))
    lat = next(m for m in v.metrics if m.name == "latency")
    assert lat.effect is not None and 1.0 < lat.effect < 1.1
    assert lat.classification == PASS
    assert v.outcome == PASS


# ---- sparse data: no data is not success ----


@pytest.mark.parametrize(
    ("ec", "nc", "eb", "nb"),
    [(2, 40, 1, 40), (0, 30, 0, 30), (4, 200, 2, 200), (1, 25, 0, 25)],
)
def test_sparse_error_counts_are_never_a_pass(ec: int, nc: int, eb: int, nb: int) -> None:
    step = Comparison(Measurement(nc, ec), Measurement(nb, eb), "baseline")
    v = judge(PLAN, Measurement(requests=nc, errors=ec, p99_ms=80.0), step)
    err = next(m for m in v.metrics if m.name == "error_rate")
    assert err.classification == NO_DATA
    assert v.outcome == NO_DATA
    # Once the hold expires, error_rate's default rule (pause) asks for a person: still
    # not a pass, and not a failure either.
    expired = judge(PLAN, Measurement(requests=nc, errors=ec, p99_ms=80.0), step, True)
    assert expired.outcome == NO_DATA and expired.pause_requested
    # With the rule set to fail, it fails, and being critical it scores 0.
    strict = with_metric(PLAN, "error_rate", on_no_data="fail")
    failed = judge(strict, Measurement(requests=nc, errors=ec, p99_ms=80.0), step, True)
    assert failed.outcome == FAIL and failed.score == 0


def test_too_few_latency_samples_hold_then_pass_by_the_rule() -> None:
    rng = np.random.default_rng(14)
    canary = pool(rng, 20_000, 0.01, latency_samples=30)
    base = pool(rng, 20_000, 0.01, latency_samples=30)
    step = Comparison(canary, base, "baseline")
    v = judge(PLAN, WINDOW, step)
    lat = next(m for m in v.metrics if m.name == "latency")
    assert lat.classification == NO_DATA and "need 50" in lat.detail
    assert v.outcome == NO_DATA  # holding, not passing
    # latency's on_no_data is `pass`: past max_hold it no longer holds the verdict.
    expired = judge(PLAN, WINDOW, step, hold_expired=True)
    assert expired.outcome == PASS
    assert not expired.pause_requested


def test_no_data_with_a_pause_rule_requests_a_pause_once_the_hold_expires() -> None:
    metrics = (
        MetricSpec("error_rate", critical=True, group="errors"),
        MetricSpec(
            "latency",
            MetricKind.LATENCY,
            allowed_change=1.1,
            group="latency",
            on_no_data=NoDataRule.PAUSE,
        ),
    )
    plan = replace(PLAN, analysis=replace(PLAN.analysis, metrics=metrics))
    rng = np.random.default_rng(15)
    step = Comparison(
        pool(rng, 20_000, 0.01, latency_samples=10),
        pool(rng, 20_000, 0.01, latency_samples=10),
        "baseline",
    )
    assert judge(plan, WINDOW, step).outcome == NO_DATA  # holding until max_hold
    expired = judge(plan, WINDOW, step, hold_expired=True)
    assert expired.pause_requested
    assert expired.outcome == NO_DATA
    assert next(m for m in expired.metrics if m.name == "latency").on_no_data == NoDataRule.PAUSE


# ---- scores and groups ----


def test_group_weights_give_the_weighted_share_of_passing_metrics() -> None:
    """Group a (weight 2): errors pass, p50 latency high -> 1/2; group b (weight 1): p90
    latency high -> 0. Score 100 * (2 * 0.5 + 1 * 0) / 3 = 33.3; nothing critical."""
    metrics = (
        MetricSpec("errors", group="a"),
        MetricSpec("p50", MetricKind.LATENCY, allowed_change=1.1, group="a"),
        MetricSpec("p90", MetricKind.LATENCY, allowed_change=1.1, quantile=0.9, group="b"),
    )
    analysis = Analysis(metrics=metrics, groups={"a": 2, "b": 1}, pass_score=95, marginal_score=30)
    plan = replace(PLAN, analysis=analysis)
    rng = np.random.default_rng(16)
    step = Comparison(pool(rng, 5_000, 0.01, 1.3), pool(rng, 5_000, 0.01), "baseline")
    v = judge(plan, WINDOW, step)
    assert [m.classification for m in v.metrics] == [PASS, HIGH, HIGH]
    assert v.score == pytest.approx(100 / 3)
    assert v.outcome == MARGINAL
    stricter = judge(replace(plan, analysis=replace(analysis, marginal_score=34)), WINDOW, step)
    assert stricter.outcome == FAIL and stricter.conclusive


def test_without_a_comparator_only_the_guardrails_judge() -> None:
    rng = np.random.default_rng(17)
    canary = pool(rng, 20_000, 0.5, slowdown=3.0)  # awful, but nothing to compare with
    step = Comparison(canary, None, "")
    v = judge(PLAN, WINDOW, step)
    assert v.metrics == () and v.score is None
    assert v.outcome == PASS
    strict = replace(PLAN, guardrails=Guardrails(max_error_rate=0.005, max_p99_ms=500))
    failed = judge(strict, WINDOW, step)
    assert failed.outcome == FAIL and not failed.conclusive  # a guardrail: needs a 2nd look
    assert [c.metric for c in failed.failed()] == ["error_rate"]
    few = judge(PLAN, Measurement(requests=5, errors=0, p99_ms=10.0), step)
    assert few.outcome == NO_DATA


# ---- properties ----


MAX_ERRORS = 250
"""Error counts in the properties stay at or below this: each alternative's likelihood
ratio is at most 16**errors, so exp() cannot overflow (16**250 < e**709). Larger counts
overflow today: see test_overwhelming_error_evidence_is_a_fail_not_an_exception."""


@st.composite
def error_counts(draw: st.DrawFn) -> tuple[int, int, int, int]:
    nc = draw(st.integers(min_value=1, max_value=100_000))
    nb = draw(st.integers(min_value=1, max_value=100_000))
    ec = draw(st.integers(0, min(nc, MAX_ERRORS)))
    return ec, nc, draw(st.integers(0, min(nb, MAX_ERRORS))), nb


@settings(max_examples=300, deadline=None)
@given(
    error_counts(),
    st.floats(min_value=1.0, max_value=3.0),
    st.floats(min_value=0.5, max_value=0.9999),
    st.booleans(),
    st.booleans(),
)
def test_error_test_p_value_is_a_probability(
    c: tuple[int, int, int, int], ratio: float, conf: float, up: bool, down: bool
) -> None:
    t = stats.error_ratio_test(*c, ratio, conf, up, down)
    assert 0.0 <= t.p_value <= 1.0
    # The p-value already carries the two-sided correction: it is what is compared.
    assert t.significant == (t.p_value <= 1 - conf and (up or down))
    assert not (t.significant and not (up or down))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 10_000), st.floats(0.5, 0.999), st.floats(0.5, 0.999))
def test_clopper_pearson_upper_bound(k: int, n: int, c1: float, c2: float) -> None:
    k = min(k, n)
    lo, hi = sorted((c1, c2))
    u_lo, u_hi = stats.binomial_upper(k, n, lo), stats.binomial_upper(k, n, hi)
    # Confidences a float's step apart may give bounds a rounding error apart.
    assert k / n <= u_lo <= u_hi + 1e-12 and u_hi <= 1.0
    if k < n:
        assert u_lo > k / n


@settings(max_examples=300, deadline=None)
@given(error_counts(), st.floats(min_value=1.0, max_value=3.0), st.floats(0.5, 0.9999))
def test_error_test_never_flags_a_canary_that_is_not_worse(
    c: tuple[int, int, int, int], ratio: float, conf: float
) -> None:
    ec, nc, eb, nb = c
    if ec * nb > eb * nc:  # canary's rate above the comparator's: not this property
        ec = eb * nc // nb
    t = stats.error_ratio_test(ec, nc, eb, nb, ratio, conf)
    assert not t.significant
    assert t.p_value == 1.0
    step = Comparison(Measurement(nc, ec), Measurement(nb, eb), "baseline")
    v = judge(PLAN, WINDOW, step)
    assert next(m for m in v.metrics if m.name == "error_rate").classification != HIGH


@settings(max_examples=300, deadline=None)
@given(error_counts(), st.floats(min_value=1.0, max_value=3.0), st.floats(0.5, 0.9999))
def test_swapping_canary_and_comparator_mirrors_the_error_test(
    c: tuple[int, int, int, int], ratio: float, conf: float
) -> None:
    ec, nc, eb, nb = c
    inc = stats.error_ratio_test(ec, nc, eb, nb, ratio, conf, True, False)
    dec = stats.error_ratio_test(eb, nb, ec, nc, ratio, conf, False, True)
    assert inc.p_value == pytest.approx(dec.p_value, rel=1e-9)
    assert inc.significant == dec.significant
    assert inc.effect is not None and dec.effect is not None
    assert inc.effect * dec.effect == pytest.approx(1.0)


def histograms(max_count: int = 2_000) -> st.SearchStrategy[list[int]]:
    return st.lists(
        st.integers(0, max_count), min_size=len(ENVOY_BUCKETS_MS), max_size=len(ENVOY_BUCKETS_MS)
    )


def cumulative(per_bucket: list[int]) -> tuple[tuple[float, float], ...]:
    return tuple(zip(ENVOY_BUCKETS_MS, np.cumsum(per_bucket).astype(float).tolist(), strict=True))


@settings(max_examples=300, deadline=None)
@given(
    histograms(),
    histograms(),
    st.floats(0.05, 0.99),
    st.sampled_from([1.0, 1.0, 1.1, 1.3]),
    st.booleans(),
)
def test_latency_test_p_value_and_mirror(
    a: list[int], b: list[int], q: float, ratio: float, either: bool
) -> None:
    ca, cb = cumulative(a), cumulative(b)
    inc = stats.latency_test(ca, cb, q, ratio, 0.99, True, either)
    assert 0.0 <= inc.p_value <= 1.0
    dec = stats.latency_test(cb, ca, q, ratio, 0.99, either, True)
    assert 0.0 <= dec.p_value <= 1.0
    if ratio == 1.0:  # no allowance to apply: swapping the pools mirrors the test exactly
        assert inc.p_value == pytest.approx(dec.p_value, rel=1e-9)
        assert inc.significant == dec.significant
    if inc.effect and dec.effect:
        assert inc.effect * dec.effect == pytest.approx(1.0)


@settings(max_examples=300, deadline=None)
@given(histograms(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_quantile_is_monotone_in_q(per_bucket: list[int], q1: float, q2: float) -> None:
    bounds, counts = stats.bucket_counts(cumulative(per_bucket))
    lo, hi = sorted((q1, q2))
    a, b = stats.quantile(bounds, counts, lo), stats.quantile(bounds, counts, hi)
    if sum(per_bucket) == 0:
        assert a is None and b is None
        return
    assert a is not None and b is not None
    assert 0.0 <= a <= b <= max(x for x in ENVOY_BUCKETS_MS if math.isfinite(x))


optional_number = st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False))
measurements = st.builds(
    Measurement,
    requests=optional_number,
    errors=st.one_of(st.none(), st.floats(0, MAX_ERRORS)),
    p99_ms=optional_number,
    problem=st.one_of(st.none(), st.just("prometheus unreachable")),
    latency_buckets=st.one_of(st.none(), histograms().map(cumulative)),
)


@settings(max_examples=400, deadline=None)
@given(
    measurements,
    measurements,
    st.one_of(st.none(), measurements),
    st.booleans(),
    st.sampled_from(["window", "canary", "comparator"]),
)
def test_judge_never_passes_without_evidence(
    window: Measurement,
    canary: Measurement,
    comparator: Measurement | None,
    expired: bool,
    broken: str,
) -> None:
    """A window below min_requests, or any measurement with a problem: never a pass."""
    if broken == "window":
        if window.problem is None and (window.requests or 0) >= PLAN.guardrails.min_requests:
            window = replace(window, requests=PLAN.guardrails.min_requests - 1)
    elif broken == "canary":  # (without a comparator the step is not judged at all)
        canary = replace(canary, problem="query error")
        comparator = comparator or Measurement(requests=1e5, errors=10)
    else:
        comparator = replace(comparator or Measurement(), problem="query error")
    v = judge(PLAN, window, Comparison(canary, comparator, "baseline"), expired)
    assert v.outcome != PASS


def test_overwhelming_error_evidence_is_a_fail_not_an_exception() -> None:
    """A canary failing 20% of 10,000 requests against a baseline's 1% (1,000 requests/s
    per pool, the default 10 s interval, first look) must be a conclusive FAIL. The
    likelihood ratio is far beyond what a float holds: it must be kept in logs."""
    step = Comparison(Measurement(10_000, 2_000), Measurement(10_000, 100), "baseline")
    v = judge(PLAN, Measurement(requests=10_000, errors=2_000, p99_ms=100.0), step)
    assert v.outcome == FAIL and v.conclusive


# ---- the sequential claim ----


def _repeated_looks(
    seed: int, trials: int, looks: int, per_look: float, ratio: float, conf: float
) -> float:
    """Share of trials in which the error test is ever significant over `looks` looks."""
    rng = np.random.default_rng(seed)
    p = 0.05
    nc = np.cumsum(rng.poisson(per_look, size=(trials, looks)), axis=1)
    nb = np.cumsum(rng.poisson(per_look, size=(trials, looks)), axis=1)
    ec = np.cumsum(rng.binomial(np.diff(nc, prepend=0, axis=1), min(1.0, p * ratio)), axis=1)
    eb = np.cumsum(rng.binomial(np.diff(nb, prepend=0, axis=1), p), axis=1)
    rejected = 0
    for i in range(trials):
        for k in range(looks):
            t = stats.error_ratio_test(ec[i, k], nc[i, k], eb[i, k], nb[i, k], 1.0, conf)
            if t.significant:
                rejected += 1
                break
    return rejected / trials


def test_error_test_false_alarms_over_many_looks_stay_below_alpha() -> None:
    """300 trials x 30 looks on identical pools at confidence 0.95: by Ville's inequality
    the rate of ever rejecting is at most 0.05; allow 2.5 binomial standard errors."""
    trials, alpha = 300, 0.05
    rate = _repeated_looks(seed=21, trials=trials, looks=30, per_look=100, ratio=1.0, conf=0.95)
    assert rate <= alpha + 2.5 * math.sqrt(alpha * (1 - alpha) / trials)
    # The same simulation does detect a real 2x regression: the bound above is not vacuous.
    assert _repeated_looks(22, 100, 30, 100, ratio=2.0, conf=0.95) >= 0.9


def test_latency_test_false_alarms_over_many_looks_stay_below_alpha() -> None:
    """Same, for the Mann-Whitney mixture test (effect floor off: allowed ratio 1.0)."""
    rng = np.random.default_rng(23)
    trials, looks, alpha = 300, 30, 0.05
    probs = np.zeros(len(ENVOY_BUCKETS_MS))
    probs[3:10] = 1 / 7  # 7 buckets from 5 ms to 1 s, equally likely
    shape = (trials, looks)
    canary = np.cumsum(rng.multinomial(rng.poisson(20, size=shape), probs), axis=1)
    base = np.cumsum(rng.multinomial(rng.poisson(20, size=shape), probs), axis=1)
    rejected = 0
    for i in range(trials):
        for k in range(looks):
            c, b = cumulative(canary[i, k].tolist()), cumulative(base[i, k].tolist())
            if stats.latency_test(c, b, 0.5, 1.0, 1 - alpha).significant:
                rejected += 1
                break
    assert rejected / trials <= alpha + 2.5 * math.sqrt(alpha * (1 - alpha) / trials)


def test_a_slowdown_within_the_allowance_is_not_flagged_over_many_looks() -> None:
    """A canary 5% slower than baseline under a 10% allowance, looked at 30 times with
    plenty of data: the test's null is the allowance, not "no difference", so the
    false-alarm bound still holds (it did not when only the point estimate was floored).
    """
    rng = np.random.default_rng(29)
    trials, looks, alpha = 200, 30, 0.05
    flagged = 0
    for _ in range(trials):
        n = rng.poisson(300, size=(looks, 2))
        c_times = [rng.lognormal(math.log(30.0 * 1.05), 0.5, size=k) for k in n[:, 0]]
        b_times = [rng.lognormal(math.log(30.0), 0.5, size=k) for k in n[:, 1]]
        for k in range(looks):
            c = tail_hist(np.concatenate(c_times[: k + 1]))
            b = tail_hist(np.concatenate(b_times[: k + 1]))
            if stats.latency_test(c, b, 0.5, 1.1, 1 - alpha).significant:
                flagged += 1
                break
    assert flagged / trials <= alpha + 2.5 * math.sqrt(alpha * (1 - alpha) / trials)


def test_a_slowdown_beyond_the_allowance_is_flagged() -> None:
    rng = np.random.default_rng(30)
    c = tail_hist(rng.lognormal(math.log(30.0 * 1.3), 0.5, size=3000))
    b = tail_hist(rng.lognormal(math.log(30.0), 0.5, size=3000))
    t = stats.latency_test(c, b, 0.5, 1.1, 0.99)
    assert t.significant and t.higher and t.effect is not None and t.effect > 1.1


# ---- the benchmark ----


def test_judge_power_benchmark_quick_json() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "judge_power.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        check=True,
    )
    result = json.loads(out.stdout)
    cases = result["cases"]
    scenarios = {c["scenario"] for c in cases}
    assert scenarios == {"healthy", "errors_2x", "latency_1.3x", "tail_1.3x"}
    assert {c["rps"] for c in cases} == {10, 100, 1000}
    assert len(result["parameters"]["base_error_rates"]) == 2
    for c in cases:
        assert "false_rollback_rate" in c and "detect_p95_s" in c
        if c["scenario"] == "healthy":
            assert 0.0 <= c["false_rollback_rate"] <= c["false_rollback_rate_per_rollout"] <= 1.0
        else:
            assert c["false_rollback_rate"] is None
        p95 = c["detect_p95_s"]
        assert p95 is None or 0 < p95 <= result["parameters"]["duration_s"]
    assert set(result["targets"]) == {
        "false_rollbacks",
        "false_rollbacks_per_rollout",
        "errors_2x_detect",
        "srm_false_alarms",
    }
    # The sample-ratio test: healthy splits at every rate, and a split off its weights
    # (the canary sent 14% of a 20% step) held in every quick step at 5,000 requests/s.
    srm = result["srm_cases"]
    assert {c["case"] for c in srm if c["healthy"]} == {"5%", "20%", "50%"}
    off = [c for c in srm if not c["healthy"] and c["service_rps"] == 5000]
    assert off and off[0]["hold_rate"] == 1.0
    # The default plan over three regions: each metric's level is shared by 9 tests.
    assert result["parameters"]["tests_sharing_alpha"] == 9
    # A 30% slowdown at 1000 requests/s is found in every quick trial.
    fast = [c for c in cases if c["scenario"] == "latency_1.3x" and c["rps"] == 1000]
    assert all(c["rollback_share"] == 1.0 for c in fast)


def test_either_direction_labels_a_failure_by_the_way_the_canary_moved() -> None:
    """The rank test decides which way the canary moved, not the p50 ratio: here the
    canary's p50 is lower but it is slower by rank and at p90."""
    inf = float("inf")
    base = ((25.0, 400.0), (50.0, 400.0), (250.0, 1000.0), (500.0, 1000.0), (inf, 1000.0))
    canary = ((25.0, 0.0), (50.0, 550.0), (250.0, 550.0), (500.0, 1000.0), (inf, 1000.0))
    t = stats.latency_test(canary, base, 0.5, 1.1, 0.99, True, True)
    assert t.higher is True
    t90 = stats.latency_test(canary, base, 0.9, 1.1, 0.99, True, True)
    assert t90.significant and t90.higher is True


XDS_BUCKETS_MS = (*LATENCY_BUCKETS_MS, math.inf)
"""The buckets `xds-server bootstrap` gives Envoy (Envoy's own are too coarse for tails)."""


def tail_hist(times: np.ndarray) -> tuple[tuple[float, float], ...]:
    """Request times -> the cumulative histogram on xds-server's buckets."""
    idx = np.searchsorted(np.array(XDS_BUCKETS_MS[:-1]), times, side="left")
    counts = np.cumsum(np.bincount(idx, minlength=len(XDS_BUCKETS_MS))).astype(float)
    return tuple(zip(XDS_BUCKETS_MS, counts.tolist(), strict=True))


def tail_pool(rng: np.random.Generator, n: int, tail_slowdown: float) -> Measurement:
    """Like `pool`, but only the slow 3% of requests are slowed down."""
    body = rng.lognormal(math.log(30.0), 0.5, size=n)
    tail = rng.lognormal(math.log(150.0), 0.7, size=n) * tail_slowdown
    times = np.where(rng.random(n) < 0.03, tail, body)
    return Measurement(requests=n, errors=0, latency_buckets=tail_hist(times))


def test_a_slower_tail_alone_fails_on_the_critical_p99_metric() -> None:
    """Only the slowest requests got slower (p99 +30%, median unchanged): the rank test on
    the whole distribution misses it, the tail metric does not."""
    rng = np.random.default_rng(21)
    canary, base = tail_pool(rng, 150_000, 1.3), tail_pool(rng, 150_000, 1.0)
    v = judge(PLAN, WINDOW, Comparison(canary, base, "baseline"))
    by_name = {m.name: m for m in v.metrics}
    assert by_name["latency"].classification == PASS
    tail = by_name["latency_p99"]
    assert tail.classification == HIGH and tail.effect is not None and tail.effect > 1.2
    assert "slower than" in tail.detail
    assert v.outcome == FAIL and v.conclusive and v.score == 0


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_identical_tails_pass(seed: int) -> None:
    rng = np.random.default_rng(seed)
    canary, base = tail_pool(rng, 20_000, 1.0), tail_pool(rng, 20_000, 1.0)
    tail = next(
        m
        for m in judge(PLAN, WINDOW, Comparison(canary, base, "baseline")).metrics
        if m.name == "latency_p99"
    )
    assert tail.classification == PASS


@settings(max_examples=200, deadline=None)
@given(histograms(), histograms(), st.sampled_from([0.9, 0.95, 0.99]))
def test_the_tail_bound_favours_neither_side(a: list[int], b: list[int], q: float) -> None:
    """The slow/fast bound is chosen from both pools together: swapping them swaps the
    counts, so how the bound was picked cannot make either side look slower."""
    bound, sa, na, sb, nb = stats.tail_counts(cumulative(a), cumulative(b), q)
    bound2, sb2, nb2, sa2, na2 = stats.tail_counts(cumulative(b), cumulative(a), q)
    assert bound == bound2 and (sa, na, sb, nb) == (sa2, na2, sb2, nb2)
    assert 0 <= sa <= na and 0 <= sb <= nb


def test_a_score_fails_only_when_metrics_still_waiting_for_data_cannot_lift_it() -> None:
    """Latency high (weight 10) while errors (weight 90) still lack data: the score so far
    is 0, but errors could still pass and make it 90. That is a hold, not a failure."""
    rng = np.random.default_rng(12)
    plan = with_metric(TWO, "error_rate", ignore_below=0.0001)
    plan = replace(plan, analysis=replace(plan.analysis, groups={"errors": 90, "latency": 10}))
    slow = replace(pool(rng, 5_000, 0.0, slowdown=1.3), errors=1)
    base = replace(pool(rng, 5_000, 0.0), errors=1)
    v = judge(plan, WINDOW, Comparison(slow, base, "baseline"))
    classes = {m.name: m.classification for m in v.metrics}
    assert classes == {"error_rate": NO_DATA, "latency": HIGH}
    assert v.outcome == NO_DATA and not v.conclusive
    # With the errors settled (clean), the same latency result is marginal, not a failure.
    settled = replace(plan, analysis=replace(plan.analysis, metrics=TWO.analysis.metrics))
    step = Comparison(replace(slow, errors=0), replace(base, errors=0), "baseline")
    clean = judge(settled, WINDOW, step)
    assert clean.outcome == MARGINAL and clean.score == pytest.approx(90)


def test_a_guardrail_breach_is_conclusive_only_when_its_window_proves_it() -> None:
    from scipy.stats import binom

    from xds_server.rollout.judge import GUARDRAIL_CERTAINTY, certain_breach

    ceiling = 0.05
    plan = replace(PLAN, guardrails=Guardrails(max_error_rate=ceiling, max_p99_ms=1e9))
    # For every window size, the fewest errors called certain are those a canary right
    # at the ceiling reaches with probability at most 1 - GUARDRAIL_CERTAINTY (the exact
    # binomial tail), and one error fewer is not certain: no look fails a canary at 5%
    # more often.
    for n in range(plan.guardrails.min_requests, 400):
        k = next(k for k in range(n + 1) if certain_breach(plan, Measurement(n, k, 10.0)))
        assert binom.sf(k - 1, n, ceiling) <= 1 - GUARDRAIL_CERTAINTY
        assert binom.sf(k - 2, n, ceiling) > (1 - GUARDRAIL_CERTAINTY) / 10
    certain = judge(plan, Measurement(100, 20, 10.0))
    assert certain.outcome == FAIL and certain.conclusive and "certain: 20 errors" in certain.reason
    noisy = judge(plan, Measurement(100, 10, 10.0))  # 10%, but a canary at 3% can do it
    assert noisy.outcome == FAIL and not noisy.conclusive and "certain" not in noisy.reason
    assert not certain_breach(plan, Measurement(100, 20, 10.0, problem="stale"))
