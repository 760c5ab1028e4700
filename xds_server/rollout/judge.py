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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from xds_server.rollout import stats
from xds_server.spec import Direction, MetricKind, MetricSpec, NoDataRule, RolloutPlan


class Outcome(StrEnum):
    """A verdict on one region's canary."""

    PASS = "pass"
    FAIL = "fail"
    NO_DATA = "no_data"
    MARGINAL = "marginal"


class MetricClass(StrEnum):
    """How one analysis metric came out (Kayenta's classes)."""

    PASS = "pass"
    HIGH = "high"
    LOW = "low"
    NO_DATA = "no_data"


PASS, FAIL, NO_DATA, MARGINAL = Outcome.PASS, Outcome.FAIL, Outcome.NO_DATA, Outcome.MARGINAL
HIGH, LOW = MetricClass.HIGH, MetricClass.LOW


@dataclass(frozen=True)
class Measurement:
    """One pool's numbers in one region over a window."""

    requests: float | None = None
    errors: float | None = None
    p99_ms: float | None = None
    problem: str | None = None
    """Why the numbers could not be read (Prometheus unreachable, a query error)."""
    latency_buckets: tuple[tuple[float, float], ...] | None = None
    """Request-time histogram, cumulative (upper bound in ms, count), +inf last."""

    @property
    def error_rate(self) -> float | None:
        requests = _num(self.requests)
        if not requests:
            return None
        return (_num(self.errors) or 0.0) / requests

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": _num(self.requests),
            "errors": _num(self.errors),
            "error_rate": _num(self.error_rate),
            "p99_ms": _num(self.p99_ms),
            "problem": self.problem,
        }


@dataclass(frozen=True)
class Comparison:
    """Canary and comparator over the whole step so far: what the analysis judges."""

    canary: Measurement
    comparator: Measurement | None
    comparator_pool: str
    """`baseline` or `production`; None comparator: no pool to compare with this step."""


@dataclass(frozen=True)
class Check:
    metric: str
    value: float
    limit: float
    ok: bool

    def describe(self) -> str:
        op = "<=" if self.ok else ">"
        return f"{self.metric} {self.value:.4g} {op} limit {self.limit:.4g}"


@dataclass(frozen=True)
class MetricResult:
    name: str
    classification: MetricClass
    effect: float | None
    p_value: float | None
    detail: str
    group: str
    critical: bool
    on_no_data: NoDataRule
    alpha: float = 0.0
    """The p-value at or below which this metric is a regression (its share of the
    false-alarm level)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str
    checks: tuple[Check, ...] = ()
    metrics: tuple[MetricResult, ...] = ()
    score: float | None = None
    conclusive: bool = False
    """A failure that needs no second look (the analysis's sequential tests)."""

    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)

    @property
    def pause_requested(self) -> bool:
        """A metric without data whose rule for that is to pause (the state machine asks
        only once the hold has reached max_hold)."""
        return any(
            m.classification == MetricClass.NO_DATA and m.on_no_data == NoDataRule.PAUSE
            for m in self.metrics
        )


def judge(
    plan: RolloutPlan,
    canary: Measurement,
    comparison: Comparison | None = None,
    hold_expired: bool = False,
    regions: int = 1,
) -> Verdict:
    """`canary`: the sliding window, for the guardrails; `comparison`: the step so far;
    `regions`: how many the rollout crosses (they share each metric's false-alarm level
    when its scope is the rollout)."""
    tests = plan.analysis_tests(regions)
    metrics = analyse(plan, comparison, tests) if comparison is not None else ()
    score, best, critical_failed = _score(plan, metrics, hold_expired)
    checks, guard_gap = guardrail_checks(plan, canary)
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
        return Verdict(FAIL, "; ".join(c.describe() for c in failed), tuple(checks), metrics, score)
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
    requests = _num(canary.requests) or 0.0
    summary = f"within guardrails ({requests:.0f} requests)"
    if score is not None:
        compared = comparison.comparator_pool if comparison else ""
        summary += f"; {scored} against {compared}"
    return Verdict(PASS, summary, tuple(checks), metrics, score)


