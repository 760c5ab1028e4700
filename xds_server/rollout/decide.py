"""The decision function: what one interval's observations mean for a rollout. Pure: no
I/O, no clock.

`decide(plan, state, observations, now)` reads like its rules: each observed region
yields one `RegionEvent` (its next state, and whether it asks to record a check, to
pause or to roll back), then the events fold in the order rollback > pause > advance.
Rules it keeps, whatever it observes:
- no promotion without evidence: a step passes only after a full `step_duration` of
  passing checks, counted from when the region's Envoys applied the step;
- any region failing rolls back every region, at once, whatever else is going on
  (a pause or a hold included);
- a region that is still waiting for its Envoys to apply a step is not judged;
- a region whose nodes nobody can see (their replica silent or gone) is no evidence:
  it holds, on its own hold clock, until they are seen applying the step (its evidence
  then starts again) or `max_hold` (then `on_max_hold`); `ack_timeout` fails only
  nodes that are seen and do not ACK;
- a failure of the statistical analysis is conclusive (its sequential test already
  weighed every look): it rolls back at once, without waiting for a second failure.

Warming is step -1: the canary and baseline pools get no weight until they are healthy
and the warm-up webhooks have passed; then, if the plan has shadow traffic, Envoy mirrors
a share of production's requests to them and that shadow traffic is judged like a step.

What it reads and returns are the records of `decision.py`; how a wave moves on once its
regions passed a step (gates, `confirm_step` hooks, promotion, the next wave) is
`waves.py`. Operator actions (pause, resume, abort, promote, weights by hand) are here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from enum import StrEnum

from xds_server.rollout.decision import (
    Decision,
    EntryKind,
    Observation,
    RegionEvent,
    Transition,
)
from xds_server.rollout.evidence import (
    FAIL,
    MARGINAL,
    NO_DATA,
    PASS,
    Comparison,
    Measurement,
    Verdict,
)
from xds_server.rollout.judge import judge
from xds_server.rollout.state import (
    FINISHED,
    LIVE,
    PAUSED,
    PENDING,
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    WARMING,
    WARMUP_STEP,
    RegionState,
    RolloutState,
    step_label,
)
from xds_server.rollout.waves import advance, awaiting_confirmation, first_state
from xds_server.spec import OnMaxHold, RolloutPlan
from xds_server.traffic import Split

__all__ = [
    # The records (decision.py) and the confirm_step question (waves.py), here too:
    # callers import the decision function's whole vocabulary from this module.
    "Decision",
    "EntryKind",
    "Observation",
    "RegionEvent",
    "Transition",
    "abort",
    "awaiting_confirmation",
    "decide",
    "fold",
    "pause",
    "promote",
    "region_event",
    "resume",
    "rollback",
    "set_weights",
    "start",
]


class _Progress(StrEnum):
    FAILED = "failed"
    HOLD = "hold"
    MAX_HOLD = "max_hold"
    PASSING = "passing"
    PASSED = "passed"


def start(
    plan: RolloutPlan, service: str, version: str, regions: tuple[str, ...], now: float
) -> Decision:
    first_wave = plan.wave_list(regions)[0]
    states = {
        r: first_state(plan, "rollout started")
        if r in first_wave
        else RegionState(reason="waiting for an earlier wave")
        for r in regions
    }
    state = RolloutState(
        service,
        version,
        PROGRESSING,
        states,
        now,
        now,
        reason=f"canary {version} not yet rolled out",
    )
    transitions = tuple(
        Transition(r, PENDING, s.phase, -1, s.step, s.reason) for r, s in states.items()
    )
    return Decision(
        state,
        (
            Transition(
                None, PENDING, PROGRESSING, -1, 0, f"rollout of {service} {version} started"
            ),
            *transitions,
        ),
    )


def decide(
    plan: RolloutPlan,
    state: RolloutState,
    observations: Mapping[str, Observation],
    now: float,
    group_hold: str | None = None,
) -> Decision:
    if state.phase not in LIVE:
        return Decision(state, observations=observations)
    events = {
        name: region_event(plan, name, state.regions[name], obs, now, len(state.regions))
        for name, obs in observations.items()
        if name in state.regions and state.regions[name].phase in LIVE
    }
    return fold(plan, state, events, observations, now, group_hold)


def region_event(
    plan: RolloutPlan, name: str, rs: RegionState, obs: Observation, now: float, regions: int
) -> RegionEvent:
    """One live region's observation -> its event. `regions`: how many the rollout has
    (they share each metric's false-alarm level). A change of the region's stragglers
    (issue 28) is audited with the event's check."""
    ev = _region_event(plan, name, rs, obs, now, regions)
    if not obs.stragglers_changed or ev.rollback:
        return ev
    note = f"{step_label(plan, ev.region.step)}: {obs.stragglers_changed}"
    return replace(ev, check=f"{ev.check}; {note}" if ev.check else note)


def _region_event(
    plan: RolloutPlan, name: str, rs: RegionState, obs: Observation, now: float, regions: int
) -> RegionEvent:
    if obs.apply_error:
        why = f"{name}: {step_label(plan, rs.step)} not applied by the data plane: "
        return RegionEvent(rs, rollback=why + obs.apply_error)
    if rs.warming and not rs.shadowing:
        return RegionEvent(rs) if rs.step_passed else _warm_up(plan, name, rs, obs, now)
    # Nodes nobody can see come first: a region cut off is also a region whose hosts'
    # registrations lapse (they cannot renew either), and which of the two failed is
    # what the control plane cannot tell. Seen again, the hold ends before anything
    # else (a lapsed registration then gets a hold clock of its own).
    if obs.applied_at is None and obs.apply_unknown:
        return _unknown_hold(plan, name, rs, obs.apply_unknown, now)
    if obs.applied_at is not None and _holding_for_unknown(rs):
        return _seen_again(plan, rs, obs.applied_at, now)
    if obs.no_hosts:
        return _no_hosts(plan, name, rs, obs.no_hosts, now)
    if obs.applied_at is None:  # the data plane has not applied the step yet: not judged
        return RegionEvent(rs)
    rs = replace(rs, step_started=rs.step_started or obs.applied_at)
    if obs.canary is None:
        return RegionEvent(rs)
    return _judged(plan, name, rs, obs.canary, obs.step, now, regions)


UNKNOWN_HOLD = "holding (no evidence of application): "
"""How a region's reason begins while it holds for nodes nobody can see (`_unknown_hold`)."""


def _holding_for_unknown(rs: RegionState) -> bool:
    """Was the region holding for unknown nodes at its last look? (Its reason says so
    until the hold ends, also across a pause and its resume, which clears the clock.)"""
    return rs.reason.startswith(UNKNOWN_HOLD)


def _unknown_hold(
    plan: RolloutPlan, name: str, rs: RegionState, why: str, now: float
) -> RegionEvent:
    """The region's quorum needs nodes that are unknown (their replica silent or gone:
    nobody can see what they route by): no evidence, neither a pass nor a failure
    (issues 27, 29). `ack_timeout` does not end it (it decides for nodes that are seen
    and do not ACK); the hold's own clock does: at `max_hold` the rollout follows
    `on_max_hold` wherever it can reach. Audited when the hold begins and when its
    reason changes (other nodes, a silent replica now gone), not at every look."""
    where = step_label(plan, rs.step)
    reason = f"{UNKNOWN_HOLD}{why}"
    began = not _holding_for_unknown(rs) or rs.hold_since is None
    changed = began or reason != rs.reason
    # Its own clock: a hold of another kind before (too few requests yet) says
    # nothing of how long the region has been out of sight.
    since = now if began or rs.hold_since is None else rs.hold_since
    rs = replace(rs, hold_since=since, reason=reason)
    if now - since >= plan.max_hold:
        stop = f"{name}: {where}: no evidence for {plan.max_hold:g}s: {why}"
        if plan.on_max_hold == OnMaxHold.ROLLBACK:
            return RegionEvent(rs, rollback=stop)
        return RegionEvent(rs, pause=stop)
    return RegionEvent(rs, check=f"{where}: holding: {why}" if changed else "")


def _seen_again(plan: RolloutPlan, rs: RegionState, applied_at: float, now: float) -> RegionEvent:
    """The nodes a region held for are seen applying its routes again (on any replica):
    the hold ends and the step goes on. A step that had started and not passed starts
    its evidence afresh, as a resumed one does (`_resumed`): what the region routed
    while nobody could see it is not known to be the step's; one that had not started
    starts now, from its quorum's ACK, as any step does."""
    where = step_label(plan, rs.step)
    held = f" after {now - rs.hold_since:.1f}s not known" if rs.hold_since is not None else ""
    fresh = not rs.step_passed and rs.step_started is not None
    rs = replace(
        rs,
        hold_since=None,
        step_started=now if fresh else rs.step_started or applied_at,
        failures=0 if fresh else rs.failures,
        reason=f"routes applied again{held}",
    )
    again = "; the step's evidence starts again" if fresh else ""
    return RegionEvent(rs, check=f"{where}: routes applied again{held}{again}")


def _no_hosts(plan: RolloutPlan, name: str, rs: RegionState, why: str, now: float) -> RegionEvent:
    """A canary with no host takes its share of requests and answers none of them: not
    a lack of evidence to wait out (a metric's `on_no_data`), a failure once it lasts
    max_hold."""
    since = rs.hold_since if rs.hold_since is not None else now
    rs = replace(rs, hold_since=since)
    where = step_label(plan, rs.step)
    if now - since >= plan.max_hold:
        return RegionEvent(rs, rollback=f"{name}: {where}: {why} for {plan.max_hold:g}s")
    return RegionEvent(rs, check=f"{where}: holding: {why}")


def fold(
    plan: RolloutPlan,
    state: RolloutState,
    events: Mapping[str, RegionEvent],
    observations: Mapping[str, Observation],
    now: float,
    group_hold: str | None = None,
) -> Decision:
    """The regions' events -> one decision: any rollback wins, then a pause, then advance.
    `group_hold`: why the rollout group holds the wave (`groups.lockstep_hold`)."""
    for name, ev in events.items():
        if ev.rollback:
            region = name if ev.verdict is not None else None
            return _rollback(state, now, ev.rollback, observations, ev.verdict, region)
    regions = dict(state.regions)
    transitions: list[Transition] = []
    pause_why = ""
    for name, ev in events.items():
        regions[name] = rs = ev.region
        if ev.check:
            transitions.append(Transition.check(name, rs, ev.check, ev.verdict))
        pause_why = pause_why or ev.pause
    state = replace(state, regions=regions, updated_at=now)
    # A pause waits until every region was judged: a failure elsewhere still rolls back.
    if pause_why and state.phase != PAUSED:
        paused = _pause(state, now, pause_why, observations)
        transitions.extend(paused.transitions)
        return Decision(paused.state, tuple(transitions), observations=observations)
    if state.phase == PROGRESSING:
        answers = (o.confirmation for o in observations.values() if o.confirmation is not None)
        state, advanced = advance(
            plan, state, now, confirmation=next(answers, None), group=group_hold
        )
        transitions.extend(advanced)
    return Decision(state, tuple(transitions), observations=observations)


def _judged(
    plan: RolloutPlan,
    name: str,
    rs: RegionState,
    canary: Measurement,
    step: Comparison | None,
    now: float,
    regions: int,
) -> RegionEvent:
    expired = rs.hold_since is not None and now - rs.hold_since >= plan.max_hold
    verdict = judge(plan, canary, step, expired, regions)
    rs, progress = _apply_verdict(plan, rs, verdict, now)
    where = step_label(plan, rs.step)
    if verdict.outcome == FAIL and (
        verdict.conclusive or rs.failures >= plan.failures_before_rollback
    ):
        return RegionEvent(rs, rollback=f"{name}: {where}: {verdict.reason}", verdict=verdict)
    check = f"{where}: {verdict.outcome}: {verdict.reason}"
    if verdict.outcome == FAIL:
        check += f" (failure {rs.failures} of {plan.failures_before_rollback})"
    if progress == _Progress.PASSED:
        check += " -- step passed"
    if progress != _Progress.MAX_HOLD:
        return RegionEvent(rs, check=check, verdict=verdict)
    why = f"{name}: {where}: no evidence for {plan.max_hold:g}s: {verdict.reason}"
    if plan.on_max_hold == OnMaxHold.ROLLBACK and not verdict.pause_requested:
        return RegionEvent(rs, rollback=why, verdict=verdict)
    return RegionEvent(rs, check=check, pause=why, verdict=verdict)


def _warm_up(
    plan: RolloutPlan, name: str, rs: RegionState, obs: Observation, now: float
) -> RegionEvent:
    """Before shadow traffic: wait for healthy pools and passed webhooks."""
    if obs.warmup_error:
        return RegionEvent(
            replace(rs, reason=obs.warmup_error), pause=f"{name}: blocked: {obs.warmup_error}"
        )
    if rs.phase == PAUSED:
        return RegionEvent(rs)
    if obs.warmup_pending:
        waiting = "; ".join(obs.warmup_pending)
        since = rs.hold_since if rs.hold_since is not None else now
        old = rs.reason
        rs = replace(rs, hold_since=since, reason=f"warming up: {waiting}")
        if now - since >= plan.max_hold:
            why = f"{name}: warm-up not done within {plan.max_hold:g}s: {waiting}"
            if plan.on_max_hold == OnMaxHold.ROLLBACK:
                return RegionEvent(rs, rollback=why)
            return RegionEvent(rs, pause=why)
        # Recorded when what it waits for changes, not every interval.
        return RegionEvent(rs, check=f"warm-up: waiting: {waiting}" if rs.reason != old else "")
    if plan.warmup.shadow_duration > 0:
        rs = replace(
            rs,
            hold_since=None,
            shadowing=True,
            step_started=None,
            reason="pools healthy, webhooks passed: judging shadow traffic",
        )
        return RegionEvent(
            rs,
            check=f"warm-up: pools ready: mirroring {plan.warmup.shadow_percent:g}% of "
            f"requests for {plan.warmup.shadow_duration:g}s",
        )
    rs = replace(rs, hold_since=None, step_passed=True, reason="pools healthy, webhooks passed")
    return RegionEvent(rs, check="warm-up passed: pools healthy, webhooks passed -- step passed")


def _apply_verdict(
    plan: RolloutPlan, rs: RegionState, verdict: Verdict, now: float
) -> tuple[RegionState, _Progress]:
    if verdict.outcome == FAIL:
        return replace(rs, failures=rs.failures + 1, hold_since=None), _Progress.FAILED
    if verdict.outcome in (NO_DATA, MARGINAL):
        since = rs.hold_since if rs.hold_since is not None else now
        rs = replace(rs, hold_since=since)
        return rs, _Progress.MAX_HOLD if now - since >= plan.max_hold else _Progress.HOLD
    assert verdict.outcome == PASS
    rs = replace(rs, failures=0, hold_since=None)
    assert rs.step_started is not None
    duration = plan.warmup.shadow_duration if rs.step == WARMUP_STEP else plan.step_duration
    if not rs.step_passed and now - rs.step_started >= duration:
        return replace(rs, step_passed=True, reason="step passed"), _Progress.PASSED
    return rs, _Progress.PASSING


def _rollback(
    state: RolloutState,
    now: float,
    reason: str,
    observations: Mapping[str, Observation],
    verdict: Verdict | None = None,
    region: str | None = None,
) -> Decision:
    """Every region, whatever its phase, back to production only."""
    regions = {r: replace(rs, phase=ROLLED_BACK, reason=reason) for r, rs in state.regions.items()}
    transitions = [
        Transition(
            r, rs.phase, ROLLED_BACK, rs.step, rs.step, reason, verdict if r == region else None
        )
        for r, rs in state.regions.items()
        if rs.phase != ROLLED_BACK
    ]
    transitions.append(
        Transition(
            None, state.phase, ROLLED_BACK, -1, -1, f"rolled back everywhere: {reason}", verdict
        )
    )
    new = replace(state, phase=ROLLED_BACK, regions=regions, updated_at=now, reason=reason)
    return Decision(new, tuple(transitions), rollback=True, observations=observations)


def _pause(
    state: RolloutState,
    now: float,
    reason: str,
    observations: Mapping[str, Observation] | None = None,
) -> Decision:
    regions = {
        r: replace(rs, phase=PAUSED) if rs.phase in (PROGRESSING, WARMING) else rs
        for r, rs in state.regions.items()
    }
    new = replace(state, phase=PAUSED, regions=regions, updated_at=now, reason=reason)
    return Decision(
        new,
        (Transition(None, state.phase, PAUSED, -1, -1, f"paused: {reason}"),),
        observations=observations or {},
    )


# ---- operator actions (the admin API calls these through the controller) ----


def pause(state: RolloutState, now: float, reason: str) -> Decision:
    if state.phase != PROGRESSING:
        raise ValueError(f"rollout is {state.phase}, not progressing")
    return _pause(state, now, reason)


def resume(state: RolloutState, now: float, reason: str) -> Decision:
    """Go on from where each paused region was. A step it had not passed starts its
    evidence afresh: what paused it (a sample-ratio mismatch, stale series, a hand on
    the weights) makes the counts gathered before the pause suspect, and the judge
    reads a step's counts from its clock."""
    if state.phase != PAUSED:
        raise ValueError(f"rollout is {state.phase}, not paused")
    regions = {
        r: _resumed(rs, now) if rs.phase == PAUSED else rs for r, rs in state.regions.items()
    }
    new = replace(state, phase=PROGRESSING, regions=regions, updated_at=now, reason=reason)
    return Decision(new, (Transition(None, PAUSED, PROGRESSING, -1, -1, f"resumed: {reason}"),))


def _resumed(rs: RegionState, now: float) -> RegionState:
    warming = rs.step == WARMUP_STEP
    fresh = not warming and not rs.step_passed and rs.step_started is not None
    return replace(
        rs,
        phase=WARMING if warming else PROGRESSING,
        hold_since=None,
        step_started=now if fresh else rs.step_started,
        failures=0 if fresh else rs.failures,
    )


def rollback(state: RolloutState, now: float, reason: str) -> Decision:
    """Every region back to production for a cause outside the rollout's own evidence:
    its rollout group's, or a dependency's (`after:`), rollback."""
    return _rollback(state, now, reason, {})


def abort(state: RolloutState, now: float, reason: str) -> Decision:
    if state.phase in FINISHED:
        raise ValueError(f"rollout already {state.phase}")
    return _rollback(state, now, f"aborted: {reason}", {})


def promote(
    plan: RolloutPlan, state: RolloutState, now: float, reason: str, all_the_way: bool = False
) -> Decision:
    """Move the current wave to its next step now (or every region to 100%)."""
    if state.phase not in LIVE:
        raise ValueError(f"rollout is {state.phase}, not in progress")
    regions = dict(state.regions)
    if all_the_way:
        transitions = [
            Transition(
                r, rs.phase, PROMOTED, rs.step, len(plan.steps) - 1, f"promoted by hand: {reason}"
            )
            for r, rs in regions.items()
            if rs.phase != PROMOTED
        ]
        regions = {
            r: RegionState(PROMOTED, len(plan.steps) - 1, reason=f"promoted: {reason}")
            for r in regions
        }
        transitions.append(
            Transition(None, state.phase, PROMOTED, -1, -1, f"promoted by hand: {reason}")
        )
        return Decision(
            replace(
                state,
                phase=PROMOTED,
                regions=regions,
                updated_at=now,
                reason=f"promoted by hand: {reason}",
            ),
            tuple(transitions),
        )
    wave = plan.wave_list(tuple(state.regions))[state.wave]
    for r in wave:
        if regions[r].phase in LIVE:
            regions[r] = replace(
                regions[r], step_passed=True, manual_canary=None, manual_baseline=None
            )
    forced = replace(state, phase=PROGRESSING, regions=regions, updated_at=now)
    new, transitions = advance(plan, forced, now, release=True)
    transitions = [
        replace(t, reason=f"{t.reason} (promoted by hand: {reason})") for t in transitions
    ]
    return Decision(new, tuple(transitions))


def set_weights(
    state: RolloutState,
    regions: tuple[str, ...],
    canary: float,
    baseline: float,
    now: float,
    reason: str,
) -> Decision:
    """Pin weights by hand in some regions; the rollout pauses until resumed."""
    if state.phase not in LIVE:
        raise ValueError(f"rollout is {state.phase}, not in progress")
    unknown = [r for r in regions if r not in state.regions]
    if unknown:
        raise KeyError(f"unknown region(s): {', '.join(unknown)}")
    Split.from_percent({"canary": canary, "baseline": baseline})  # raises WeightError
    warming = [r for r in regions or tuple(state.regions) if state.regions[r].warming]
    if warming:
        # Real traffic there would go unjudged: warm-up judges shadow traffic only.
        raise ValueError(
            f"{', '.join(warming)} still warming up: promote past warm-up before "
            "setting weights by hand"
        )
    new_regions = dict(state.regions)
    transitions = []
    for r in regions or tuple(state.regions):
        rs = new_regions[r]
        phase = PAUSED if rs.phase in LIVE else rs.phase
        why = f"weights set by hand to canary {canary:g}%, baseline {baseline:g}%: {reason}"
        # The step's evidence starts again once the new weights are applied: what the
        # canary delivered at its old share says nothing about the new one.
        new_regions[r] = replace(
            rs,
            phase=phase,
            manual_canary=canary,
            manual_baseline=baseline,
            reason=why,
            step_started=None,
        )
        transitions.append(Transition(r, rs.phase, phase, rs.step, rs.step, why))
    paused = _pause(replace(state, regions=new_regions), now, f"weights set by hand: {reason}")
    return Decision(paused.state, (*transitions, *paused.transitions))
