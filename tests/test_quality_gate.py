"""The model-quality gate in the judge alone (pure): the spec's own metrics through the
registry of kinds, their max/min bounds, per-tenant budgets and the throughput floor."""

from __future__ import annotations

from dataclasses import replace

import pytest

from xds_server.rollout.evidence import (
    FAIL,
    HIGH,
    PASS,
    Comparison,
    Measurement,
    MetricReading,
    Throughput,
)
from xds_server.rollout.judge import judge
from xds_server.rollout.stats import share_below_test
from xds_server.spec import MetricKind, SpecError, parse_spec

from .test_decide import HEALTHY, LATENCY, STEP

SPEC = """
regions: [us-east]
rollout:
  guardrails:
    max_error_rate: 0.05
    max_p99_ms: 300
    min_requests: 20
    tenants:
      header: X-Tenant
      min_requests: 20
      budgets:
        gold: {max_p99_ms: 120, max_error_rate: 0.001}
        free: {max_p99_ms: 800}
  analysis:
    metrics:
      error_rate: {}
      click_through:
        kind: ratio
        numerator: 'sum(increase(clicks_total{{region="{region}",pool="{pool}"}}[{window}]))'
        denominator: 'sum(increase(shown_total{{region="{region}",pool="{pool}"}}[{window}]))'
        direction: decrease
        allowed_change: 1.1
        detect_change: 1.5
        min: 0.02
      confidence:
        kind: distribution
        query: 'sum by (le) (increase(conf_bucket{{pool="{pool}"}}[{window}]))'
        direction: decrease
        quantile: 0.5
        max: 0.99
services:
  - name: s
    pools:
      production: {version: v1, endpoints: {us-east: ['127.0.0.1:1']}}
      baseline: {version: v1, endpoints: {us-east: ['127.0.0.1:2']}}
      canary: {version: v2, endpoints: {us-east: ['127.0.0.1:3']}}
"""
PLAN = parse_spec(SPEC).services[0].rollout
CONF = ((0.25, 100.0), (0.5, 400.0), (0.75, 800.0), (1.0, 1000.0), (float("inf"), 1000.0))
LOW_CONF = ((0.25, 700.0), (0.5, 950.0), (0.75, 990.0), (1.0, 1000.0), (float("inf"), 1000.0))


def readings(clicks: float, shown: float, conf: tuple[tuple[float, float], ...] = CONF) -> dict:
    return {
        "click_through": MetricReading(numerator=clicks, denominator=shown),
        "confidence": MetricReading(buckets=conf),
    }


def step(canary: dict, base: dict | None = None, throughput: Throughput | None = None):
    return Comparison(
        replace(STEP, readings=canary),
        replace(STEP, readings=base if base is not None else readings(500, 10_000)),
        "baseline",
        throughput,
    )


def test_the_spec_reads_custom_metrics_and_tenants() -> None:
    kinds = {m.name: m.kind for m in PLAN.analysis.metrics}
    assert kinds == {
        "error_rate": MetricKind.ERRORS,
        "click_through": MetricKind.RATIO,
        "confidence": MetricKind.DISTRIBUTION,
    }
    assert PLAN.guardrails.tenants.header == "x-tenant"
    assert PLAN.guardrails.tenants.budgets["gold"].max_p99_ms == 120
    assert PLAN.guardrails.min_throughput_ratio == 0.8


@pytest.mark.parametrize(
    ("metric", "problem"),
    [
        ("{kind: ratio, numerator: 'x'}", "needs `numerator:` and `denominator:`"),
        ("{kind: value}", "query: required"),
        ("{query: 'x'}", "kind: required for a metric of your own"),
        ("{kind: errors, query: 'x'}", "takes no query"),
        ("{kind: value, query: 'rate(x{{a=\"{nope}\"}}[1m])'}", "bad template"),
        ("{kind: value, query: 'x', min: 2, max: 1}", "min: must not be above max"),
        ("{kind: output, allowed_change: 0.3, fail_change: 0.2}", "fail_change: must be at"),
    ],
)
def test_a_bad_custom_metric_is_one_clear_line(metric: str, problem: str) -> None:
    doc = SPEC.replace("      error_rate: {}", f"      mine: {metric}")
    with pytest.raises(SpecError) as err:
        parse_spec(doc, "mesh.yaml")
    assert problem in str(err.value), str(err.value)
    assert "mesh.yaml: rollout.analysis.metrics.mine" in str(err.value)


def test_prediction_shift_is_a_builtin_output_metric() -> None:
    doc = SPEC.replace("      error_rate: {}", "      prediction_shift: {}")
    m = next(x for x in parse_spec(doc).services[0].rollout.analysis.metrics)
    assert (m.kind, m.allowed_change, m.fail_change, m.critical) == (
        MetricKind.OUTPUT,
        0.1,
        0.25,
        True,
    )
    assert "model_prediction_score_bucket" in m.query


def test_a_ratio_that_drops_is_high_and_fails_the_verdict() -> None:
    v = judge(PLAN, HEALTHY, step(readings(200, 10_000)))
    click = next(m for m in v.metrics if m.name == "click_through")
    assert click.classification == "low"
    assert v.outcome == FAIL and "click_through" in v.reason


def test_a_healthy_ratio_and_distribution_pass() -> None:
    v = judge(PLAN, HEALTHY, step(readings(510, 10_000)))
    classes = {m.name: m.classification for m in v.metrics}
    assert classes["click_through"] == "pass" and classes["confidence"] == "pass"
    assert v.outcome == PASS