def guardrail_checks(plan: RolloutPlan, canary: Measurement) -> tuple[list[Check], str]:
    """The SLA ceilings; the second value says why there is no evidence, if there is none."""
    g = plan.guardrails
    if canary.problem:
        return [], f"canary metrics unavailable: {canary.problem}"
    requests = _num(canary.requests)
    if requests is None or requests < g.min_requests:
        got = "none" if requests is None else f"{requests:.0f}"
        return [], f"too few canary requests in the window: {got} (need {g.min_requests})"
    rate = canary.error_rate or 0.0
    checks = [Check("error_rate", rate, g.max_error_rate, rate <= g.max_error_rate)]
    p99 = _num(canary.p99_ms)
    if p99 is None:
        return checks, "canary latency p99 unavailable"
    checks.append(Check("p99_ms", p99, g.max_p99_ms, p99 <= g.max_p99_ms))
    return checks, ""


def analyse(plan: RolloutPlan, comparison: Comparison, tests: int = 1) -> tuple[MetricResult, ...]:
    """`tests`: how many sequential tests share each metric's false-alarm level."""
    if comparison.comparator is None:
        return ()  # nothing to compare with (the canary takes every request)
    return tuple(_metric(m, comparison, tests) for m in plan.analysis.metrics)


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
    up, down = _directions(m)
    if m.kind == MetricKind.ERRORS:
        nc, nb = _num(c.requests) or 0.0, _num(b.requests) or 0.0
        if nc < 1 or nb < 1:
            return result(
                MetricClass.NO_DATA, None, None, f"requests: canary {nc:.0f}, comparator {nb:.0f}"
            )
        ec, eb = _num(c.errors) or 0.0, _num(b.errors) or 0.0
        t = stats.error_ratio_test(ec, nc, eb, nb, m.allowed_change, m.confidence, up, down, alpha)
        counts = f"canary {ec:.0f}/{nc:.0f}, {cmp.comparator_pool} {eb:.0f}/{nb:.0f}"
        if t.significant:
            cls = HIGH if (t.effect or 1.0) > 1 else LOW
            return result(cls, t.effect, t.p_value, counts)
        enough = (t.upper is not None and t.upper <= m.detect_change) or (
            t.canary_rate_upper is not None and t.canary_rate_upper <= m.ignore_below
        )
        if enough or (down and not up):
            return result(MetricClass.PASS, t.effect, t.p_value, counts)
        return result(
            MetricClass.NO_DATA,
            t.effect,
            t.p_value,
            f"{counts}: too few to rule out a {m.detect_change:g}x error rate",
        )
    cb, bb = c.latency_buckets or (), b.latency_buckets or ()
    if m.kind == MetricKind.TAIL:
        return _tail(m, cmp.comparator_pool, cb, bb, alpha, result)
    n1, n2 = (sum(stats.bucket_counts(x)[1]) for x in (cb, bb))
    if n1 < m.min_requests or n2 < m.min_requests:
        return result(
            MetricClass.NO_DATA,
            None,
            None,
            f"latency samples: canary {n1:.0f}, {cmp.comparator_pool} {n2:.0f} "
            f"(need {m.min_requests} each)",
        )
    t = stats.latency_test(cb, bb, m.quantile, m.allowed_change, m.confidence, up, down, alpha)
    detail = f"p{m.quantile * 100:g} ratio over {n1:.0f}/{n2:.0f} samples"
    if t.significant:
        return result(HIGH if t.higher else LOW, t.effect, t.p_value, detail)
    return result(MetricClass.PASS, t.effect, t.p_value, detail)


def _tail(
    m: MetricSpec,
    pool: str,
    cb: stats.Buckets,
    bb: stats.Buckets,
    alpha: float,
    result: Callable[[MetricClass, float | None, float | None, str], MetricResult],
) -> MetricResult:
    """The share of slow requests (beyond the joint quantile), compared like errors."""
    bound, slow_c, n1, slow_b, n2 = stats.tail_counts(cb, bb, m.quantile)
    if n1 < m.min_requests or n2 < m.min_requests:
        return result(
            MetricClass.NO_DATA,
            None,
            None,
            f"latency samples: canary {n1:.0f}, {pool} {n2:.0f} (need {m.min_requests} each)",
        )
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


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) or math.isinf(v) else float(v)


def _directions(m: MetricSpec) -> tuple[bool, bool]:
    """(is an increase bad, is a decrease bad)."""
    return (
        m.direction in (Direction.INCREASE, Direction.EITHER),
        m.direction in (Direction.DECREASE, Direction.EITHER),
    )
