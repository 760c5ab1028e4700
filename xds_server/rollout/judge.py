"""Judging one region's canary. Pure: no I/O, no clock.

Two kinds of evidence make a verdict:
- **SLA guardrails**: absolute ceilings on the canary's error rate and p99 over the
  sliding window (a point check; the state machine wants it to fail more than once);
- **the analysis**: each metric compares canary with its comparator (baseline, or
  production when there is no baseline) over the whole step with a sequential test
  (stats.py), is classified pass / high / low / no data, and the classes are scored
  0-100 in weighted groups, as Kayenta does. A failed critical metric scores 0.

The outcome is `pass`, `fail`, `marginal` or `no_data`. Too little data is never a pass:
it holds the step, and only when that hold reaches `max_hold` does each metric's own
`on_no_data` rule (fail, pause or pass) apply. A failure of the analysis is
*conclusive*: its test already weighed every look, so the canary is rolled back at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace

from xds_server.rollout import stats
from xds_server.rollout.evidence import (
    FAIL,
    HIGH,
    LOW,
    MARGINAL,
    NO_DATA,
    PASS,
    Check,
    Comparison,
    Measurement,
    MetricClass,
    MetricReading,
    MetricResult,
    Signals,
    Throughput,
    Verdict,
    finite,
)
from xds_server.spec import Direction, MetricKind, MetricSpec, NoDataRule, RolloutPlan

THROUGHPUT_CONFIDENCE = 0.99
"""The throughput shortfall's level, shared like a metric's by the rollout's tests."""
SRM_CONFIDENCE = 0.999
"""The sample-ratio mismatch test's level, shared like a metric's by the rollout's
tests: at most 0.1% of a region's steps hold on a healthy split (Ville's inequality)."""
ZERO_SHARE = 1e-4
"""The share a pool at weight 0 counts for in the SRM test when requests reach it."""


def reading_point(reading: MetricReading, quantile: float) -> float | None:
    """The canary's own value of a user metric, for `max`/`min`: the ratio, the value,
    or the histogram's `quantile`."""
    if reading.buckets:
        bounds, counts = stats.bucket_counts(reading.buckets)
        return stats.quantile(bounds, counts, quantile)
    if reading.numerator is not None:
        den = finite(reading.denominator)
        return (finite(reading.numerator) or 0.0) / den if den else None
    return finite(reading.value)


def judge(
    plan: RolloutPlan,
    canary: Measurement,
    comparison: Comparison | None = None,
    hold_expired: bool = False,
    regions: int = 1,
) -> Verdict:
    """`canary`: the sliding window, for the guardrails; `comparison`: the step so far;
    `regions`: how many the rollout crosses (they share each metric's false-alarm level
    when its scope is the rollout). The region's signal health (`comparison.signals`)
    then decides whether a verdict other than a failure may stand (`trusted`)."""
    verdict = _judge(plan, canary, comparison, hold_expired, regions)
    signals = comparison.signals if comparison is not None else None
    return trusted(plan, verdict, signals, plan.analysis_tests(regions))


def trusted(plan: RolloutPlan, verdict: Verdict, signals: Signals | None, tests: int) -> Verdict:
    """A verdict, held when its evidence cannot be trusted: stale, partial or reset
    series (no data, never a pass), or a sample-ratio mismatch (the split Envoy made is
    not the configured one: the comparison does not mean what it assumes).

    A failure stands either way: it was measured on the canary's own requests (its
    error rate, latency, what it delivered of what it was sent), a rollback only moves
    users to production, and a canary failing where part of the signal is missing must
    not keep its share for max_hold. Signal trouble blocks passing, never rolling back.
    Freshness comes first: a stale count says nothing of the split either."""
    if signals is None:
        return verdict
    signals = srm(plan, signals, tests)
    verdict = replace(verdict, signals=signals)
    if verdict.outcome == FAIL:
        return verdict
    why = ""
    if signals.problem:
        why = f"no data: {signals.problem}"
    elif signals.srm_p is not None and signals.srm_p <= (1 - SRM_CONFIDENCE) / tests:
        why = srm_reason(signals)
    if not why:
        return verdict
    return replace(verdict, outcome=NO_DATA, reason=why, untrusted=why)