def test_a_distribution_that_shifts_down_is_caught() -> None:
    v = judge(PLAN, HEALTHY, step(readings(500, 10_000, LOW_CONF)))
    conf = next(m for m in v.metrics if m.name == "confidence")
    assert conf.classification in (HIGH, "low")
    assert v.outcome == FAIL


def test_bounds_are_guardrails_on_the_canarys_window() -> None:
    canary = replace(
        HEALTHY, readings={"click_through": MetricReading(numerator=1, denominator=100)}
    )
    v = judge(PLAN, canary)
    failed = [c for c in v.checks if not c.ok]
    assert [c.metric for c in failed] == ["click_through"]
    assert "click_through 0.01 < limit 0.02" in v.reason


def test_a_tenant_breach_names_the_tenant() -> None:
    gold = Measurement(requests=100, errors=0, p99_ms=400)
    free = Measurement(requests=900, errors=0, p99_ms=60)
    v = judge(PLAN, replace(HEALTHY, tenants={"gold": gold, "free": free}))
    assert v.outcome == FAIL
    assert "tenant gold p99_ms 400 > limit 120" in v.reason
    assert "free" not in v.reason


def test_a_tenant_with_too_few_requests_is_not_judged() -> None:
    gold = Measurement(requests=5, errors=5, p99_ms=4000)
    v = judge(PLAN, replace(HEALTHY, tenants={"gold": gold}))
    assert not [c for c in v.checks if c.metric.startswith("tenant")]


def test_a_canary_that_delivers_two_thirds_of_its_share_fails_throughput() -> None:
    stalled = Throughput(delivered=2000 * 0.2 * 0.67, requests=2000, share=0.2)
    v = judge(PLAN, HEALTHY, step(readings(500, 10_000), throughput=stalled))
    assert v.outcome == FAIL
    assert "throughput_ratio 0.67 < limit 0.8" in v.reason


def test_a_few_unlucky_seconds_at_5_percent_do_not_fail_throughput() -> None:
    unlucky = Throughput(delivered=6, requests=200, share=0.05)  # 0.6 of its share
    v = judge(PLAN, HEALTHY, step(readings(500, 10_000), throughput=unlucky))
    check = next(c for c in v.checks if c.metric == "throughput_ratio")
    assert check.value == pytest.approx(0.6) and check.ok


def test_the_shortfall_test_keeps_its_level_when_looking_every_interval() -> None:
    """Healthy canary at its full share: over 300 simulated steps of 60 looks, the
    sequential test says "short" in at most alpha of them (plus noise)."""
    import random

    rng = random.Random(7)
    alpha, share, false = 0.05, 0.2, 0
    for _ in range(300):
        delivered = total = 0
        for _ in range(60):
            n = 50
            total += n
            delivered += sum(rng.random() < share for _ in range(n))
            if share_below_test(delivered, total, share, alpha):
                false += 1
                break
    assert false / 300 <= alpha + 0.03, false


def test_latency_buckets_fixture_still_judged() -> None:
    assert LATENCY[0][0] == 10.0


def scores(shares: list[float], n: float) -> tuple[tuple[float, float], ...]:
    """A 20-bucket score histogram (cumulative), `n` outputs in these shares."""
    out, total = [], 0.0
    for i, share in enumerate(shares):
        total += share * n
        out.append(((i + 1) / 20, round(total)))
    return (*out, (float("inf"), round(total)))


OUTPUT_SPEC = SPEC.replace(
    "      error_rate: {}",
    "      error_rate: {}\n      prediction_shift: {}\n"
    "      tokens:\n        kind: value\n        query: 'x'\n        direction: decrease",
)
OUTPUT_PLAN = parse_spec(OUTPUT_SPEC).services[0].rollout
FLAT = [0.05] * 20
COLLAPSED = [0.9] + [0.1 / 19] * 19


def output_step(canary_shares: list[float], pairs: tuple = ((100.0, 100.0),) * 8):
    canary = {
        "prediction_shift": MetricReading(buckets=scores(canary_shares, 400)),
        "tokens": MetricReading(value=100.0, pairs=pairs),
    }
    base = {
        "prediction_shift": MetricReading(buckets=scores(FLAT, 400)),
        "tokens": MetricReading(value=100.0),
    }
    return Comparison(replace(STEP, readings=canary), replace(STEP, readings=base), "baseline")


def test_collapsed_outputs_fail_by_prediction_shift_alone() -> None:
    v = judge(OUTPUT_PLAN, HEALTHY, output_step(COLLAPSED))
    bad = [m for m in v.metrics if m.classification in ("high", "low")]
    assert [m.name for m in bad] == ["prediction_shift"]
    assert v.outcome == FAIL and v.conclusive
    assert "PSI" in v.reason and "p=" in v.reason


def test_the_same_outputs_pass_the_output_gate() -> None:
    v = judge(OUTPUT_PLAN, HEALTHY, output_step(FLAT))
    shift = next(m for m in v.metrics if m.name == "prediction_shift")
    assert shift.classification == "pass" and shift.effect == pytest.approx(0, abs=1e-9)


def test_a_value_that_drops_a_third_every_interval_is_low() -> None:
    dropped = tuple((66.0 + i % 3, 100.0 + i % 2) for i in range(12))
    v = judge(OUTPUT_PLAN, HEALTHY, output_step(FLAT, dropped))
    tokens = next(m for m in v.metrics if m.name == "tokens")
    assert tokens.classification == "low" and tokens.effect == pytest.approx(0.67, abs=0.02)


def test_every_lab_scenario_can_be_run_from_the_command_line() -> None:
    from xds_server.cli import build_parser
    from xds_server.lab.scenarios import SCENARIOS

    for name in SCENARIOS:
        assert build_parser().parse_args(["lab", "run", "--scenario", name]).scenario == name
