"""The decision function alone: table-driven cases and properties over all inputs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import with_metric
from xds_server.rollout import decide as sm
from xds_server.rollout.decide import Observation
from xds_server.rollout.evidence import FAIL, NO_DATA, PASS, Comparison, Measurement
from xds_server.rollout.judge import judge
from xds_server.rollout.state import RolloutState, region_split
from xds_server.spec import Guardrails, HealthCheck, RolloutPlan, parse_spec
from xds_server.traffic import WEIGHT_TOTAL, Split

REGIONS = ("us-east", "eu-west", "ap-south")
PLAN = RolloutPlan(
    steps=(5, 20, 75, 100),
    step_duration=10,
    interval=1,
    window=10,
    max_hold=30,
    failures_before_rollback=2,
    guardrails=Guardrails(
        max_error_rate=0.05,
        max_p99_ms=300,
        min_requests=20,
    ),
)
HEALTHY = Measurement(requests=100, errors=1, p99_ms=50)
LATENCY = ((10.0, 300.0), (25.0, 800.0), (50.0, 980.0), (100.0, 1000.0), (float("inf"), 1000.0))
STEP = Measurement(requests=1000, errors=0, latency_buckets=LATENCY)
BASE = Comparison(STEP, STEP, "baseline")
"""The whole step so far: canary and baseline alike, enough of both to pass the analysis."""


def started(plan: RolloutPlan = PLAN) -> RolloutState:
    return sm.start(plan, "svc", "v2", REGIONS, now=0).state


def obs(
    canary: Measurement | None = HEALTHY,
    applied_at: float | None = 0.0,
    step: Comparison | None = BASE,
    error: str | None = None,
) -> Observation:
    return Observation(applied_at=applied_at, apply_error=error, canary=canary, step=step)


def everywhere(o: Observation) -> dict[str, Observation]:
    return dict.fromkeys(REGIONS, o)


@pytest.mark.parametrize(
    ("w", "expected"),
    [
        (5, (90, 5, 5)),
        (20, (60, 20, 20)),
        (75, (0, 25, 75)),
        (100, (0, 0, 100)),
    ],
)
def test_split_rule_from_the_issue(w: float, expected: tuple[int, int, int]) -> None:
    s = Split.at_canary_percent(w, has_baseline=True).percent()
    assert (s["production"], s["baseline"], s["canary"]) == expected
    assert Split.at_canary_percent(w, has_baseline=False).percent()["baseline"] == 0


def test_healthy_rollout_walks_every_step_then_promotes() -> None:
    state, now = started(), 0.0
    seen_steps = []
    for _ in range(200):
        now += 1
        d = sm.decide(PLAN, state, everywhere(obs(applied_at=now - 1)), now)
        state = d.state
        seen_steps.append(state.regions["us-east"].step)
        if state.phase == sm.PROMOTED:
            break
    assert state.phase == sm.PROMOTED
    assert all(rs.phase == sm.PROMOTED for rs in state.regions.values())
    assert sorted(set(seen_steps)) == [0, 1, 2, 3]
    # Each step was observed for its full duration: 4 steps x 10 s, plus the clock starts.
    assert now >= 4 * PLAN.step_duration


@pytest.mark.parametrize(
    ("canary", "reason"),
    [
        # 10 of 100: over 5%, but not certainly (a canary at 3% does it by chance)
        (Measurement(100, 10, 50), "error_rate 0.1 > limit 0.05"),
        (Measurement(100, 1, 900), "p99_ms 900 > limit 300"),
    ],
)
def test_a_breach_in_one_region_rolls_back_every_region(canary: Measurement, reason: str) -> None:
    state = started()
    observations = {**everywhere(obs()), "eu-west": obs(canary)}
    first = sm.decide(PLAN, state, observations, 5)
    assert first.state.phase == sm.PROGRESSING  # 1 failure of 2
    assert first.state.regions["eu-west"].failures == 1
    second = sm.decide(PLAN, first.state, observations, 6)
    assert second.rollback and second.state.phase == sm.ROLLED_BACK
    assert all(rs.phase == sm.ROLLED_BACK for rs in second.state.regions.values())
    assert "eu-west" in second.state.reason and reason in second.state.reason


def test_a_certain_guardrail_breach_rolls_back_at_the_first_look() -> None:
    # 20 errors of 100 rule out a 5% rate at 99%: a second look only costs users
    d = sm.decide(
        PLAN, started(), {**everywhere(obs()), "eu-west": obs(Measurement(100, 20, 50))}, 5
    )
    assert d.rollback and d.state.phase == sm.ROLLED_BACK
    assert "error_rate 0.2 > limit 0.05 (certain: 20 errors of 100" in d.state.reason


def test_a_conclusive_analysis_failure_rolls_back_at_the_first_look() -> None:
    worse = Comparison(Measurement(1000, 60, latency_buckets=LATENCY), STEP, "baseline")
    d = sm.decide(PLAN, started(), {**everywhere(obs()), "eu-west": obs(step=worse)}, 5)
    assert d.rollback and d.state.phase == sm.ROLLED_BACK
    assert "error_rate high" in d.state.reason and "score 0" in d.state.reason


def test_too_little_data_holds_then_follows_each_metrics_rule() -> None:
    sparse = Comparison(Measurement(30, 1, latency_buckets=LATENCY), STEP, "baseline")
    state, now, d = started(), 0.0, None
    for _ in range(int(PLAN.max_hold) + 5):
        now += 1
        d = sm.decide(PLAN, state, everywhere(obs(step=sparse, applied_at=0)), now)
        state = d.state
        if state.phase != sm.PROGRESSING:
            break
    # error_rate's rule for no data is `pause`: neither rolled back nor promoted, and only
    # once the hold reached max_hold.
    assert d is not None and not d.rollback
    assert state.phase == sm.PAUSED and now >= PLAN.max_hold
    assert "too few to rule out a 2x error rate" in state.reason
    fail_rule = with_metric(PLAN, "error_rate", on_no_data="fail")
    state = started(fail_rule)
    for _ in range(int(PLAN.max_hold) + 5):
        now += 1
        d = sm.decide(fail_rule, state, everywhere(obs(step=sparse, applied_at=0)), now)
        state = d.state
        if d.rollback:
            break
    assert d.rollback and "error_rate no_data" in state.reason


def test_failures_must_be_consecutive() -> None:
    bad = {**everywhere(obs()), "us-east": obs(Measurement(100, 10, 50))}  # not certain
    d1 = sm.decide(PLAN, started(), bad, 5)
    d2 = sm.decide(PLAN, d1.state, everywhere(obs()), 6)
    assert d2.state.regions["us-east"].failures == 0
    d3 = sm.decide(PLAN, d2.state, bad, 7)
    assert d3.state.phase == sm.PROGRESSING


def test_a_region_failing_after_its_step_passed_holds_the_wave() -> None:
    """A failed check after the step passed (not yet the rollback: a run of one) keeps
    the wave where it is, even when the last region passes then; the next passing look
    lets it move on."""
    late = {**everywhere(obs()), "eu-west": obs(applied_at=5)}
    state = sm.decide(PLAN, started(), late, 11).state  # eu-west's step has 4 s to go
    assert state.regions["us-east"].step_passed and not state.regions["eu-west"].step_passed
    us_east_bad = {**late, "us-east": obs(Measurement(100, 10, 50))}  # not certain
    held = sm.decide(PLAN, state, us_east_bad, 15).state
    assert held.regions["eu-west"].step_passed and held.regions["us-east"].failures == 1
    assert held.phase == sm.PROGRESSING
    assert {rs.step for rs in held.regions.values()} == {0}
    moved = sm.decide(PLAN, held, late, 16).state
    assert {rs.step for rs in moved.regions.values()} == {1}


def test_one_failure_rolls_back_when_configured() -> None:
    plan = replace(PLAN, failures_before_rollback=1)
    d = sm.decide(plan, started(plan), {"ap-south": obs(Measurement(100, 30, 50))}, 3)
    assert d.rollback


@pytest.mark.parametrize(
    "canary",
    [
        Measurement(5, 0, 40),  # too few requests
        Measurement(problem="Prometheus unreachable"),  # no Prometheus
        Measurement(100, 0, float("nan")),  # NaN latency
        Measurement(None, None, None),  # empty result
    ],
)
def test_no_evidence_holds_and_fails_after_max_hold(canary: Measurement) -> None:
    state = started()
    for now in range(1, 60):
        d = sm.decide(PLAN, state, everywhere(obs(canary)), now)
        state = d.state
        if d.rollback:
            break
        assert all(rs.step == 0 and not rs.step_passed for rs in state.regions.values())
    assert d.rollback and "no evidence for 30s" in d.state.reason
    assert now >= PLAN.max_hold


def test_max_hold_can_pause_instead() -> None:
    plan = replace(PLAN, on_max_hold="pause")
    state = started(plan)
    for now in range(1, 40):
        state = sm.decide(plan, state, everywhere(obs(Measurement(3, 0, 1))), now).state
    assert state.phase == sm.PAUSED


def test_unapplied_step_is_not_judged_and_a_nack_fails_it() -> None:
    state = started()
    waiting = sm.decide(PLAN, state, everywhere(obs(Measurement(100, 90, 50), applied_at=None)), 5)
    assert waiting.state.phase == sm.PROGRESSING and not waiting.transitions
    nack = sm.decide(PLAN, state, {"us-east": obs(error="Envoy e1 rejected routes 7: bad")}, 5)
    assert nack.rollback and "rejected routes" in nack.state.reason


def test_step_clock_starts_when_applied() -> None:
    state = started()
    late = 100.0
    d = sm.decide(PLAN, state, everywhere(obs(applied_at=late)), late + 5)
    assert all(rs.step_started == late and not rs.step_passed for rs in d.state.regions.values())


def test_lockstep_waits_for_every_region() -> None:
    state = started()
    only_two = {r: obs() for r in REGIONS[:2]}
    for now in range(1, 30):
        state = sm.decide(PLAN, state, only_two, now).state
    assert {rs.step for rs in state.regions.values()} == {0}


def test_waves_run_the_whole_plan_one_wave_at_a_time() -> None:
    plan = replace(PLAN, waves=(("us-east",), ("eu-west", "ap-south")))
    state = started(plan)
    assert state.regions["eu-west"].phase == sm.PENDING
    now = 0.0
    while state.regions["us-east"].phase != sm.PROMOTED:
        now += 1
        state = sm.decide(plan, state, everywhere(obs(applied_at=now - 1)), now).state
        assert (
            state.regions["eu-west"].phase == sm.PENDING
            or state.regions["us-east"].phase == sm.PROMOTED
        )
    assert state.wave == 1 and state.regions["eu-west"].step == 0
    assert state.phase == sm.PROGRESSING


def test_a_paused_rollout_does_not_advance_but_still_rolls_back() -> None:
    state = sm.pause(started(), 1, "looking").state
    for now in range(2, 40):
        state = sm.decide(PLAN, state, everywhere(obs(applied_at=1)), now).state
    assert {rs.step for rs in state.regions.values()} == {0}
    bad = everywhere(obs(Measurement(100, 50, 50)))
    state = sm.decide(PLAN, sm.decide(PLAN, state, bad, 41).state, bad, 42).state
    assert state.phase == sm.ROLLED_BACK


def test_resume_judges_an_unpassed_step_on_evidence_from_after_the_resume() -> None:
    """What paused a step (a sample-ratio mismatch, stale series) makes the counts taken
    before the pause suspect: a resumed step's clock starts again; a passed step keeps
    its own."""
    state = sm.decide(PLAN, started(), everywhere(obs(applied_at=1)), 2).state
    assert {rs.step_started for rs in state.regions.values()} == {1}
    passed = {**state.regions, "ap-south": replace(state.regions["ap-south"], step_passed=True)}
    paused = sm.pause(replace(state, regions=passed), 3, "sample ratio mismatch").state
    resumed = sm.resume(paused, 50, "fixed the Envoy").state
    assert resumed.regions["us-east"].step_started == 50
    assert resumed.regions["eu-west"].step_started == 50
    assert resumed.regions["ap-south"].step_started == 1


def test_operator_actions_check_their_preconditions() -> None:
    state = started()
    with pytest.raises(ValueError, match="not paused"):
        sm.resume(state, 1, "x")
    done = sm.abort(state, 1, "operator").state
    assert done.phase == sm.ROLLED_BACK
    with pytest.raises(ValueError, match="already rolled_back"):
        sm.abort(done, 2, "again")


# ---- properties ----

maybe_num = st.one_of(st.none(), st.just(float("nan")), st.floats(0, 1000))


@st.composite
def measurements(draw: st.DrawFn) -> Measurement:
    problem = draw(st.sampled_from([None, None, None, "unreachable"]))
    return Measurement(draw(maybe_num), draw(maybe_num), draw(maybe_num), problem)


@st.composite
def observations(draw: st.DrawFn) -> Observation:
    applied = draw(st.one_of(st.none(), st.floats(0, 100)))
    error = draw(st.sampled_from([None] * 9 + ["NACK"]))
    canary = draw(st.one_of(st.none(), measurements()))
    step = draw(
        st.one_of(
            st.none(),
            st.builds(
                Comparison,
                measurements(),
                st.one_of(st.none(), measurements()),
                st.just("baseline"),
            ),
        )
    )
    return Observation(applied_at=applied, apply_error=error, canary=canary, step=step)


@st.composite
def ticks(draw: st.DrawFn) -> list[dict[str, Observation]]:
    out = []
    for _ in range(draw(st.integers(0, 40))):
        regions = draw(st.lists(st.sampled_from(REGIONS), unique=True))
        out.append({r: draw(observations()) for r in regions})
    return out


# Most of this test's time is Hypothesis drawing the ticks (up to 40 ticks of up to three
# regions' observations): 150 examples are about 20 s of a CI run.
@given(ticks())
@settings(max_examples=150, deadline=None)
def test_never_promote_without_evidence_and_any_failure_rolls_back_everywhere(
    all_ticks: list[dict[str, Observation]],
) -> None:
    state = started()
    now = 0.0
    for tick in all_ticks:
        now += 3
        before = state
        d = sm.decide(PLAN, before, tick, now)
        state = d.state
        for region, rs in state.regions.items():
            old = before.regions[region]
            if rs.step > old.step or (rs.phase == sm.PROMOTED and old.phase != sm.PROMOTED):
                # Only a region that passed a full step of evidence-backed checks moves on.
                assert old.step_passed
        if d.rollback:
            assert all(rs.phase == sm.ROLLED_BACK for rs in state.regions.values())
            failed = [
                r
                for r, o in tick.items()
                if o.apply_error
                or (
                    o.applied_at is not None
                    and o.canary is not None
                    and before.regions[r].phase in sm.LIVE
                    and judge(PLAN, o.canary, o.step).outcome in (FAIL, NO_DATA)
                )
            ]
            assert failed
        for rs in state.regions.values():
            split = region_split(PLAN, rs, has_baseline=True)
            assert sum(split.as_dict().values()) == WEIGHT_TOTAL
        if state.phase in sm.FINISHED:
            break


@given(measurements(), st.one_of(st.none(), measurements()))
def test_judge_never_passes_without_enough_requests(canary: Any, baseline: Any) -> None:
    v = judge(PLAN, canary, Comparison(canary, baseline, "baseline") if baseline else None)
    if v.outcome == PASS:
        assert canary.problem is None
        assert canary.requests is not None and canary.requests >= PLAN.guardrails.min_requests
        assert canary.p99_ms is not None and canary.p99_ms == canary.p99_ms


def test_plan_in_spec_merges_defaults_and_reports_mistakes() -> None:
    text = """