def srm(plan: RolloutPlan, signals: Signals, tests: int) -> Signals:
    """The sample-ratio mismatch test of the requests Envoy routed to the pools with a
    configured share (its p-value into the signals), or why it does not run."""
    if signals.srm_skipped:
        return signals  # the reader knows it is no split (shadow traffic)
    if plan.sticky is not None:
        why = "not tested: sticky sessions split users, not requests"
        return replace(signals, srm_skipped=why)
    weighted = [p for p, share in signals.configured.items() if share > 0]
    # A pool at weight 0 that Envoy still sends requests to (an Envoy at old weights
    # at 50%, where production has none) is a mismatch too: it counts with a share of
    # ZERO_SHARE, so a stray request is no proof and dozens are.
    pools = [p for p in signals.configured if p in weighted or signals.sent.get(p, 0.0) > 0]
    if len(weighted) < 2 and len(pools) < 2:
        return replace(signals, srm_skipped="not tested: one pool takes every request")
    if not signals.sent:
        return signals
    alpha = (1 - SRM_CONFIDENCE) / tests
    shares = [max(signals.configured[p], ZERO_SHARE) for p in pools]
    t = stats.srm_test([signals.sent.get(p, 0.0) for p in pools], shares, alpha)
    return replace(signals, srm_p=t.p_value)


def srm_reason(signals: Signals) -> str:
    """`sample ratio mismatch: canary 14.1% of routed requests, configured 20%, p=...`"""
    share = signals.canary_share or 0.0
    configured = signals.configured.get("canary", 0.0)
    p = signals.srm_p if signals.srm_p is not None else 1.0
    total = sum(signals.sent.values())
    return (
        f"sample ratio mismatch: canary {share * 100:.1f}% of routed requests, "
        f"configured {configured * 100:.3g}%, p={p:.2g} ({total:.0f} requests; "
        + ", ".join(f"{pool} {n:.0f}" for pool, n in signals.sent.items())
        + ")"
    )


def _judge(
    plan: RolloutPlan,
    canary: Measurement,
    comparison: Comparison | None,
    hold_expired: bool,
    regions: int,
) -> Verdict:
    tests = plan.analysis_tests(regions)
    metrics = analyse(plan, comparison, tests) if comparison is not None else ()
    score, best, critical_failed = _score(plan, metrics, hold_expired)
    checks, guard_gap = guardrail_checks(plan, canary)
    if comparison is not None:
        alpha = (1 - THROUGHPUT_CONFIDENCE) / tests
        shortfall = throughput_check(plan, comparison.throughput, alpha)
        checks += [shortfall] if shortfall is not None else []
    failed = [c for c in checks if not c.ok]
    bad = [m for m in metrics if m.classification in (HIGH, LOW)]
    if hold_expired:
        bad += [
            m
            for m in metrics
            if m.classification == MetricClass.NO_DATA and m.on_no_data == NoDataRule.FAIL
        ]
    scored = f"score {score:.0f}" if score is not None else "no score"
    # Fail on the score only when the metrics still waiting for data could not lift it.
    if critical_failed or (best is not None and best < plan.analysis.marginal_score):
        why = "; ".join(_describe(m) for m in bad) or "every metric failed"
        return Verdict(FAIL, f"{scored}: {why}", tuple(checks), metrics, score, conclusive=True)
    if failed:
        why, certain = "; ".join(c.describe() for c in failed), certain_breach(plan, canary)
        return Verdict(
            FAIL,
            f"{why} ({certain})" if certain else why,
            tuple(checks),
            metrics,
            score,
            conclusive=bool(certain),
        )
    holding = [
        m
        for m in metrics
        if m.classification == MetricClass.NO_DATA
        and not (hold_expired and m.on_no_data == NoDataRule.PASS)
    ]
    if guard_gap or holding:
        why = guard_gap or "; ".join(_describe(m) for m in holding)
        return Verdict(NO_DATA, why, tuple(checks), metrics, score)
    if score is not None and score < plan.analysis.pass_score:
        why = "; ".join(_describe(m) for m in bad)
        return Verdict(MARGINAL, f"marginal {scored}: {why}", tuple(checks), metrics, score)
    requests = finite(canary.requests) or 0.0
    summary = f"within guardrails ({requests:.0f} requests)"
    if score is not None:
        compared = comparison.comparator_pool if comparison else ""
        summary += f"; {scored} against {compared}"
    return Verdict(PASS, summary, tuple(checks), metrics, score)


