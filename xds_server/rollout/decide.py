"""The rollout state machine and the decision function. Pure: no I/O, no clock.

Per region:   pending -> [warming] -> progressing(step i) -> promoted | rolled_back | paused
Per rollout:  progressing | paused | promoted | rolled_back

Warming is step -1: the canary and baseline pools get no weight until they are healthy
and the warm-up webhooks have passed; then, if the plan has shadow traffic, Envoy mirrors
a share of production's requests to them and that shadow traffic is judged like a step.

`decide(plan, state, observations, now)` returns the next state and the transitions
that lead there, each with a reason. Rules it keeps, whatever it observes:
- no promotion without evidence: a step passes only after a full `step_duration` of
  passing checks, counted from when the region's Envoys applied the step;
- any region failing rolls back every region, at once, whatever else is going on
  (a pause or a hold included);
- a region that is still waiting for its Envoys to apply a step is not judged;
- a failure of the statistical analysis is conclusive (its sequential test already
  weighed every look): it rolls back at once, without waiting for a second failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from xds_server.rollout.judge import (
    FAIL,
    MARGINAL,
    NO_DATA,
    PASS,
    Comparison,
    Measurement,
    Verdict,
    judge,
)
from xds_server.rollout.plan import RolloutPlan, split_for
from xds_server.traffic import PRODUCTION_ONLY, WEIGHT_TOTAL, Split

PENDING = "pending"
WARMING = "warming"
PROGRESSING = "progressing"
PAUSED = "paused"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
LIVE = frozenset({WARMING, PROGRESSING, PAUSED})
WARMUP_STEP = -1
FINISHED = frozenset({PROMOTED, ROLLED_BACK})


@dataclass(frozen=True)
class RegionState:
    phase: str = PENDING
    step: int = -1
    step_started: float | None = None
    """When every Envoy of the region had applied this step: the step's clock."""
    step_passed: bool = False
    failures: int = 0
    """Consecutive failed checks in this step."""
    hold_since: float | None = None
    """When the current run of checks without evidence began."""
    reason: str = ""
    manual_canary: float | None = None
    """Canary percent set by hand (the rollout is paused meanwhile); None: by the plan."""
    manual_baseline: float | None = None
    shadowing: bool = False
    """Warm-up: pools are healthy and the hooks passed; shadow traffic is being judged."""


def step_label(plan: RolloutPlan, step: int) -> str:
    if step == WARMUP_STEP:
        return "warm-up"
    return f"step {step} ({plan.steps[step]:g}%)"


def _warming(rs: RegionState) -> bool:
    return rs.step == WARMUP_STEP and rs.phase in LIVE


@dataclass(frozen=True)
class RolloutState:
    service: str
    canary_version: str
    phase: str
    regions: Mapping[str, RegionState]
    started_at: float
    updated_at: float
    wave: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Observation:
    """What the controller saw of one region this interval."""

    applied_at: float | None = None
    """When every Envoy of the region had ACKed the current weights; None: not yet."""
    apply_error: str | None = None
    """A NACK, or no ACK within `ack_timeout`: the step fails."""
    canary: Measurement | None = None
    """The canary over the sliding window: what the SLA guardrails judge."""
    step: Comparison | None = None
    """Canary and comparator over the whole step: what the analysis judges."""
    warmup_pending: tuple[str, ...] = ()
    """Warm-up: what the pools are still waiting for (health, a webhook)."""
    warmup_error: str | None = None
    """Warm-up: a webhook failed; the rollout is blocked until resumed."""


@dataclass(frozen=True)
class Transition:
    region: str | None
    """None for a change of the whole rollout."""
    phase_from: str
    phase_to: str
    step_from: int
    step_to: int
    reason: str
    verdict: Verdict | None = None
    kind: str = "transition"
    """"transition", or "check" for a judgement that changed no phase or step."""


@dataclass(frozen=True)
class Decision:
    state: RolloutState
    transitions: tuple[Transition, ...] = ()
    rollback: bool = False
    observations: Mapping[str, Observation] = field(default_factory=dict)


