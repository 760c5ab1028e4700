"""Signal health (issue 27), alone: the sample-ratio mismatch test, how the judge holds
on untrusted evidence (SRM, stale or partial series), throughput as delivered vs sent,
reading Prometheus's configuration, and the audit record of it all. Pure: no I/O."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xds_server.rollout import stats
from xds_server.rollout.audit_codec import verdict_from_json, verdict_json
from xds_server.rollout.evidence import (
    FAIL,
    NO_DATA,
    PASS,
    Comparison,
    Measurement,
    Signals,
    Throughput,
)
from xds_server.rollout.judge import judge
from xds_server.rollout.signals import _seconds, envoy_jobs
from xds_server.spec import Guardrails, RolloutPlan
from xds_server.spec.rollout import Sticky

_BASE = RolloutPlan(guardrails=Guardrails(max_error_rate=1.0, max_p99_ms=1e9, min_requests=20))
PLAN = replace(
    _BASE,
    analysis=replace(
        _BASE.analysis,
        metrics=tuple(m for m in _BASE.analysis.metrics if m.name == "error_rate"),
    ),
)
"""The error-rate metric alone (counts are all these tests need)."""
WINDOW = Measurement(requests=1000, errors=10, p99_ms=120.0)
SAME = Measurement(requests=20_000, errors=200, p99_ms=120.0)
SHARES = {"production": 0.6, "baseline": 0.2, "canary": 0.2}


def fresh(sent: dict[str, float], **changes: object) -> Signals:
    s = Signals(1.0, 1.0, 1, 1, 0, "", sent, SHARES)
    return replace(s, **changes)  # type: ignore[arg-type]


def verdict(signals: Signals | None, plan: RolloutPlan = PLAN, canary: Measurement = SAME):
    return judge(plan, WINDOW, Comparison(canary, SAME, "baseline", signals=signals))


# ---- the test itself ----


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 20), min_size=2, max_size=4),
    st.integers(1, 2_000),
)
def test_counts_exactly_at_the_configured_shares_are_never_a_mismatch(
    weights: list[int], k: int
) -> None:
    """At the configured shares the null's likelihood is the largest there is: the
    Bayes factor is at most 1, whatever the counts' size."""
    total = sum(weights)
    t = stats.srm_test([w * k for w in weights], [w / total for w in weights], 1e-3)
    assert t.p_value == 1.0 and not t.significant


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 5_000), min_size=2, max_size=3),
    st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3),
)
def test_the_p_value_is_a_probability_and_ignores_the_pools_order(
    counts: list[int], raw: list[float]
) -> None:
    shares = [s / sum(raw[: len(counts)]) for s in raw[: len(counts)]]
    t = stats.srm_test(counts, shares, 1e-3)
    back = stats.srm_test(counts[::-1], shares[::-1], 1e-3)
    assert 0 < t.p_value <= 1
    assert math.isclose(t.p_value, back.p_value, rel_tol=1e-9)
    assert t.significant == (t.p_value <= 1e-3)


def test_a_fourteen_percent_canary_configured_at_twenty_is_found() -> None:
    assert not stats.srm_test([14, 86], [0.2, 0.8], 1e-3).significant  # too few yet
    t = stats.srm_test([1410, 8590], [0.2, 0.8], 1e-3)
    assert t.significant and t.shares == (0.141, 0.859)
    # The frozen Envoy of issue 27: 80/10/10 served, 60/20/20 configured.
    assert stats.srm_test([800, 100, 100], [0.6, 0.2, 0.2], 1e-3).significant


def test_looking_every_interval_keeps_false_alarms_under_alpha() -> None:
    """Ville's inequality: on healthy splits, looked at after every batch for a whole
    step, the test fires on at most alpha of the steps (here 0 of 2,000 at 1e-3)."""
    rng = np.random.default_rng(27)
    p0 = np.array([0.6, 0.2, 0.2])
    alarms = 0
    for _ in range(2_000):
        counts = np.zeros(3)
        for _look in range(30):
            counts += rng.multinomial(200, p0)
            if stats.srm_test(counts.tolist(), p0.tolist(), 1e-3).significant:
                alarms += 1
                break
    assert alarms <= 2