GUARDRAIL_CERTAINTY = 0.99
"""Per look: the confidence at which the window's own errors prove the canary's error
rate above `max_error_rate`, so that the breach needs no second look."""


def certain_breach(plan: RolloutPlan, canary: Measurement) -> str:
    """Why the error-rate guardrail's breach is certain ("" when it is not).

    `failures_before_rollback` asks a breach to repeat because one window is a noisy
    point estimate: 1 error in 15 requests is "over 5%" by chance for a canary at 2%.
    When the window's errors alone rule out a rate at or below the ceiling (the exact
    binomial test, Clopper-Pearson lower bound above it at 99%), a second look can
    only cost users another interval of errors: the failure is conclusive, as an
    analysis test's is. Per look, a canary *at* the ceiling is failed this way with
    probability at most 1%, one at half the ceiling at most 0.01% (windows of 10 to
    400 requests); the repeat rule it short-cuts breaks the ceiling on 4-22% of such
    looks of a canary at half of it, and rolls one at the ceiling back within a few
    looks anyway. (At 99.9% a canary failing one call in five, seen by 20 requests a
    window, was certain on 20% of looks; at 99%, 37%: rollback_latency's tail.)"""
    g = plan.guardrails
    requests, errors = finite(canary.requests), finite(canary.errors)
    if canary.problem or not requests or errors is None or requests < g.min_requests:
        return ""
    # increase() extrapolates: whole counts, rounded half up, errors never above requests
    n = math.floor(requests + 0.5)
    k = min(math.floor(errors + 0.5), n)
    if k == 0 or k / n <= g.max_error_rate:
        return ""
    lower = 1 - stats.binomial_upper(n - k, n, GUARDRAIL_CERTAINTY)
    if lower <= g.max_error_rate:
        return ""
    return (
        f"certain: {k} errors of {n} requests put the rate above {lower:.3g} at "
        f"{GUARDRAIL_CERTAINTY:.1%} confidence"
    )


def guardrail_checks(plan: RolloutPlan, canary: Measurement) -> tuple[list[Check], str]:
    """The SLA ceilings; the second value says why there is no evidence, if there is none."""
    g = plan.guardrails
    if canary.problem:
        return [], f"canary metrics unavailable: {canary.problem}"
    requests = finite(canary.requests)
    if requests is None or requests < g.min_requests:
        got = "none" if requests is None else f"{requests:.0f}"
        return [], f"too few canary requests in the window: {got} (need {g.min_requests})"
    rate = canary.error_rate or 0.0
    checks = [Check("error_rate", rate, g.max_error_rate, rate <= g.max_error_rate)]
    checks += tenant_checks(plan, canary) + bound_checks(plan, canary)
    p99 = finite(canary.p99_ms)
    if p99 is None:
        return checks, "canary latency p99 unavailable"
    checks.append(Check("p99_ms", p99, g.max_p99_ms, p99 <= g.max_p99_ms))
    return checks, ""


def tenant_checks(plan: RolloutPlan, canary: Measurement) -> list[Check]:
    """Each tenant's budget on its slice of the canary's window (with enough requests);
    a breach names the tenant."""
    t = plan.guardrails.tenants
    checks = []
    for name, budget in t.budgets.items():
        m = canary.tenants.get(name)
        if m is None or m.problem or (finite(m.requests) or 0.0) < t.min_requests:
            continue
        rate = m.error_rate or 0.0
        if budget.max_error_rate is not None:
            limit = budget.max_error_rate
            checks.append(Check(f"tenant {name} error_rate", rate, limit, rate <= limit))
        p99 = finite(m.p99_ms)
        if budget.max_p99_ms is not None and p99 is not None:
            limit = budget.max_p99_ms
            checks.append(Check(f"tenant {name} p99_ms", p99, limit, p99 <= limit))
    return checks