regions: [a, b]
rollout: {steps: [10, 100], step_duration: 30s, guardrails: {max_error_rate: 2%}}
services:
  - name: s
    rollout: {interval: 500ms, regions: {waves: [[a], [b]]}}
    pools: {production: {version: v1, endpoints: {a: ["127.0.0.1:1"], b: ["127.0.0.1:2"]}}}
"""
    plan = parse_spec(text).services[0].rollout
    assert plan.steps == (10, 100) and plan.step_duration == 30 and plan.interval == 0.5
    assert plan.guardrails.max_error_rate == 0.02 and plan.waves == (("a",), ("b",))
    from xds_server.spec import SpecError

    bad = (
        text.replace("[10, 100]", "[50, 20]")
        .replace("500ms", "soon")
        .replace("[[a], [b]]", "[[a]]")
        .replace("max_error_rate: 2%}", "max_error_rate: 2%}, analysis: {false_alarm_scope: x}")
    )
    with pytest.raises(SpecError) as err:
        parse_spec(bad, "m.yaml")
    lines = err.value.render().splitlines()
    assert "m.yaml: rollout.steps: steps must increase, got [50, 20]" in lines
    assert any(
        line.startswith("m.yaml: services[0].rollout.interval: bad duration 'soon'")
        for line in lines
    )
    assert "m.yaml: services[0].rollout.regions.waves: regions in no wave: b" in lines
    assert (
        "m.yaml: rollout.analysis.false_alarm_scope: expected one of: rollout, step; got 'x'"
        in lines
    )


WARM_PLAN = replace(
    PLAN,
    warmup=replace(PLAN.warmup, health_check=HealthCheck(), shadow_percent=20, shadow_duration=5),
)


def test_warmup_gives_no_weight_until_ready_then_shadows_then_steps() -> None:
    state = sm.start(WARM_PLAN, "svc", "v2", REGIONS, now=0).state
    assert {rs.step for rs in state.regions.values()} == {sm.WARMUP_STEP}
    waiting = Observation(warmup_pending=("canary: 0 of 1 hosts healthy",))
    d = sm.decide(WARM_PLAN, state, everywhere(waiting), 1)
    assert all(region_split(WARM_PLAN, rs, True).canary == 0 for rs in d.state.regions.values())
    assert all(region_split(WARM_PLAN, rs, True).shadow == 0 for rs in d.state.regions.values())
    d = sm.decide(WARM_PLAN, d.state, everywhere(Observation()), 2)
    shadow = {r: region_split(WARM_PLAN, rs, True) for r, rs in d.state.regions.items()}
    assert all(s.shadow == 2000 and s.canary == 0 and s.baseline == 0 for s in shadow.values())
    state, now = d.state, 2.0
    while now < 20 and {rs.step for rs in state.regions.values()} == {sm.WARMUP_STEP}:
        now += 1
        state = sm.decide(WARM_PLAN, state, everywhere(obs(applied_at=3)), now).state
    assert {rs.step for rs in state.regions.values()} == {0} and now >= 3 + 5


def test_a_paused_shadow_keeps_mirroring_and_hand_weights_wait_for_warmup() -> None:
    rs = sm.RegionState(sm.PAUSED, sm.WARMUP_STEP, shadowing=True)
    assert region_split(WARM_PLAN, rs, True).shadow == 2000
    state = sm.start(WARM_PLAN, "svc", "v2", REGIONS, now=0).state
    with pytest.raises(ValueError, match="still warming up"):
        sm.set_weights(state, ("us-east",), 10, 10, 1, "by hand")


def test_a_pause_in_one_region_does_not_hide_a_failure_in_another() -> None:
    plan = replace(PLAN, on_max_hold="pause")
    state = started(plan)
    held = replace(state.regions["us-east"], step_started=0.0, hold_since=0.0, reason="holding")
    state = replace(state, regions={**state.regions, "us-east": held})
    worse = Comparison(Measurement(1000, 60, latency_buckets=LATENCY), STEP, "baseline")
    observations = {
        "us-east": obs(Measurement(2, 0, 50)),  # too few requests, past max_hold: pause
        "eu-west": obs(step=worse),  # a conclusive failure, judged after us-east
    }
    d = sm.decide(plan, state, observations, plan.max_hold + 1)
    assert d.rollback and "eu-west" in d.state.reason


def test_weights_set_by_hand_start_the_steps_evidence_again() -> None:
    """What the canary delivered at its old share says nothing about the new one: the
    step's clock (and so its throughput and window evidence) restarts once the new
    weights are applied."""
    state = started()
    running = replace(state.regions["us-east"], step_started=5.0)
    state = replace(state, regions={**state.regions, "us-east": running})
    d = sm.set_weights(state, ("us-east",), 10, 0, 30.0, "by hand")
    assert d.state.regions["us-east"].step_started is None
    assert d.state.regions["us-east"].manual_canary == 10
    assert d.state.regions["eu-west"].step_started == state.regions["eu-west"].step_started