def test_shares_must_be_positive_and_one_per_count() -> None:
    with pytest.raises(ValueError):
        stats.srm_test([1, 2], [0.0, 1.0], 1e-3)
    with pytest.raises(ValueError):
        stats.srm_test([1, 2, 3], [0.5, 0.5], 1e-3)


# ---- the judge on untrusted evidence ----


def test_a_mismatch_holds_a_passing_step_with_the_reason() -> None:
    assert verdict(fresh({"production": 6000, "baseline": 2000, "canary": 2000})).outcome == PASS
    v = verdict(fresh({"production": 7180, "baseline": 1410, "canary": 1410}))
    assert v.outcome == NO_DATA and v.untrusted == v.reason
    assert v.reason.startswith("sample ratio mismatch: canary 14.1% of routed requests, ")
    assert "configured 20%, p=" in v.reason
    assert v.pause_requested  # at max_hold: a pause for an operator, never a rollback
    assert v.signals is not None and v.signals.srm_p is not None and v.signals.srm_p < 1e-6


def test_a_canary_failure_wins_over_a_mismatch() -> None:
    bad = Measurement(requests=20_000, errors=2_000, p99_ms=120.0)
    v = verdict(fresh({"production": 7180, "baseline": 1410, "canary": 1410}), canary=bad)
    assert v.outcome == FAIL and not v.untrusted


@pytest.mark.parametrize(
    "problem",
    [
        "stale: 1 of 1 Envoy targets of us-east not scraped for 9.0s",
        "partial: 1 of 2 Envoy targets of us-east down",
        "counter reset in the last window (1 in us-east): an Envoy restarted",
    ],
)
def test_stale_partial_or_reset_series_are_no_data_never_a_pass(problem: str) -> None:
    v = verdict(fresh({"production": 6000, "baseline": 2000, "canary": 2000}, problem=problem))
    assert v.outcome == NO_DATA and v.reason == f"no data: {problem}" and v.pause_requested


def test_sticky_sessions_are_not_tested_per_request() -> None:
    sticky = replace(PLAN, sticky=Sticky(header="x-user"))
    v = verdict(fresh({"production": 7180, "baseline": 1410, "canary": 1410}), plan=sticky)
    assert v.outcome == PASS
    assert v.signals is not None and v.signals.srm_skipped.startswith("not tested: sticky")


def test_throughput_is_what_the_canary_delivered_of_what_it_was_sent() -> None:
    """An Envoy at old weights sends the canary half its share: not a shortfall of the
    canary (the split is the SRM test's), whereas a canary that drops half of what it
    is sent fails."""
    plan = replace(PLAN, guardrails=replace(PLAN.guardrails, min_throughput_ratio=0.8))
    routed = Throughput(delivered=1000, requests=10_000, share=0.2, sent=1000)
    off = Comparison(SAME, SAME, "baseline", throughput=routed)
    assert judge(plan, WINDOW, off).outcome == PASS
    dropped = replace(routed, sent=2000)
    v = judge(plan, WINDOW, replace(off, throughput=dropped))
    assert v.outcome == FAIL and "throughput_ratio 0.5 < limit 0.8" in v.reason


# ---- Prometheus's configuration, and the audit record ----


def test_envoy_jobs_and_their_interval_come_from_prometheus_configuration() -> None:
    config = """
global: {scrape_interval: 15s}
scrape_configs:
  - {job_name: envoy-edge, metrics_path: /stats/prometheus, scrape_interval: 2s}
  - {job_name: envoy-core, metrics_path: /stats/prometheus}
  - {job_name: models, metrics_path: /metrics, scrape_interval: 1s}
"""
    jobs = envoy_jobs(config)
    assert jobs.jobs == ("envoy-edge", "envoy-core") and jobs.interval == 15.0
    assert envoy_jobs("global: {scrape_interval: 1s}").jobs == ("envoy",)
    assert [_seconds(t, -1) for t in ("1s", "500ms", "1m30s", "2h", "x", "")] == [
        1,
        0.5,
        90,
        7200,
        -1,
        -1,
    ]