def bound_checks(plan: RolloutPlan, canary: Measurement) -> list[Check]:
    """`max` and `min` of the user metrics, on the canary's own value over the window."""
    checks = []
    for m in plan.analysis.metrics:
        reading = canary.readings.get(m.name)
        if reading is None or reading.problem or (m.max is None and m.min is None):
            continue
        value = reading_point(reading, m.quantile)
        if value is None:
            continue
        if m.max is not None:
            checks.append(Check(m.name, value, m.max, value <= m.max))
        if m.min is not None:
            checks.append(Check(m.name, value, m.min, value >= m.min, floor=True))
    return checks


def throughput_check(plan: RolloutPlan, t: Throughput | None, alpha: float) -> Check | None:
    """What the canary delivered over the step against what Envoy sent it (when the
    signals read that; else against its weight's share of the region's requests). A
    shortfall below `min_throughput_ratio` counts only once a
    sequential test rules out the full share (as the latency metric: no change as the
    null hypothesis, the ratio as an effect-size floor), so a few unlucky seconds at 5%
    never fail it."""
    floor = plan.guardrails.min_throughput_ratio
    if t is None or floor <= 0 or not 0 < t.share <= 1:
        return None
    delivered, sent = finite(t.delivered), finite(t.sent)
    if delivered is not None and sent is not None:
        # Delivered vs what Envoy sent the canary: a split that is off (an Envoy at old
        # weights) moves both, and is the sample-ratio test's to see, not this one's.
        if sent < plan.guardrails.min_requests:
            return None
        ratio = min(delivered / sent, 1.0)
        short = ratio < floor and stats.share_below_test(delivered, sent, 1.0, alpha)
        return Check("throughput_ratio", ratio, floor, not short, floor=True)
    total = finite(t.requests)
    if delivered is None or not total or total < plan.guardrails.min_requests:
        return None
    ratio = delivered / (t.share * total)
    short = ratio < floor and stats.share_below_test(delivered, total, t.share, alpha)
    return Check("throughput_ratio", ratio, floor, not short, floor=True)


def analyse(plan: RolloutPlan, comparison: Comparison, tests: int = 1) -> tuple[MetricResult, ...]:
    """`tests`: how many sequential tests share each metric's false-alarm level."""
    if comparison.comparator is None:
        return ()  # nothing to compare with (the canary takes every request)
    return tuple(_metric(m, comparison, tests) for m in plan.analysis.metrics)


Result = Callable[[MetricClass, float | None, float | None, str], MetricResult]


def _metric(m: MetricSpec, cmp: Comparison, tests: int) -> MetricResult:
    c, b = cmp.canary, cmp.comparator
    assert b is not None
    alpha = (1 - m.confidence) / tests

    def result(
        cls: MetricClass, effect: float | None, p: float | None, detail: str
    ) -> MetricResult:
        return MetricResult(
            m.name, cls, effect, p, detail, m.group, m.critical, m.on_no_data, alpha
        )

    for who, meas in (("canary", c), (cmp.comparator_pool, b)):
        if meas.problem:
            return result(
                MetricClass.NO_DATA, None, None, f"{who} metrics unavailable: {meas.problem}"
            )
    return KINDS[m.kind](m, cmp, alpha, result)


def _errors(m: MetricSpec, cmp: Comparison, alpha: float, result: Result) -> MetricResult:
    return _answers(m, cmp, alpha, result, lambda p: p.errors, "error rate")


def _client_errors(m: MetricSpec, cmp: Comparison, alpha: float, result: Result) -> MetricResult:
    return _answers(m, cmp, alpha, result, lambda p: p.client_errors, "client error rate")