def start(
    plan: RolloutPlan, service: str, version: str, regions: tuple[str, ...], now: float
) -> Decision:
    first_wave = plan.wave_list(regions)[0]
    states = {
        r: _first_state(plan, "rollout started")
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


def _first_state(plan: RolloutPlan, why: str) -> RegionState:
    if plan.warmup.needed:
        return RegionState(WARMING, WARMUP_STEP, reason=f"{why}: warming up")
    return RegionState(PROGRESSING, 0, reason=why)


def split_of(plan: RolloutPlan, region: RegionState, has_baseline: bool) -> Split:
    """The weights a region gets in a given state: derived, never stored."""
    if region.manual_canary is not None and region.phase in LIVE:
        return Split.from_percent(
            {"canary": region.manual_canary, "baseline": region.manual_baseline or 0.0}
        )
    if _warming(region):
        # Paused in shadow keeps mirroring, as a paused step keeps its weights: the hold
        # clock runs on, and shadow traffic is the only evidence a warming region has.
        if region.shadowing:
            return Split(shadow=round(plan.warmup.shadow_percent * WEIGHT_TOTAL / 100))
        return PRODUCTION_ONLY
    if region.phase in LIVE:
        return split_for(plan.steps[region.step], has_baseline)
    if region.phase == PROMOTED:
        return split_for(100, has_baseline)
    return PRODUCTION_ONLY


def decide(
    plan: RolloutPlan, state: RolloutState, observations: Mapping[str, Observation], now: float
) -> Decision:
    if state.phase not in LIVE:
        return Decision(state, observations=observations)
    regions = dict(state.regions)
    transitions: list[Transition] = []
    pause_why: str | None = None
    for name, obs in observations.items():
        rs = regions.get(name)
        if rs is None or rs.phase not in LIVE:
            continue
        step_desc = step_label(plan, rs.step)
        if obs.apply_error:
            return _rollback(
                state,
                now,
                f"{name}: {step_desc} not applied by the data plane: {obs.apply_error}",
                observations,
            )
        if _warming(rs) and not rs.shadowing:
            if rs.step_passed:
                continue  # waiting for the rest of its wave
            rs, note = _warm_up(plan, rs, obs, now)
            regions[name] = rs
            if note.startswith("blocked"):
                pause_why = pause_why or f"{name}: {note}"
                continue
            if note.startswith("max_hold"):
                waiting = note.removeprefix("max_hold: ")
                why = f"{name}: warm-up not done within {plan.max_hold:g}s: {waiting}"
                if plan.on_max_hold == "rollback":
                    return _rollback(state, now, why, observations)
                pause_why = pause_why or why
                continue
            if note:
                transitions.append(
                    Transition(name, rs.phase, rs.phase, rs.step, rs.step, note, kind="check")
                )
            continue
        if obs.applied_at is None:
            continue
        rs = replace(rs, step_started=rs.step_started or obs.applied_at)
        if obs.canary is None:
            regions[name] = rs
            continue
        expired = rs.hold_since is not None and now - rs.hold_since >= plan.max_hold
        verdict = judge(plan, obs.canary, obs.step, expired, len(state.regions))
        rs, note = _apply_verdict(plan, rs, verdict, now)
        regions[name] = rs
        if verdict.outcome == FAIL and (
            verdict.conclusive or rs.failures >= plan.failures_before_rollback
        ):
            return _rollback(
                state,
                now,
                f"{name}: {step_desc}: {verdict.reason}",
                observations,
                verdict=verdict,
                region=name,
            )
        if note == "max_hold":
            why = f"{name}: {step_desc}: no evidence for {plan.max_hold:g}s: {verdict.reason}"
            if plan.on_max_hold == "rollback" and not verdict.pause_requested:
                return _rollback(state, now, why, observations, verdict=verdict, region=name)
            pause_why = pause_why or why
        transitions.append(
            Transition(
                name,
                rs.phase,
                rs.phase,
                rs.step,
                rs.step,
                f"{step_desc}: {verdict.outcome}: {verdict.reason}"
                + (
                    f" (failure {rs.failures} of {plan.failures_before_rollback})"
                    if verdict.outcome == FAIL
                    else ""
                )
                + (" -- step passed" if note == "passed" else ""),
                verdict,
                kind="check",
            )
        )
    state = replace(state, regions=regions, updated_at=now)
    # A pause waits until every region was judged: a failure elsewhere still rolls back.
    if pause_why and state.phase != PAUSED:
        paused = _pause(state, now, pause_why, observations)
        transitions.extend(paused.transitions)
        return Decision(paused.state, tuple(transitions), observations=observations)
    if state.phase == PROGRESSING:
        state, advanced = _advance(plan, state, now)
        transitions.extend(advanced)
    return Decision(state, tuple(transitions), observations=observations)


def _warm_up(
    plan: RolloutPlan, rs: RegionState, obs: Observation, now: float
) -> tuple[RegionState, str]:
    """Before shadow traffic: wait for healthy pools and passed webhooks."""
    if obs.warmup_error:
        return replace(rs, reason=obs.warmup_error), f"blocked: {obs.warmup_error}"
    if rs.phase == PAUSED:
        return rs, ""
    if obs.warmup_pending:
        waiting = "; ".join(obs.warmup_pending)
        since = rs.hold_since if rs.hold_since is not None else now
        old = rs.reason
        rs = replace(rs, hold_since=since, reason=f"warming up: {waiting}")
        if now - since >= plan.max_hold:
            return rs, f"max_hold: {waiting}"
        # Recorded when what it waits for changes, not every interval.
        return rs, f"warm-up: waiting: {waiting}" if rs.reason != old else ""
    if plan.warmup.shadow_duration > 0:
        rs = replace(
            rs,
            hold_since=None,
            shadowing=True,
            step_started=None,
            reason="pools healthy, webhooks passed: judging shadow traffic",
        )
        return rs, (
            f"warm-up: pools ready: mirroring {plan.warmup.shadow_percent:g}% of requests "
            f"for {plan.warmup.shadow_duration:g}s"
        )
    rs = replace(rs, hold_since=None, step_passed=True, reason="pools healthy, webhooks passed")
    return rs, "warm-up passed: pools healthy, webhooks passed -- step passed"


def _apply_verdict(
    plan: RolloutPlan, rs: RegionState, verdict: Verdict, now: float
) -> tuple[RegionState, str]:
    if verdict.outcome == FAIL:
        return replace(rs, failures=rs.failures + 1, hold_since=None), "failed"
    if verdict.outcome in (NO_DATA, MARGINAL):
        since = rs.hold_since if rs.hold_since is not None else now
        rs = replace(rs, hold_since=since)
        return rs, "max_hold" if now - since >= plan.max_hold else "hold"
    assert verdict.outcome == PASS
    rs = replace(rs, failures=0, hold_since=None)
    assert rs.step_started is not None
    duration = plan.warmup.shadow_duration if rs.step == WARMUP_STEP else plan.step_duration
    if not rs.step_passed and now - rs.step_started >= duration:
        return replace(rs, step_passed=True, reason="step passed"), "passed"
    return rs, "pass"


def _advance(
    plan: RolloutPlan, state: RolloutState, now: float
) -> tuple[RolloutState, list[Transition]]:
    """Lockstep within a wave: move every region of the wave once all have passed."""
    waves = plan.wave_list(tuple(state.regions))
    wave = waves[state.wave]
    live = [r for r in wave if state.regions[r].phase in LIVE]
    if not live or not all(state.regions[r].step_passed for r in live):
        return state, []
    regions = dict(state.regions)
    step = regions[live[0]].step
    transitions: list[Transition] = []
    if step + 1 < len(plan.steps):
        for r in live:
            regions[r] = RegionState(
                PROGRESSING,
                step + 1,
                reason=f"every region of the wave passed {step_label(plan, step)}",
            )
            transitions.append(
                Transition(
                    r,
                    state.regions[r].phase,
                    PROGRESSING,
                    step,
                    step + 1,
                    f"advance to {plan.steps[step + 1]:g}%: every region "
                    f"of the wave passed {step_label(plan, step)}",
                )
            )
        return replace(state, regions=regions, updated_at=now), transitions
    for r in live:
        regions[r] = replace(regions[r], phase=PROMOTED, reason="passed every step")
        transitions.append(
            Transition(r, PROGRESSING, PROMOTED, step, step, "promoted: passed every step")
        )
    if state.wave + 1 < len(waves):
        nxt = waves[state.wave + 1]
        for r in nxt:
            regions[r] = _first_state(plan, "previous wave promoted")
            transitions.append(
                Transition(
                    r,
                    PENDING,
                    regions[r].phase,
                    -1,
                    regions[r].step,
                    f"wave {state.wave + 2} starts: previous wave promoted",
                )
            )
        return replace(state, regions=regions, wave=state.wave + 1, updated_at=now), transitions
    transitions.append(
        Transition(
            None,
            PROGRESSING,
            PROMOTED,
            step,
            step,
            "every region passed every step: canary serves 100%",
        )
    )
    return replace(
        state, regions=regions, phase=PROMOTED, updated_at=now, reason="promoted"
    ), transitions


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
    if state.phase != PAUSED:
        raise ValueError(f"rollout is {state.phase}, not paused")
    regions = {
        r: replace(rs, phase=WARMING if rs.step == WARMUP_STEP else PROGRESSING, hold_since=None)
        if rs.phase == PAUSED
        else rs
        for r, rs in state.regions.items()
    }
    new = replace(state, phase=PROGRESSING, regions=regions, updated_at=now, reason=reason)
    return Decision(new, (Transition(None, PAUSED, PROGRESSING, -1, -1, f"resumed: {reason}"),))


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
    new, transitions = _advance(plan, forced, now)
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
    warming = [r for r in regions or tuple(state.regions) if _warming(state.regions[r])]
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
        new_regions[r] = replace(rs, phase=phase, manual_canary=canary, manual_baseline=baseline)
        transitions.append(
            Transition(
                r,
                rs.phase,
                phase,
                rs.step,
                rs.step,
                f"weights set by hand to canary {canary:g}%, baseline {baseline:g}%: {reason}",
            )
        )
    paused = _pause(replace(state, regions=new_regions), now, f"weights set by hand: {reason}")
    return Decision(paused.state, (*transitions, *paused.transitions))