def test_signals_round_trip_through_the_audit_record() -> None:
    v = verdict(fresh({"production": 7180, "baseline": 1410, "canary": 1410}))
    back = verdict_from_json(verdict_json(v))
    assert back == v
    plain = verdict(None)
    assert "signals" not in (verdict_json(plain) or "")  # old entries keep their bytes


def test_requests_sent_to_a_pool_at_weight_zero_are_a_mismatch() -> None:
    """At 50% production has no weight: an Envoy at old weights still sends it half the
    region's requests while canary and baseline stay even."""
    at_half = {"production": 0.0, "baseline": 0.5, "canary": 0.5}
    even = {"production": 0.0, "baseline": 1000.0, "canary": 1000.0}
    assert verdict(fresh(even, configured=at_half)).outcome == PASS
    stray = {"production": 2.0, "baseline": 1000.0, "canary": 1000.0}
    assert verdict(fresh(stray, configured=at_half)).outcome == PASS  # a stray is no proof
    off = {"production": 1000.0, "baseline": 500.0, "canary": 500.0}
    v = verdict(fresh(off, configured=at_half))
    assert v.outcome == NO_DATA and "canary 25.0% of routed requests, configured 50%" in v.reason


# ---- reading the signals (Prometheus's answers, as its API returns them) ----


def answers(ages: dict[str, float], up: dict[str, float], resets: float = 0.0):
    """A stand-in for one instant query's raw result, keyed by what each query asks."""

    def vector(promql: str, _client: object) -> list[dict[str, object]]:
        def rows(values: dict[str, float]) -> list[dict[str, object]]:
            return [
                {"metric": {"job": "envoy", "instance": i}, "value": [0, str(v)]}
                for i, v in values.items()
            ]

        if promql.startswith("time() - max by"):
            return rows(ages)
        if promql.startswith("time() - timestamp"):
            return rows({i: a for i, a in ages.items() if a < 300})
        if promql.startswith("min by (job, instance) (up"):
            return rows(up)
        if promql.startswith("sum(resets("):
            return [{"metric": {}, "value": [0, str(resets)]}]
        pool = "canary" if "upstream_rq_total" in promql else ""
        return (
            [{"metric": {"envoy_cluster_name": f"svc|{pool}"}, "value": [0, "10"]}] if pool else []
        )

    return vector


@pytest.mark.parametrize(
    ("ages", "up", "resets", "problem"),
    [
        ({"a": 0.5, "b": 1.1}, {"a": 1, "b": 1}, 0, ""),
        (
            {"a": 0.5, "b": 9.0},
            {"a": 1},
            0,
            "stale: 1 of 2 Envoy targets of r not scraped for 9.0s",
        ),
        (
            {"a": 0.5, "b": 1.0},
            {"a": 1, "b": 0},
            0,
            "partial: 1 of 2 Envoy targets of r down: envoy/b",
        ),
        ({"a": 0.5}, {"a": 1}, 2, "counter reset in the last window (2 in r): an Envoy restarted"),
        ({}, {}, 0, "no Envoy target of r scraped by Prometheus in the last 300s"),
    ],
)
def test_stale_partial_and_reset_targets_say_why(
    ages: dict[str, float], up: dict[str, float], resets: float, problem: str
) -> None:
    from xds_server.rollout.signals import EnvoyJobs, read_signals

    s = read_signals(
        answers(ages, up, resets), None, EnvoyJobs(("envoy",), 1.0), "r", "svc", 10, SHARES
    )
    assert s.problem.startswith(problem) and bool(s.problem) == bool(problem)
    assert s.targets == len(ages) and s.sent == {"canary": 10.0}
    assert bool(s.srm_skipped) == bool(resets)  # the step's split is untested across it


def test_a_split_the_reader_says_is_none_is_not_tested() -> None:
    """The shadow phase: canary and baseline get copies of production's requests."""
    shadow = {"production": 1.0, "baseline": 0.0, "canary": 0.0}
    copies = fresh(
        {"production": 1000.0, "baseline": 200.0, "canary": 200.0},
        configured=shadow,
        srm_skipped="not tested: shadow traffic is mirrored",
    )
    v = verdict(copies)
    assert v.outcome == PASS and v.signals is not None and v.signals.srm_p is None