def _answers(
    m: MetricSpec,
    cmp: Comparison,
    alpha: float,
    result: Result,
    counted: Callable[[Measurement], float | None],
    what: str,
) -> MetricResult:
    """Some of each pool's requests' answers (its 5xx, its 4xx), as proportions; a count
    not read is none (Envoy makes a response class's series on its first answer)."""
    c, b = cmp.canary, cmp.comparator
    assert b is not None
    nc, nb = finite(c.requests) or 0.0, finite(b.requests) or 0.0
    ec, eb = finite(counted(c)) or 0.0, finite(counted(b)) or 0.0
    return _proportions(m, cmp.comparator_pool, (ec, nc, eb, nb), alpha, result, what)


def _ratio(m: MetricSpec, cmp: Comparison, alpha: float, result: Result) -> MetricResult:
    readings = _readings(m, cmp)
    if isinstance(readings, str):
        return result(MetricClass.NO_DATA, None, None, readings)
    rc, rb = readings
    counts = (
        finite(rc.numerator) or 0.0,
        finite(rc.denominator) or 0.0,
        finite(rb.numerator) or 0.0,
        finite(rb.denominator) or 0.0,
    )
    return _proportions(m, cmp.comparator_pool, counts, alpha, result, m.name)


def _proportions(
    m: MetricSpec,
    pool: str,
    counts: tuple[float, float, float, float],
    alpha: float,
    result: Result,
    what: str,
) -> MetricResult:
    """Events of trials in canary and comparator, judged as proportions (errors, and
    `ratio` metrics): the binomial mixture test of stats.error_ratio_test."""
    ec, nc, eb, nb = counts
    if nc < 1 or nb < 1:
        trials = "requests" if what.endswith("error rate") else "denominator"
        return result(
            MetricClass.NO_DATA, None, None, f"{trials}: canary {nc:.0f}, {pool} {nb:.0f}"
        )
    up, down = _directions(m)
    t = stats.error_ratio_test(ec, nc, eb, nb, m.allowed_change, m.confidence, up, down, alpha)
    detail = f"canary {ec:.0f}/{nc:.0f}, {pool} {eb:.0f}/{nb:.0f}"
    if t.significant:
        cls = HIGH if (t.effect or 1.0) > 1 else LOW
        return result(cls, t.effect, t.p_value, detail)
    enough = (t.upper is not None and t.upper <= m.detect_change) or (
        t.canary_rate_upper is not None and t.canary_rate_upper <= m.ignore_below
    )
    if enough or (down and not up):
        return result(MetricClass.PASS, t.effect, t.p_value, detail)
    return result(
        MetricClass.NO_DATA,
        t.effect,
        t.p_value,
        f"{detail}: too few to rule out a {m.detect_change:g}x {what}",
    )


def _latency(m: MetricSpec, cmp: Comparison, alpha: float, result: Result) -> MetricResult:
    b = cmp.comparator
    assert b is not None
    cb, bb = cmp.canary.latency_buckets or (), b.latency_buckets or ()
    return _ranks(m, cmp.comparator_pool, cb, bb, alpha, result, "latency samples")


def _distribution(m: MetricSpec, cmp: Comparison, alpha: float, result: Result) -> MetricResult:
    readings = _readings(m, cmp)
    if isinstance(readings, str):
        return result(MetricClass.NO_DATA, None, None, readings)
    rc, rb = readings
    return _ranks(
        m, cmp.comparator_pool, rc.buckets or (), rb.buckets or (), alpha, result, "samples"
    )


def _ranks(
    m: MetricSpec,
    pool: str,
    cb: stats.Buckets,
    bb: stats.Buckets,
    alpha: float,
    result: Result,
    what: str,
) -> MetricResult:
    """Two histograms compared by Mann-Whitney U with an effect-size floor on the
    `quantile`'s ratio (latency, and `distribution` metrics)."""
    n1, n2 = (sum(stats.bucket_counts(x)[1]) for x in (cb, bb))
    if few := _too_few(m, what, pool, n1, n2):
        return result(MetricClass.NO_DATA, None, None, few)
    up, down = _directions(m)
    t = stats.latency_test(cb, bb, m.quantile, m.allowed_change, m.confidence, up, down, alpha)
    detail = f"p{m.quantile * 100:g} ratio over {n1:.0f}/{n2:.0f} samples"
    if t.significant:
        return result(HIGH if t.higher else LOW, t.effect, t.p_value, detail)
    return result(MetricClass.PASS, t.effect, t.p_value, detail)


def _too_few(m: MetricSpec, what: str, pool: str, n1: float, n2: float) -> str:
    """Why two samples are too small to compare (`min_requests` each); "" when they are not."""
    if n1 < m.min_requests or n2 < m.min_requests:
        return f"{what}: canary {n1:.0f}, {pool} {n2:.0f} (need {m.min_requests} each)"
    return ""


def _readings(m: MetricSpec, cmp: Comparison) -> tuple[MetricReading, MetricReading] | str:
    """The canary's and the comparator's readings of a user metric, or why there are none."""
    b = cmp.comparator
    assert b is not None
    rc, rb = cmp.canary.readings.get(m.name), b.readings.get(m.name)
    for who, r in (("canary", rc), (cmp.comparator_pool, rb)):
        if r is None:
            return f"no reading for {who}"
        if r.problem:
            return f"{who}: {r.problem}"
    assert rc is not None and rb is not None
    return rc, rb


def _tail(m: MetricSpec, cmp: Comparison, alpha: float, result: Result) -> MetricResult:
    """The share of slow requests (beyond the joint quantile), compared like errors."""
    b = cmp.comparator
    assert b is not None
    pool = cmp.comparator_pool
    cb, bb = cmp.canary.latency_buckets or (), b.latency_buckets or ()
    bound, slow_c, n1, slow_b, n2 = stats.tail_counts(cb, bb, m.quantile)
    if few := _too_few(m, "latency samples", pool, n1, n2):
        return result(MetricClass.NO_DATA, None, None, few)
    if math.isinf(bound):
        return result(
            MetricClass.NO_DATA, None, None, f"no finite bucket holds p{m.quantile * 100:g}"
        )
    up, down = _directions(m)
    t = stats.error_ratio_test(
        slow_c, n1, slow_b, n2, m.allowed_change, m.confidence, up, down, alpha
    )
    detail = f"slower than {bound:g} ms: canary {slow_c:.0f}/{n1:.0f}, {pool} {slow_b:.0f}/{n2:.0f}"
    if t.significant:
        return result(HIGH if (t.effect or 1.0) > 1 else LOW, t.effect, t.p_value, detail)
    return result(MetricClass.PASS, t.effect, t.p_value, detail)


def _output(m: MetricSpec, cmp: Comparison, alpha: float, result: Result) -> MetricResult:
    """The model's output histograms: the population stability index as the effect, an
    always-valid test of "same distribution" as the evidence. No evidence of a shift is
    a pass (noise inflates a small sample's PSI, never its evidence); a real shift above
    `fail_change` fails; a real one between the allowance and that holds the step."""
    readings = _readings(m, cmp)
    if isinstance(readings, str):
        return result(MetricClass.NO_DATA, None, None, readings)
    rc, rb = readings
    fail = m.fail_change if m.fail_change is not None else m.allowed_change
    t = stats.psi_test(
        rc.buckets or (), rb.buckets or (), m.allowed_change, fail, alpha, m.min_requests
    )
    counts = f"{t.canary_total:.0f}/{t.comparator_total:.0f} outputs"
    if t.psi is None or not t.enough:
        need = f"need {m.min_requests} each"
        return result(MetricClass.NO_DATA, t.psi, t.p_value, f"PSI over {counts} ({need})")
    beyond = f", {t.excess:.3g} beyond noise" if t.excess is not None else ""
    detail = f"PSI {t.psi:.3g}{beyond} over {counts} (allowed {m.allowed_change:g}, fail {fail:g})"
    if t.severe:
        return result(HIGH, t.psi, t.p_value, detail)
    if t.marginal:
        return result(MetricClass.NO_DATA, t.psi, t.p_value, f"{detail}: a real moderate shift")
    if not t.within:
        detail += ": not a significant shift (a small sample's PSI runs high)"
    return result(MetricClass.PASS, t.psi, t.p_value, detail)


def _value(m: MetricSpec, cmp: Comparison, alpha: float, result: Result) -> MetricResult:
    """A rate or gauge: the step's per-interval canary/comparator ratios (their mean log)
    against the allowance, by a sequential t-test."""
    readings = _readings(m, cmp)
    if isinstance(readings, str):
        return result(MetricClass.NO_DATA, None, None, readings)
    up, down = _directions(m)
    t = stats.ratio_of_means_test(
        readings[0].pairs, m.allowed_change, up, down, alpha, min_pairs=m.min_requests
    )
    skipped = f", {t.skipped} skipped (not positive)" if t.skipped else ""
    detail = f"mean ratio over {t.pairs} intervals{skipped}"
    if t.significant:
        return result(HIGH if t.higher else LOW, t.effect, t.p_value, detail)
    if not t.enough:
        need = f" (need {m.min_requests})"
        return result(MetricClass.NO_DATA, t.effect, t.p_value, detail + need)
    return result(MetricClass.PASS, t.effect, t.p_value, detail)


KINDS: Mapping[MetricKind, Callable[[MetricSpec, Comparison, float, Result], MetricResult]] = {
    MetricKind.ERRORS: _errors,
    MetricKind.CLIENT_ERRORS: _client_errors,
    MetricKind.LATENCY: _latency,
    MetricKind.TAIL: _tail,
    MetricKind.RATIO: _ratio,
    MetricKind.DISTRIBUTION: _distribution,
    MetricKind.VALUE: _value,
    MetricKind.OUTPUT: _output,
}
"""The registry of metric kinds: how each compares canary with comparator. A new kind is
a name in `spec.MetricKind` and a function here (and what it reads, in the observer)."""


def _score(
    plan: RolloutPlan, metrics: tuple[MetricResult, ...], hold_expired: bool
) -> tuple[float | None, float | None, bool]:
    """Weighted share of passing metrics, 0-100, over the metrics that could be classed
    (None when none could); the best the score can still become if every metric still
    waiting for data passes; and whether a critical metric failed."""

    def weighted(groups: dict[str, list[bool]]) -> float | None:
        if not groups:
            return None
        weights = {g: plan.analysis.groups.get(g, 1.0) for g in groups}
        total = sum(weights.values())
        return 100 * sum(weights[g] * sum(v) / len(v) for g, v in groups.items()) / total

    known: dict[str, list[bool]] = {}
    best: dict[str, list[bool]] = {}
    critical_failed = False
    for m in metrics:
        if m.classification == MetricClass.NO_DATA and (
            not hold_expired or m.on_no_data == NoDataRule.PAUSE
        ):
            best.setdefault(m.group, []).append(True)
            continue
        if m.classification == MetricClass.NO_DATA:
            ok = m.on_no_data == NoDataRule.PASS
        else:
            ok = m.classification == MetricClass.PASS
        critical_failed |= m.critical and not ok
        known.setdefault(m.group, []).append(ok)
        best.setdefault(m.group, []).append(ok)
    if critical_failed:
        return 0.0, 0.0, True
    return weighted(known), weighted(best), False


def _describe(m: MetricResult) -> str:
    effect = f" x{m.effect:.3g}" if m.effect is not None else ""
    p = ""
    if m.p_value is not None and m.classification != MetricClass.NO_DATA:
        p = f", p={m.p_value:.2g} (alpha {m.alpha:.2g})"
    return f"{m.name} {m.classification}{effect}{p} ({m.detail})"


def _directions(m: MetricSpec) -> tuple[bool, bool]:
    """(is an increase bad, is a decrease bad)."""
    return (
        m.direction in (Direction.INCREASE, Direction.EITHER),
        m.direction in (Direction.DECREASE, Direction.EITHER),
    )
